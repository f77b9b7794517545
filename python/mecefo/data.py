"""Corpora and batches addressed by (step, shard).

Corpora (all end up as two flat token files, train and validation):

* ``stdlib`` (default): the Python standard library's own ``.py`` sources, byte-level tokens
  (vocabulary 256). It exists wherever Python does, so nothing is downloaded. Split into
  train / validation by file (a stable hash of the file's path), test suites excluded.
* text files or directories: byte-level tokens, split by file (or, for a single file, its tail).
* one tokenised ``.bin`` file (a flat array of ``--data-dtype`` token ids, nanoGPT style): its
  tail is the validation split.

The launcher builds the token files once into a cache directory (atomically) and every replica
memory-maps them. A batch is a pure function of ``(seed, step, shard)``: the start offsets of its
sequences come from a counter-based generator seeded with those three numbers, so any replica
can compute any shard's micro-batch (or any range of its sequences), and a discarded step is
replayed exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB = 256
_TEST_DIRS = {"test", "tests", "idle_test"}
_VAL_SEED_OFFSET = 1 << 40  # validation batches use their own stream of the generator


@dataclass(frozen=True)
class CorpusFiles:
    """The prepared token files of one corpus and what they hold."""

    train: str
    val: str
    dtype: str
    vocab: int  # smallest vocabulary that holds every token
    fingerprint: str  # sha256 of both splits' bytes: replicas check they train on the same data
    description: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mecefo"


def stdlib_sources() -> list[Path]:
    """The standard library's .py files (no site-packages, no test suites), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel or _TEST_DIRS.intersection(rel):
            continue
        files.append(path)
    return sorted(files)


def is_validation_file(rel_path: str, val_percent: float) -> bool:
    """Stable split by file: a hash of the relative path, not the file order or the machine."""
    bucket = int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16) % 10000
    return bucket < val_percent * 100


def _text_files(sources: list[str]) -> tuple[Path, list[Path]]:
    files: list[Path] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--data {src!r}: no such file or directory")
    if not files:
        raise ValueError(f"--data {' '.join(sources)}: no files found")
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    return root, files


def _split_files(root: Path, files: list[Path], val_percent: float) -> tuple[bytes, bytes]:
    train, val = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        (val if is_validation_file(rel, val_percent) else train).append(path.read_bytes())
    if not val or not train:  # tiny file lists: keep both splits non-empty, deterministically
        everything = [p.read_bytes() for p in files]
        cut = max(1, round(len(everything) * val_percent / 100))
        train, val = everything[:-cut], everything[-cut:]
    sep = b"\n\n"
    return sep.join(train), sep.join(val)


