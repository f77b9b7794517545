"""Corpora and batch(step, shard): deterministic, replayable, split by file."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mecefo.data import Batches, is_validation_file, prepare_corpus, stdlib_sources


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    return prepare_corpus(["stdlib"], cache_dir=tmp_path_factory.mktemp("cache"))


def test_stdlib_corpus_split_by_file(stdlib_corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.relative_to(root).parts)
    val_files = [f for f in files if is_validation_file(f.relative_to(root).as_posix(), 5.0)]
    assert 0 < len(val_files) < len(files) * 0.15
    train = np.memmap(stdlib_corpus.train, dtype=np.uint8, mode="r")
    val = np.memmap(stdlib_corpus.val, dtype=np.uint8, mode="r")
    # a validation file's text is in the validation split, not in the training split
    probe = val_files[0].read_bytes()[:400]
    assert probe in val.tobytes() and probe not in train.tobytes()
    assert stdlib_corpus.vocab == 256 and stdlib_corpus.dtype == "uint8"


def test_corpus_cache_is_reused_and_reproducible(stdlib_corpus, tmp_path):
    again = prepare_corpus(["stdlib"], cache_dir=Path(stdlib_corpus.train).parents[2])
    assert again == stdlib_corpus
    rebuilt = prepare_corpus(["stdlib"], cache_dir=tmp_path)
    assert rebuilt.fingerprint == stdlib_corpus.fingerprint and rebuilt.train != stdlib_corpus.train


def test_batches_are_a_function_of_step_and_shard(stdlib_corpus):
    a = Batches(stdlib_corpus, seq_len=32, micro_batch=3, seed=0, vocab_size=256)
    b = Batches(stdlib_corpus, seq_len=32, micro_batch=3, seed=0, vocab_size=256)
    x, y = a.batch(7, 2)
    assert x.shape == y.shape == (3, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one token"
    assert torch.equal(x, b.batch(7, 2)[0]), "any replica computes any shard's batch"
    assert torch.equal(x, a.batch(7, 2)[0]), "a replayed step sees the same data"
    others = [a.batch(7, 3)[0], a.batch(8, 2)[0], Batches(stdlib_corpus, seq_len=32, micro_batch=3, seed=1,
                                                          vocab_size=256).batch(7, 2)[0]]
    assert not any(torch.equal(x, o) for o in others)
    assert not torch.equal(a.val_batch(0)[0], a.val_batch(1)[0])
    with pytest.raises(ValueError, match="step and shard must be >= 0"):
        a.batch(-1, 0)


def test_text_files_and_single_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"doc{i}.txt").write_text(f"document {i} " * 50)
    corpus = prepare_corpus([str(docs)], cache_dir=tmp_path / "cache")
    train = Path(corpus.train).read_bytes()
    val = Path(corpus.val).read_bytes()
    assert train and val and corpus.vocab == 256
    assert not any(f"document {i} ".encode() in train and f"document {i} ".encode() in val for i in range(30))

    single = tmp_path / "one.txt"
    single.write_bytes(bytes(range(256)) * 40)
    corpus = prepare_corpus([str(single)], cache_dir=tmp_path / "cache", val_percent=10)
    assert Path(corpus.train).read_bytes() + Path(corpus.val).read_bytes() == single.read_bytes()
    assert len(Path(corpus.val).read_bytes()) == 1024


def test_tokenised_bin(tmp_path):
    tokens = (np.arange(5000) * 7 % 1000).astype(np.uint16)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    corpus = prepare_corpus([str(path)], cache_dir=tmp_path / "cache", data_dtype="uint16")
    assert corpus.vocab == 1000 and corpus.dtype == "uint16"
    x, y = Batches(corpus, seq_len=16, micro_batch=2, seed=0, vocab_size=32000).batch(0, 0)
    assert int(x.max()) < 1000 and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="token ids up to 999 but the model's vocabulary is 256"):
        Batches(corpus, seq_len=16, micro_batch=2, seed=0, vocab_size=256)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        prepare_corpus([str(tmp_path / "missing.txt")], cache_dir=tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    corpus = prepare_corpus([str(short)], cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        Batches(corpus, seq_len=64, micro_batch=1, seed=0, vocab_size=256)
