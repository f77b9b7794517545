"""Checkpoints: written atomically, verified on load, newest valid one wins, never replaced by another branch.

File format: a 52-byte header (8-byte magic, sha256 of everything after the header, payload
length as uint64 and metadata length as uint32, little-endian), the metadata (JSON: the step and
the lineage of the state, see :mod:`mecefo.fencing`), then the payload (``torch.save`` of the
state dict). Files of the first format (magic ``MECEFOC1``: 48-byte header, no metadata) are
still read. Writing goes to a temporary file in the same directory, which is fsynced, renamed
over the final name and the directory fsynced, so a crash leaves either the old file or the
complete new one. On load the magic, the lengths and the checksum are verified; a truncated or
corrupt file raises :class:`CheckpointCorruptError` naming the file and what is wrong, and
:func:`load_latest` falls back to the previous checkpoint, saying so.

Lineage guard: given the lineage of the state it writes, :func:`save_checkpoint` refuses
(:class:`StaleCheckpointError`) to write step ``s`` when an intact checkpoint of a later step
exists, or one of step ``s`` from another lineage: that file belongs to a branch of the job
this writer is not on (a replica that woke from a hang after the job moved on), and replacing
it would lose the job's state. Corrupt files are replaced freely.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MAGIC = b"MECEFOC2"
MAGIC_V1 = b"MECEFOC1"  # no metadata: read, never written
_HEADER = struct.Struct("<8s32sQI")
_HEADER_V1 = struct.Struct("<8s32sQ")
_NAME = re.compile(r"^step_(\d{8})\.ckpt$")


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file is truncated, corrupt or not a checkpoint."""


class StaleCheckpointError(RuntimeError):
    """A checkpoint would replace an intact one of another lineage (or hide a newer one)."""


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    step: int
    nbytes: int
    seconds: float


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.ckpt"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(directory: str | Path, step: int, lineage: str) -> None:
    """The lineage guard: :class:`StaleCheckpointError` if writing ``step`` of ``lineage`` would replace
    an intact checkpoint of another lineage or be older than an intact one (module docstring)."""
    guard_lineage(list_checkpoints(directory), step, lineage, lambda path: _verified(path)[0])


def guard_lineage(found: list[tuple[int, Path]], step: int, lineage: str, record_of: Callable[[Path], dict]) -> None:
    """The lineage guard over ``found`` ((step, path) newest first, of either checkpoint format);
    ``record_of(path)`` returns a checkpoint's verified record (its ``lineage``) or raises
    :class:`CheckpointCorruptError` / OSError, and such a checkpoint is unusable anyway: replaced or left
    for pruning."""
    for existing, path in found:
        if existing < step:
            return
        try:
            record = record_of(path)
        except (CheckpointCorruptError, OSError):
            continue
        if existing > step:
            raise StaleCheckpointError(f"not writing the checkpoint of step {step}: {path.name} (step {existing}) "
                                       "is newer and intact, so this state is behind the job's")
        if record.get("lineage") != lineage:
            raise StaleCheckpointError(f"not replacing {path.name}: it holds lineage {record.get('lineage')}, this "
                                       f"state is lineage {lineage} (another branch of the job)")


def save_checkpoint(directory: str | Path, step: int, state: dict, lineage: str | None = None) -> SavedCheckpoint:
    """Write ``state`` as the checkpoint of ``step`` (atomically; see the module docstring).

    With ``lineage``, the lineage guard runs first (:func:`check_replaceable`) and the lineage is
    stored in the file's metadata.
    """
    start = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if lineage is not None:
        check_replaceable(directory, step, lineage)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    meta = json.dumps({"step": step, "lineage": lineage}).encode()
    digest = hashlib.sha256(meta)
    digest.update(payload)
    header = _HEADER.pack(MAGIC, digest.digest(), len(payload), len(meta))
    path = checkpoint_path(directory, step)
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(meta)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)
    return SavedCheckpoint(path, step, len(header) + len(meta) + len(payload), time.perf_counter() - start)


def _verified(path: Path) -> tuple[dict, memoryview]:
    """(metadata, payload bytes) of an intact checkpoint file; CheckpointCorruptError otherwise."""
    data = path.read_bytes()
    magic = data[:8]
    header = _HEADER_V1 if magic == MAGIC_V1 else _HEADER
    if len(data) < header.size:
        raise CheckpointCorruptError(f"checkpoint {path} is truncated: {len(data)} bytes, shorter than "
                                     f"its {header.size}-byte header")
    if magic not in (MAGIC, MAGIC_V1):
        raise CheckpointCorruptError(f"checkpoint {path} is not a mecefo checkpoint (magic {magic!r}, "
                                     f"expected {MAGIC!r})")
    if magic == MAGIC_V1:
        _, digest, length = header.unpack_from(data)
        meta_length = 0
    else:
        _, digest, length, meta_length = header.unpack_from(data)
    body = memoryview(data)[header.size:]
    if len(body) != meta_length + length:
        raise CheckpointCorruptError(f"checkpoint {path} is truncated: its header promises {length} payload "
                                     f"bytes, the file holds {max(0, len(body) - meta_length)}")
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointCorruptError(f"checkpoint {path} is corrupt: the sha256 of its payload does not "
                                     "match the one in its header")
    meta = json.loads(bytes(body[:meta_length])) if meta_length else {}
    return meta, body[meta_length:]


def read_checkpoint(path: str | Path) -> dict:
    """The state dict stored at ``path``, verified; CheckpointCorruptError if it is not intact."""
    path = Path(path)
    _, payload = _verified(path)
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # intact bytes that torch cannot decode: still unusable
        raise CheckpointCorruptError(f"checkpoint {path} could not be decoded: {e}") from e


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in ``directory``, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def load_latest(directory: str | Path, warn: Callable[[str], None] = print) -> tuple[dict, Path] | None:
    """The newest intact checkpoint in ``directory`` (and its path), or None if there is none.

    Every corrupt newer file is reported through ``warn`` with the reason and the fallback.
    """
    candidates = list_checkpoints(directory)
    for i, (_, path) in enumerate(candidates):
        try:
            return read_checkpoint(path), path
        except CheckpointCorruptError as e:
            fallback = candidates[i + 1][1].name if i + 1 < len(candidates) else "none left: starting from scratch"
            warn(f"{e}; falling back to the previous checkpoint ({fallback})")
    return None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for _, path in list_checkpoints(directory)[keep:]:
        path.unlink(missing_ok=True)
