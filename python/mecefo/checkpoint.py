"""Checkpoints: written atomically, verified on load, newest valid one wins.

File format: a 48-byte header (8-byte magic, sha256 of the payload, payload length as uint64
little-endian) followed by the payload (``torch.save`` of the state dict). Writing goes to a
temporary file in the same directory, which is fsynced, renamed over the final name and the
directory fsynced, so a crash leaves either the old file or the complete new one. On load the
magic, the length and the checksum are verified; a truncated or corrupt file raises
:class:`CheckpointCorruptError` naming the file and what is wrong, and :func:`load_latest`
falls back to the previous checkpoint, saying so.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MAGIC = b"MECEFOC1"
_HEADER = struct.Struct("<8s32sQ")
_NAME = re.compile(r"^step_(\d{8})\.ckpt$")


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file is truncated, corrupt or not a checkpoint."""


@dataclass(frozen=True)
class SavedCheckpoint:
    path: Path
    step: int
    nbytes: int
    seconds: float


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.ckpt"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, step: int, state: dict) -> SavedCheckpoint:
    """Write ``state`` as the checkpoint of ``step`` (atomically; see the module docstring)."""
    start = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = _HEADER.pack(MAGIC, hashlib.sha256(payload).digest(), len(payload))
    path = checkpoint_path(directory, step)
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
    return SavedCheckpoint(path, step, len(header) + len(payload), time.perf_counter() - start)


def read_checkpoint(path: str | Path) -> dict:
    """The state dict stored at ``path``, verified; CheckpointCorruptError if it is not intact."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise CheckpointCorruptError(f"checkpoint {path} is truncated: {len(data)} bytes, shorter than "
                                     f"its {_HEADER.size}-byte header")
    magic, digest, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointCorruptError(f"checkpoint {path} is not a mecefo checkpoint (magic {magic!r}, "
                                     f"expected {MAGIC!r})")
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) != length:
        raise CheckpointCorruptError(f"checkpoint {path} is truncated: its header promises {length} payload "
                                     f"bytes, the file holds {len(payload)}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointCorruptError(f"checkpoint {path} is corrupt: the sha256 of its payload does not "
                                     "match the one in its header")
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
