import pytest


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One embedded-corpus build shared by every trainer test."""
    return tmp_path_factory.mktemp("corpus-cache")
