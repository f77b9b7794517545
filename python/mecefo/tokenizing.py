"""Documents to token files: a tokenizer (or bytes) over worker processes, split by document.

Each document becomes ``tokenizer(document)["input_ids"]`` (the tokenizer's own special tokens, e.g. a
BOS, included) followed by the tokenizer's EOS token (not doubled when the tokenizer appends one
itself). Without a tokenizer a document is its UTF-8 bytes followed by a blank line (``\\n\\n``).

The train / validation split is by document and depends on nothing but the document's text: a
document is in validation when ``int(sha1(text)[:8], 16) % 10000 < val_percent * 100`` (so a
duplicated document never lands on both sides, and neither the worker count nor the order of files
on disk moves one). Should that leave a split without any document, the train document of smallest
``int(sha1(text)[:16], 16)`` moves to validation (or the validation one of largest to train); a
single document is split by its tokens' tail (as a ``.bin`` file is).

Workers are ``spawn``ed processes (a fast tokenizer's Rust thread pool does not survive ``fork``),
each with the tokenizer's own parallelism off: ``workers`` processes, one core each. The launcher's
process reads the documents, hands chunks of them out and writes the results in document order.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError

BYTE_SEPARATOR = (10, 10)  # "\n\n" after each byte-level document
CHUNK_DOCUMENTS = 256  # documents per unit of work handed to a worker ...
CHUNK_CHARS = 1 << 20  # ... or fewer, once they hold this much text
SAMPLE_DOCUMENTS = 16  # the first documents, encoded both ways to check the worker's encoder
# files in a tokenizer directory that are model weights, not the tokenizer: left out of its identity
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz"}


def default_workers() -> int:
    """One tokenising process per CPU core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def token_dtype(vocab: int) -> str:
    """The narrowest element type of the token files that holds ids below ``vocab``."""
    return "uint8" if vocab <= 1 << 8 else "uint16" if vocab <= 1 << 16 else "uint32"


def check_tokenizer_dir(value: str) -> Path:
    """``--tokenizer``'s directory, or ConfigError: tokenizers are read from local files only."""
    path = Path(value)
    if not path.is_dir():
        raise ConfigError("tokenizer", f"--tokenizer {value!r} is not a local directory: tokenizers are read from "
                                       "disk only, nothing is downloaded at run time (save one with "
                                       "AutoTokenizer.from_pretrained(...).save_pretrained(DIR) where there is a "
                                       "network, and pass DIR)")
    try:
        names = os.listdir(path)
    except OSError as e:
        raise ConfigError("tokenizer", f"--tokenizer {value!r}: cannot read the directory ({e.strerror or e})") \
            from None
    if not names:
        raise ConfigError("tokenizer", f"--tokenizer {value!r} is an empty directory (no tokenizer.json or "
                                       "tokenizer_config.json)")
    return path.resolve()


def tokenizer_identity(path: Path) -> str:
    """sha256 over the tokenizer directory's files (name and content; model weights left out) and the
    versions of the libraries that tokenise: a cache entry is reused only for the same tokenisation."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        file = path / name
        if name.startswith(".") or not file.is_file() or file.suffix in _WEIGHT_SUFFIXES:
            continue
        try:
            content = file.read_bytes()
        except OSError as e:
            raise ConfigError("tokenizer", f"--tokenizer {path}: cannot read {name} ({e.strerror or e})") from None
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    for module in ("tokenizers", "transformers"):
        try:
            digest.update(f"{module}={__import__(module).__version__}".encode())
        except ImportError:
            pass
    return digest.hexdigest()


@dataclass(frozen=True)
class TokenizerInfo:
    """What the corpus records of a tokenizer, and how workers rebuild it (:class:`Encoder`)."""

    path: str
    vocab: int  # len(tokenizer): every id it can produce, added tokens included
    eos: int
    backend: str | None  # the Rust tokenizer as JSON when the workers may use it directly, else None
    split_special_tokens: bool


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: nothing to fetch, ever
    try:
        import transformers
    except ImportError:
        raise ConfigError("tokenizer", "--tokenizer needs transformers and tokenizers: pip install "
                                       "'mecefo_kernels[data]'") from None
    return transformers


def load_tokenizer(path: Path):
    """``AutoTokenizer.from_pretrained(path)`` from local files only; ConfigError naming the directory."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (whatever loading raises, one line naming --tokenizer)
        text = str(e).strip().splitlines()
        raise ConfigError("tokenizer", f"--tokenizer {path}: cannot load a tokenizer from it ({type(e).__name__}: "
                                       f"{text[0] if text else ''})") from None


