"""Corpora and batches addressed by (step, shard).

Corpora (all end up as two flat token files, train and validation):

* ``stdlib`` (default): the Python standard library's own ``.py`` sources, byte-level tokens
  (vocabulary 256). It exists wherever Python does, so nothing is downloaded. Split into
  train / validation by file (a stable hash of the file's path), test suites excluded.
* text files or directories: byte-level tokens, split by file (or, for a single file, its tail).
* one tokenised ``.bin`` file (a flat array of ``--data-dtype`` token ids, nanoGPT style): its
  tail is the validation split.
* with ``--tokenizer DIR`` (a local Hugging Face tokenizer directory), documents from text files,
  JSON Lines, Parquet or Arrow files, ``datasets`` ``save_to_disk`` directories or ``stdlib``
  (:mod:`mecefo.documents`), tokenised in worker processes with the tokenizer's EOS after each
  document and split by document (:mod:`mecefo.tokenizing`). Without a tokenizer, JSON Lines,
  Parquet, Arrow and datasets sources are byte-level: each document's UTF-8 bytes and a blank line.

The launcher builds the token files once into a cache directory and every replica memory-maps
them. An entry is built in a temporary directory beside it and renamed into place when whole, so
an interrupted build leaves nothing that a later one mistakes for a corpus (its temporary
directory is removed by the next build on the same host). A batch is a pure function of
``(seed, step, shard)``: the start offsets of its sequences come from a counter-based generator
seeded with those three numbers, so any replica can compute any shard's micro-batch (or any range
of its sequences), and a discarded step is replayed exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import socket
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .documents import TEXT, Source, check_sources, find_sources, iter_records
from .tokenizing import (SAMPLE_DOCUMENTS, NoDocuments, TokenizerInfo, check_tokenizer_dir, default_workers,
                         load_tokenizer, tokenise_documents, token_dtype, tokenizer_identity, tokenizer_info)

BYTE_VOCAB = 256
_TEST_DIRS = {"test", "tests", "idle_test"}
_VAL_SEED_OFFSET = 1 << 40  # validation batches use their own stream of the generator
META_FILE = "meta.json"


@dataclass(frozen=True)
class CorpusFiles:
    """The prepared token files of one corpus and what they hold."""

    train: str
    val: str
    dtype: str
    vocab: int  # ids are below it: the tokenizer's len(tokenizer), else the smallest vocabulary holding every token
    fingerprint: str  # sha256 of both splits' bytes: replicas check they train on the same data
    description: str
    tokenizer: str | None = None  # the --tokenizer directory the tokens come from (absolute), if any
    eos: int | None = None  # the tokenizer's EOS id, after every document

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


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# What a build writes into its (temporary) directory: train.bin and val.bin, and returns the CorpusFiles
# fields other than the paths and the fingerprint.
Build = Callable[[Path], dict]


def prepare_corpus(sources: list[str], *, cache_dir: str | Path | None = None, val_percent: float = 5.0,
                   data_dtype: str = "uint16", tokenizer: str | None = None, text_field: str = "text",
                   workers: int | None = None, progress: bool = False) -> CorpusFiles:
    """Build (or reuse) the train / validation token files for ``sources`` (module docstring).

    ``tokenizer``: a local tokenizer directory; ``text_field``: the field of a record that holds its
    document; ``workers``: tokenising processes (default: one per CPU core); ``progress``: a progress bar
    on stderr while tokenising. Bad input raises ValueError (a :class:`mecefo.config.ConfigError` naming
    ``tokenizer`` or ``text_field`` where it is theirs) or OSError, one line.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    tokenizer_dir = check_tokenizer_dir(tokenizer) if tokenizer is not None else None
    tokenizer_key = tokenizer_identity(tokenizer_dir) if tokenizer_dir is not None else None
    if len(sources) == 1 and sources[0].endswith(".bin"):
        key_src, build = _bin_corpus(Path(sources[0]), data_dtype, val_percent, tokenizer_dir)
        key_src += f"|tokenizer={tokenizer_key}" if tokenizer_key else ""
    elif sources == ["stdlib"] and tokenizer_dir is None:
        key_src, build = _stdlib_corpus(val_percent)
    else:
        if sources == ["stdlib"]:
            root = Path(sysconfig.get_paths()["stdlib"])
            found = [Source(TEXT, p) for p in stdlib_sources()]
            stamp = f"stdlib|{sys.version}|{root}|{len(found)}"
            what = f"Python {sys.version.split()[0]} standard library sources ({len(found)} files)"
        else:
            found = find_sources(sources)
            stamp = "|".join(s.stamp() for s in found)
            what = _describe_sources(found)
        if tokenizer_dir is None and all(s.kind == TEXT for s in found):
            key_src, build = _text_corpus(sources, val_percent)
        else:
            key_src = f"documents|{stamp}|{text_field}|{val_percent}|tokenizer={tokenizer_key}"
            build = _document_corpus(found, what, text_field, val_percent, tokenizer_dir,
                                     workers or default_workers(), progress)
    corpus = _cached(cache, hashlib.sha256(key_src.encode()).hexdigest()[:16], build)
    if tokenizer_dir is not None:  # the entry may have been built from an identical tokenizer elsewhere
        corpus = dataclasses.replace(corpus, tokenizer=str(tokenizer_dir))
    return corpus


def _stdlib_corpus(val_percent: float) -> tuple[str, Build]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources()

    def build(out: Path) -> dict:
        train, val = _split_files(root, files, val_percent)
        _write_file(out / "train.bin", train)
        _write_file(out / "val.bin", val)
        return dict(dtype="uint8", vocab=BYTE_VOCAB, description=f"Python {sys.version.split()[0]} standard library "
                                                                 f"sources ({len(files)} files, byte-level)")
    return f"stdlib|{sys.version}|{root}|{len(files)}|{val_percent}", build