def _split_tail(data: np.ndarray, val_percent: float) -> tuple[np.ndarray, np.ndarray]:
    cut = max(1, int(len(data) * val_percent / 100))
    return data[:-cut], data[-cut:]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_corpus(sources: list[str], *, cache_dir: str | Path | None = None, val_percent: float = 5.0,
                   data_dtype: str = "uint16") -> CorpusFiles:
    """Build (or reuse) the train / validation token files for ``sources``."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if sources == ["stdlib"]:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_sources()
        key_src = f"stdlib|{sys.version}|{root}|{len(files)}|{val_percent}"
        kind = f"Python {sys.version.split()[0]} standard library sources ({len(files)} files, byte-level)"
    elif len(sources) == 1 and sources[0].endswith(".bin"):
        root, files = None, [Path(sources[0])]
        if not files[0].is_file():
            raise FileNotFoundError(f"--data {sources[0]!r}: no such file")
        stat = files[0].stat()
        key_src = f"bin|{files[0].resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{data_dtype}|{val_percent}"
        kind = f"tokenised {files[0].name} ({data_dtype})"
    else:
        root, files = _text_files(sources)
        stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        key_src = f"text|{stamp}|{val_percent}"
        kind = f"{len(files)} text file(s) under {root} (byte-level)"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = cache / "corpus" / key
    meta_path = out / "meta.json"
    if meta_path.is_file():
        return CorpusFiles(**json.loads(meta_path.read_text()))

    out.mkdir(parents=True, exist_ok=True)
    if root is None:  # tokenised .bin
        data = np.fromfile(files[0], dtype=np.dtype(data_dtype))
        if data.size == 0:
            raise ValueError(f"--data {files[0]}: empty token file")
        train_arr, val_arr = _split_tail(data, val_percent)
        dtype = data_dtype
        vocab = int(data.max()) + 1
        train_bytes, val_bytes = train_arr.tobytes(), val_arr.tobytes()
    elif len(files) > 1:
        train_bytes, val_bytes = _split_files(root, files, val_percent)
        dtype, vocab = "uint8", BYTE_VOCAB
    else:
        train_arr, val_arr = _split_tail(np.frombuffer(files[0].read_bytes(), np.uint8), val_percent)
        train_bytes, val_bytes = train_arr.tobytes(), val_arr.tobytes()
        dtype, vocab = "uint8", BYTE_VOCAB
    digest = hashlib.sha256(train_bytes)
    digest.update(val_bytes)
    _write_atomic(out / "train.bin", train_bytes)
    _write_atomic(out / "val.bin", val_bytes)
    meta = CorpusFiles(train=str(out / "train.bin"), val=str(out / "val.bin"), dtype=dtype, vocab=vocab,
                       fingerprint=digest.hexdigest(), description=kind)
    _write_atomic(meta_path, json.dumps(meta.as_dict(), indent=2).encode())
    return meta


def check_length(corpus: CorpusFiles, seq_len: int) -> None:
    """ValueError unless both splits hold a sequence of ``seq_len`` tokens and its next-token target (and
    room for more than one start offset); the launcher checks it once, before any replica starts."""
    itemsize = np.dtype(corpus.dtype).itemsize
    for name, path in (("train", corpus.train), ("validation", corpus.val)):
        tokens = os.path.getsize(path) // itemsize
        if tokens < seq_len + 2:
            raise ValueError(f"the {name} split of {corpus.description} has {tokens} tokens, fewer than "
                             f"seq_len + 2 = {seq_len + 2}: use more data or a shorter --seq-len")


class Batches:
    """Deterministic micro-batches: ``batch(step, shard)`` and ``val_batch(i)``.

    Each micro-batch is ``micro_batch`` sequences of ``seq_len + 1`` consecutive tokens at
    offsets drawn from numpy's generator seeded with ``(seed, step, shard)``; inputs are the
    first ``seq_len`` tokens, targets the next-token shift.
    """

    def __init__(self, corpus: CorpusFiles, *, seq_len: int, micro_batch: int, seed: int, vocab_size: int):
        if corpus.vocab > vocab_size:
            raise ValueError(f"the corpus has token ids up to {corpus.vocab - 1} but the model's vocabulary "
                             f"is {vocab_size}; choose a preset with a larger vocabulary")
        self.corpus = corpus
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.seed = seed
        dtype = np.dtype(corpus.dtype)
        self.train = np.memmap(corpus.train, dtype=dtype, mode="r")
        self.val = np.memmap(corpus.val, dtype=dtype, mode="r")
        for name, split in (("train", self.train), ("validation", self.val)):
            if len(split) < seq_len + 2:
                raise ValueError(f"the {name} split has {len(split)} tokens, fewer than seq_len + 2 = {seq_len + 2}")

    def _sample(self, split: np.ndarray, key: tuple[int, ...], start: int = 0,
                stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(np.random.SeedSequence(key))
        starts = rng.integers(0, len(split) - self.seq_len - 1, size=self.micro_batch)[start:stop]
        rows = np.stack([np.asarray(split[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]

    def batch(self, step: int, shard: int, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each ``[stop - start, seq_len]`` int64: sequences ``[start, stop)`` of shard
        ``shard``'s micro-batch at step ``step`` (default: all ``micro_batch`` of them).

        A slice holds exactly those rows of the whole micro-batch, so work split across replicas
        by sequence ranges sees the same data as one replica running the whole shard."""
        if step < 0 or shard < 0:
            raise ValueError(f"step and shard must be >= 0, got step={step}, shard={shard}")
        stop = self.micro_batch if stop is None else stop
        if not 0 <= start < stop <= self.micro_batch:
            raise ValueError(f"sequence range [{start}, {stop}) is not a non-empty range within the shard's "
                             f"{self.micro_batch} sequences")
        return self._sample(self.train, (self.seed, step, shard), start, stop)

    def val_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(self.val, (self.seed + _VAL_SEED_OFFSET, index))