def tokenizer_info(tokenizer, path: Path, sample: list[str]) -> TokenizerInfo:
    """The corpus's view of ``tokenizer``: ConfigError without an EOS token. Workers use the Rust tokenizer
    directly (no transformers import, no Python per document) when it encodes ``sample`` exactly as
    ``tokenizer(sample)`` does; otherwise they load the tokenizer with transformers."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer", f"--tokenizer {path} has no EOS token (eos_token in tokenizer_config.json): "
                                       "documents are separated by it")
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    info = TokenizerInfo(str(path), len(tokenizer), int(tokenizer.eos_token_id),
                         backend.to_str() if backend is not None else None, split)
    if info.backend is not None and sample:
        with _tokenizers_parallelism_off():  # no Rust thread pool in this process: it forks later (replicas)
            reference = tokenizer(sample, add_special_tokens=True, verbose=False)["input_ids"]
            same = Encoder(info).ids(sample) == [list(ids) for ids in reference]
        if not same:
            info = TokenizerInfo(info.path, info.vocab, info.eos, None, split)
    return info


class _tokenizers_parallelism_off:
    def __enter__(self):
        self.before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def __exit__(self, *exc):
        if self.before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.before


class NoDocuments(ValueError):
    """The sources held no document (only empty ones, or none at all)."""


@dataclass
class EncodedChunk:
    """A chunk of documents, encoded: ``tokens`` all documents' tokens end to end; per document its
    ``lengths``, whether it is ``in_val``, and its ``keys`` (the split's tie-breaker)."""

    tokens: np.ndarray
    lengths: np.ndarray
    in_val: np.ndarray
    keys: np.ndarray


class Encoder:
    """Documents to token ids in a worker: the Rust tokenizer, transformers' tokenizer, or bytes (None)."""

    def __init__(self, info: TokenizerInfo | None):
        self.info = info
        self.eos = None if info is None else info.eos
        self.vocab = 256 if info is None else info.vocab
        self.dtype = np.dtype(token_dtype(self.vocab))
        self.rust = self.hf = None
        if info is not None and info.backend is not None:
            from tokenizers import Tokenizer

            self.rust = Tokenizer.from_str(info.backend)
            self.rust.no_truncation()
            self.rust.no_padding()
            self.rust.encode_special_tokens = info.split_special_tokens
        elif info is not None:
            self.hf = _transformers().AutoTokenizer.from_pretrained(info.path, local_files_only=True)

    def ids(self, texts: list[str]) -> list[list[int]]:
        if self.rust is not None:
            return [e.ids for e in self.rust.encode_batch(texts, add_special_tokens=True)]
        encoded = self.hf(texts, add_special_tokens=True, return_attention_mask=False, verbose=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def chunk(self, texts: list[str], val_percent: float) -> EncodedChunk:
        if self.info is None:
            parts = [np.frombuffer(t.encode("utf-8") + bytes(BYTE_SEPARATOR), np.uint8) for t in texts]
        else:
            parts = [np.asarray(ids if ids and ids[-1] == self.eos else [*ids, self.eos], dtype=self.dtype)
                     for ids in self.ids(texts)]
        digests = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        return EncodedChunk(
            tokens=np.concatenate(parts).astype(self.dtype, copy=False),
            lengths=np.array([len(p) for p in parts], dtype=np.int64),
            in_val=np.array([int(d[:8], 16) % 10000 < val_percent * 100 for d in digests], dtype=bool),
            keys=np.array([int(d[:16], 16) for d in digests], dtype=np.uint64))


_worker: tuple[Encoder, float] | None = None


def _start_worker(info: TokenizerInfo | None, val_percent: float) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent cleans up
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    _worker = (Encoder(info), val_percent)


def _encode_in_worker(texts: list[str]) -> EncodedChunk:
    encoder, val_percent = _worker
    return encoder.chunk(texts, val_percent)


def chunks(records: Iterable[str | None]) -> Iterator[tuple[list[str], int]]:
    """(documents, records consumed) in bounded chunks; empty records are skipped but counted."""
    texts: list[str] = []
    chars = records_seen = 0
    for text in records:
        records_seen += 1
        if text is None:
            continue
        texts.append(text)
        chars += len(text)
        if len(texts) >= CHUNK_DOCUMENTS or chars >= CHUNK_CHARS:
            yield texts, records_seen
            texts, chars, records_seen = [], 0, 0
    if texts or records_seen:
        yield texts, records_seen


class SplitWriter:
    """Appends encoded chunks to ``train.bin`` and ``val.bin`` in ``directory`` (document order kept within
    each), remembering what :meth:`finish` needs to give both splits a document."""

    def __init__(self, directory: Path, dtype: np.dtype):
        self.dtype = dtype
        self.paths = {False: directory / "train.bin", True: directory / "val.bin"}
        self.files = {v: open(p, "wb") for v, p in self.paths.items()}
        self.tokens = {False: 0, True: 0}
        self.documents = {False: 0, True: 0}
        # per split, the document that moves should the other split end up empty: (key, offset, length)
        self.mover: dict[bool, tuple[int, int, int] | None] = {False: None, True: None}

    def add(self, chunk: EncodedChunk) -> None:
        token_in_val = np.repeat(chunk.in_val, chunk.lengths)
        for val in (False, True):
            docs = np.flatnonzero(chunk.in_val == val)
            if not len(docs):
                continue
            lengths, keys = chunk.lengths[docs], chunk.keys[docs]
            pick = int(np.argmax(keys) if val else np.argmin(keys))
            offset = self.tokens[val] + int(lengths[:pick].sum())
            best = self.mover[val]
            if best is None or (keys[pick] > best[0] if val else keys[pick] < best[0]):
                self.mover[val] = (int(keys[pick]), offset, int(lengths[pick]))
            chunk.tokens[token_in_val == val].tofile(self.files[val])
            self.tokens[val] += int(lengths.sum())
            self.documents[val] += len(docs)

    def close(self) -> None:
        for f in self.files.values():
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()

    def finish(self, val_percent: float) -> tuple[int, int]:
        """Close both files, each split holding at least one document (or, from one document, a tail of its
        tokens); (train documents, validation documents)."""
        self.close()
        n_train, n_val = self.documents[False], self.documents[True]
        if n_train + n_val == 0:
            raise NoDocuments("no documents")
        if n_train + n_val == 1:
            source = True if n_val else False
            tokens = np.fromfile(self.paths[source], dtype=self.dtype)
            cut = max(1, int(len(tokens) * val_percent / 100))
            if len(tokens) > cut:
                self._rewrite(False, tokens[:-cut])
                self._rewrite(True, tokens[-cut:])
            return 1, 1
        if n_val == 0 or n_train == 0:
            source = n_train == 0  # the split that holds every document
            _, offset, length = self.mover[source]
            tokens = np.memmap(self.paths[source], dtype=self.dtype, mode="r")
            self._rewrite(not source, np.array(tokens[offset:offset + length]))
            self._rewrite(source, np.concatenate([tokens[:offset], tokens[offset + length:]]))
            del tokens
            return (n_train - 1, 1) if n_val == 0 else (1, n_val - 1)
        return n_train, n_val

    def _rewrite(self, val: bool, tokens: np.ndarray) -> None:
        tmp = self.paths[val].with_suffix(".rewrite")
        with open(tmp, "wb") as f:
            tokens.astype(self.dtype, copy=False).tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.paths[val])


@dataclass(frozen=True)
class TokenisedSplits:
    train_documents: int
    val_documents: int
    tokens: int
    seconds: float


def tokenise_documents(records: Iterable[str | None], directory: Path, info: TokenizerInfo | None, *,
                       val_percent: float, workers: int, total: int | None = None,
                       progress: bool = False) -> TokenisedSplits:
    """Encode ``records`` into ``directory``/train.bin and val.bin (:class:`SplitWriter`). With a tokenizer,
    in ``workers`` spawned processes; bytes are encoded here. Any failure stops the workers and propagates
    (the caller owns ``directory`` and removes it)."""
    started = time.perf_counter()
    encoder_here = Encoder(None) if info is None else None
    writer = SplitWriter(directory, np.dtype(token_dtype(256 if info is None else info.vocab)))
    bar = _progress_bar(total, progress)
    pool = None
    try:
        if info is not None:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_worker, initargs=(info, val_percent))
        pending: deque = deque()
        window = 2 * workers + 1

        def drain(until: int) -> None:
            while len(pending) > until:
                result, consumed = pending.popleft()  # a chunk, its future, or None (empty records only)
                chunk = result.result() if pool is not None and result is not None else result
                if chunk is not None:
                    writer.add(chunk)
                _advance(bar, consumed, 0 if chunk is None else int(chunk.lengths.sum()), started)

        for texts, consumed in chunks(records):
            if not texts:
                pending.append((None, consumed))
            elif pool is None:
                pending.append((encoder_here.chunk(texts, val_percent), consumed))
            else:
                pending.append((pool.submit(_encode_in_worker, texts), consumed))
            drain(window)
        drain(0)
        train_docs, val_docs = writer.finish(val_percent)
    except BrokenProcessPool as e:
        raise ChildProcessError(f"a tokenising worker process died ({e}); nothing was cached, run again") from None
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        if pool is not None:
            _stop(pool)
    return TokenisedSplits(train_docs, val_docs, writer.tokens[False] + writer.tokens[True],
                           time.perf_counter() - started)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now, even mid-chunk (an error or Ctrl-C in the parent: nothing waits for them)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # terminate_workers() from Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


def _progress_bar(total: int | None, progress: bool):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=" doc", desc="tokenising", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def _advance(bar, records: int, tokens: int, started: float) -> None:
    if bar is None:
        return
    bar.update(records)
    bar.tokens = getattr(bar, "tokens", 0) + tokens
    bar.set_postfix_str(f"{bar.tokens / max(time.perf_counter() - started, 1e-9) / 1e3:.1f}k tokens/s", refresh=False)