def _text_corpus(sources: list[str], val_percent: float) -> tuple[str, Build]:
    root, files = _text_files(sources)
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)

    def build(out: Path) -> dict:
        if len(files) > 1:
            train, val = _split_files(root, files, val_percent)
        else:
            train_arr, val_arr = _split_tail(np.frombuffer(files[0].read_bytes(), np.uint8), val_percent)
            train, val = train_arr.tobytes(), val_arr.tobytes()
        _write_file(out / "train.bin", train)
        _write_file(out / "val.bin", val)
        return dict(dtype="uint8", vocab=BYTE_VOCAB, description=f"{len(files)} text file(s) under {root} (byte-level)")
    return f"text|{stamp}|{val_percent}", build


def _bin_corpus(path: Path, data_dtype: str, val_percent: float, tokenizer_dir: Path | None) -> tuple[str, Build]:
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r}: no such file")
    stat = path.stat()

    def build(out: Path) -> dict:
        data = np.fromfile(path, dtype=np.dtype(data_dtype))
        if data.size == 0:
            raise ValueError(f"--data {path}: empty token file")
        vocab, top = int(data.max()) + 1, {}
        if tokenizer_dir is not None:
            tok = load_tokenizer(tokenizer_dir)
            if vocab > len(tok):
                raise ValueError(f"--data {path}: token id {vocab - 1} is not in --tokenizer {tokenizer_dir} "
                                 f"(vocabulary {len(tok)}): the file was tokenised with another tokenizer")
            vocab, top = len(tok), dict(eos=tok.eos_token_id)
        train, val = _split_tail(data, val_percent)
        _write_file(out / "train.bin", train.tobytes())
        _write_file(out / "val.bin", val.tobytes())
        return dict(dtype=data_dtype, vocab=vocab, description=f"tokenised {path.name} ({data_dtype})", **top)
    return f"bin|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{data_dtype}|{val_percent}", build


def _describe_sources(found: list[Source]) -> str:
    kinds = {}
    for s in found:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    names = {"text": "text file", "jsonl": "JSON Lines file", "parquet": "Parquet file", "arrow": "Arrow file",
             "dataset": "datasets directory"}
    parts = [f"{n} {names[k]}{'s' if n > 1 else ''}" for k, n in kinds.items()]
    where = found[0].path if len(found) == 1 else Path(os.path.commonpath([str(s.path) for s in found]))
    return f"{', '.join(parts)} ({where})"


def _document_corpus(found: list[Source], what: str, text_field: str, val_percent: float,
                     tokenizer_dir: Path | None, workers: int, progress: bool) -> Build:
    def build(out: Path) -> dict:
        total = check_sources(found, text_field)
        records = iter_records(found, text_field)
        info: TokenizerInfo | None = None
        if tokenizer_dir is not None:
            tok = load_tokenizer(tokenizer_dir)
            head = list(itertools.islice(records, SAMPLE_DOCUMENTS))
            info = tokenizer_info(tok, tokenizer_dir, [t for t in head if t is not None])
            del tok
            records = itertools.chain(head, records)
        try:
            done = tokenise_documents(records, out, info, val_percent=val_percent, workers=workers, total=total,
                                      progress=progress)
        except NoDocuments:
            empty = (f"every record's --text-field {text_field!r} is empty" if any(s.kind != TEXT for s in found)
                     else "every file is empty")
            raise ValueError(f"--data {what}: no documents ({empty})") from None
        how = (f"tokenised with {tokenizer_dir.name} (vocabulary {info.vocab})" if info is not None else "byte-level")
        description = (f"{done.train_documents + done.val_documents} documents ({done.val_documents} for validation) "
                       f"from {what}, {how}")
        if info is None:
            return dict(dtype="uint8", vocab=BYTE_VOCAB, description=description)
        return dict(dtype=token_dtype(info.vocab), vocab=info.vocab, description=description,
                    tokenizer=info.path, eos=info.eos)
    return build


def _cached(cache: Path, key: str, build: Build) -> CorpusFiles:
    """The cache entry ``key``: read if whole, else built by ``build`` in a temporary directory beside it and
    renamed into place (a concurrent build of the same entry that finished first wins)."""
    out = cache / "corpus" / key
    if (out / META_FILE).is_file():
        return CorpusFiles(**json.loads((out / META_FILE).read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = out.with_name(f".{key}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fields = build(tmp)
        digest = hashlib.sha256()
        for name in ("train.bin", "val.bin"):
            with open(tmp / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
        meta = CorpusFiles(train=str(out / "train.bin"), val=str(out / "val.bin"), fingerprint=digest.hexdigest(),
                           **fields)
        _write_file(tmp / META_FILE, (json.dumps(meta.as_dict(), indent=2) + "\n").encode())
        if out.is_dir() and not (out / META_FILE).is_file():
            shutil.rmtree(out)  # an entry an older version left half-written
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / META_FILE).is_file():
                raise
        return CorpusFiles(**json.loads((out / META_FILE).read_text()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_builds(out: Path) -> None:
    """Remove temporary directories of builds of ``out`` that died on this host (their process is gone);
    another host's are left alone (a shared cache directory)."""
    prefix = f".{out.name}.tmp-{socket.gethostname()}-"
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        if not tmp.name.startswith(prefix):
            continue
        try:
            os.kill(int(tmp.name[len(prefix):]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


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
        if corpus.vocab > vocab_size and corpus.tokenizer is not None:
            raise ValueError(f"the tokenizer {corpus.tokenizer} has {corpus.vocab} tokens but the model's vocabulary "
                             f"is {vocab_size}: use a model whose vocabulary holds the tokenizer's")
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
