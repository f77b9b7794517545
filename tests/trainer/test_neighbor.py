"""The neighbour path: base-refresh rule, and the MeCeFO path behind mecefo_kernels' public API."""

import pytest

import mecefo_kernels
from mecefo.neighbor import NOW, PERIODIC, ExactPath, MeCeFOPath, neighbor_path, refresh_due


def test_refresh_when_becoming_a_neighbour_then_periodically():
    assert refresh_due(13, was_neighbour=False, bases_step=None) == NOW  # an episode starts
    assert refresh_due(13, was_neighbour=False, bases_step=3) == NOW  # a new episode: fresh bases
    assert refresh_due(14, was_neighbour=True, bases_step=13) == PERIODIC  # tau decides (step % tau)
    assert refresh_due(14, was_neighbour=True, bases_step=None) == NOW  # healed or resumed mid-episode
    assert refresh_due(13, was_neighbour=False, bases_step=13) is None  # the first step replayed
    assert refresh_due(20, was_neighbour=True, bases_step=20) is None  # a refreshed step replayed


def test_exact_path_changes_nothing():
    path = neighbor_path("ndb-exact", rank=None, tau=10)
    assert isinstance(path, ExactPath)
    assert neighbor_path("shrink", rank=None, tau=10).skipped_parameters(None) == []


def test_mecefo_path_says_what_is_missing(monkeypatch):
    monkeypatch.delattr(mecefo_kernels, "refresh_bases")
    with pytest.raises(RuntimeError, match="policy mecefo needs mecefo_kernels.refresh_bases"):
        MeCeFOPath(rank=None, tau=10)


def test_exact_path_never_refreshes():
    assert ExactPath().refresh(None) is False
