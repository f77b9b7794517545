"""Sharded checkpoints of a replica group (``--shard fsdp``): torch.distributed.checkpoint (DCP) directories.

A checkpoint is the directory ``step_<step:08d>.dcp`` in the checkpoint directory, holding DCP's
files (``__<rank>_0.distcp``, one per rank of the writing group, and ``.metadata``) and
``lineage.json``, the record that makes it a checkpoint: format, step, lineage, the writing group's
size, the trainer's and torchft's counters, and the byte count and sha256 of every file.

Saving (every rank of the writing group, collectives on the group's own process group):

1. rank 0 runs the lineage guard (as :func:`mecefo.checkpoint.check_replaceable`: never replace
   an intact checkpoint of another lineage, never write behind an intact newer one) and picks a
   temporary directory; every rank learns both (a refused save raises
   :class:`~mecefo.checkpoint.StaleCheckpointError` on every rank);
2. ``dcp.save`` into the temporary directory: each rank writes its shards (fsynced);
3. the files are hashed, each rank a share of them, in parallel;
4. rank 0 renames the directory to its final name, then writes the record (temporary file,
   fsync, rename, directory fsync). A crash before the record leaves a directory without one:
   not a checkpoint (reported, skipped), never a half-written one taken for whole.

Loading (:func:`load_latest_sharded`): the newest directory whose record exists and whose files
all have the recorded sizes and sha256 (checked by the ranks in parallel, agreed by all) is loaded
with ``dcp.load`` straight into the model's shards and the optimizer's state; a truncated or
corrupt one is reported (``checkpoint .../step_00000020.dcp is corrupt: __1_0.distcp holds 1234
bytes, its record says 5678; falling back to the previous checkpoint (step_00000010.dcp)``) and the
previous one is tried. The state is saved under parameter names, so a group of another size loads
it too: DCP reads each rank's rows from whatever files hold them (resharding).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import CheckpointCorruptError, SavedCheckpoint, StaleCheckpointError, fsync_dir, guard_lineage

RECORD = "lineage.json"
FORMAT = "mecefo-dcp-1"
_NAME = re.compile(r"^step_(\d{8})\.dcp$")


def sharded_checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.dcp"


def list_sharded(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every sharded checkpoint directory in ``directory``, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _share(names: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of the files to hash or check: every ``world_size``-th, from the ``rank``-th."""
    return sorted(names)[rank::world_size]


def read_record(path: Path) -> dict:
    """The record of checkpoint directory ``path``; CheckpointCorruptError if it is missing or unreadable."""
    try:
        record = json.loads((path / RECORD).read_text())
    except FileNotFoundError:
        raise CheckpointCorruptError(f"checkpoint {path} has no {RECORD}: its save did not finish") from None
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"checkpoint {path} has an unreadable {RECORD}: {e}") from None
    if record.get("format") != FORMAT:
        raise CheckpointCorruptError(f"checkpoint {path} has a {RECORD} of format {record.get('format')!r}, "
                                     f"expected {FORMAT!r}")
    return record


def check_files(path: Path, record: dict, names: list[str]) -> str | None:
    """Why the files ``names`` of checkpoint ``path`` do not match its record (None: they do)."""
    for name in names:
        expected = record["files"][name]
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            return f"checkpoint {path} is incomplete: {name} is missing"
        if size != expected["bytes"]:
            return f"checkpoint {path} is truncated: {name} holds {size} bytes, its record says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"checkpoint {path} is corrupt: the sha256 of {name} does not match its record"
    return None


def verify(path: Path) -> dict:
    """The record of an intact checkpoint directory (every file checked here); CheckpointCorruptError if not."""
    record = read_record(path)
    problem = check_files(path, record, list(record["files"]))
    if problem:
        raise CheckpointCorruptError(problem)
    return record


def check_replaceable_sharded(directory: str | Path, step: int, lineage: str) -> None:
    """The lineage guard of :func:`mecefo.checkpoint.check_replaceable`, for sharded checkpoints."""
    guard_lineage(list_sharded(directory), step, lineage, verify)


# ---- the state DCP saves: parameter names, not positions (so another group size can load it) ----

def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its state_dict's index order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, bases: dict) -> dict:
    """What DCP saves: the model's (sharded) state_dict, the AdamW state by parameter name, the bases."""
    names = _param_names(model, optimizer)
    optim = optimizer.state_dict()["state"]
    state = {"model": model.state_dict(), "optimizer": {names[int(i)]: dict(s) for i, s in optim.items()}}
    if bases:
        state["bases"] = dict(bases)
    return state


def save_sharded(directory: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict, *, lineage: str, process_group) -> SavedCheckpoint:
    """Save the checkpoint of ``step`` (every rank of the group calls this; module docstring).

    ``extra``: ``bases`` (tensors, saved by DCP) and JSON-able entries (``trainer``, ``manager``: in the
    record)."""
    import torch.distributed.checkpoint as dcp

    start = time.perf_counter()
    directory = Path(directory)
    rank, world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
    plan: list = [None, None]  # [refusal, temporary directory], decided by rank 0
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            check_replaceable_sharded(directory, step, lineage)
            plan[1] = str(directory / f".step_{step:08d}.dcp.tmp-{uuid.uuid4().hex[:12]}")
        except StaleCheckpointError as e:
            plan[0] = str(e)
    dist.broadcast_object_list(plan, src=0, group=process_group)
    if plan[0] is not None:
        raise StaleCheckpointError(plan[0])
    tmp = Path(plan[1])
    state = checkpoint_state(model, optimizer, extra.get("bases") or {})
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True,
                                                        thread_count=1),
             process_group=process_group)
    names = sorted(p.name for p in tmp.iterdir())
    mine = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in _share(names, rank, world_size)}
    shares: list = [None] * world_size
    dist.all_gather_object(shares, mine, group=process_group)
    final = sharded_checkpoint_path(directory, step)
    done: list = [None]
    if rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        record = {"format": FORMAT, "step": step, "lineage": lineage, "group_size": world_size,
                  **{k: v for k, v in extra.items() if k != "bases"}, "files": dict(sorted(files.items()))}
        if final.exists():  # a corrupt one, or this lineage's own (a replayed step): the guard allowed it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(directory)
        record_tmp = final / f".{RECORD}.tmp"
        with open(record_tmp, "w") as f:
            f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(record_tmp, final / RECORD)
        fsync_dir(final)
        done[0] = sum(entry["bytes"] for entry in files.values())
    dist.broadcast_object_list(done, src=0, group=process_group)  # the checkpoint exists for every rank
    return SavedCheckpoint(final, step, done[0], time.perf_counter() - start)


def _verify_together(path: Path, process_group) -> tuple[dict | None, str | None]:
    """(record, None) if checkpoint ``path`` is intact, else (None, why): every rank checks its share of
    the files and all agree."""
    rank, world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
    found: list = [None, None]
    if rank == 0:
        try:
            found[0] = read_record(path)
        except CheckpointCorruptError as e:
            found[1] = str(e)
    dist.broadcast_object_list(found, src=0, group=process_group)
    record, problem = found
    if problem:
        return None, problem
    mine = check_files(path, record, _share(list(record["files"]), rank, world_size))
    problems: list = [None] * world_size
    dist.all_gather_object(problems, mine, group=process_group)
    problem = next((p for p in problems if p), None)
    return (None, problem) if problem else (record, None)


def _load_targets(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> dict:
    """Tensors for ``dcp.load`` to fill: the model's own shards (loaded in place), and, for what the
    checkpoint holds of the optimizer and the bases, tensors shaped and sharded like their parameters."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    params = dict(model.named_parameters())
    optim: dict[str, dict] = {}
    bases: dict[str, torch.Tensor] = {}
    for key, meta in metadata.items():
        kind, _, rest = key.partition(".")
        if kind == "optimizer":
            name, _, field = rest.rpartition(".")
            if name not in params:
                raise CheckpointCorruptError(f"checkpoint {path} holds optimizer state of {name}, which this "
                                             "model does not have")
            p = params[name]
            optim.setdefault(name, {})[field] = (torch.zeros_like(p) if tuple(meta.size) == tuple(p.shape)
                                                 else torch.zeros(meta.size, dtype=meta.properties.dtype))
        elif kind == "bases":
            bases[rest] = torch.zeros(meta.size, dtype=meta.properties.dtype, device=next(model.parameters()).device)
    state = {"model": model.state_dict(), "optimizer": optim}
    if bases:
        state["bases"] = bases
    return state


def load_latest_sharded(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                        warn: Callable[[str], None], process_group) -> tuple[dict, Path] | None:
    """Load the newest intact sharded checkpoint into ``model`` and ``optimizer`` (every rank of the group
    calls this): (its other entries: ``bases``, ``trainer``, ``manager``; its path), or None if none is
    intact. Each corrupt newer one is reported through ``warn`` (by rank 0) with the fallback."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank(process_group)
    candidates = list_sharded(directory)
    for i, (_, path) in enumerate(candidates):
        record, problem = _verify_together(path, process_group)
        if problem:
            if rank == 0:
                fallback = candidates[i + 1][1].name if i + 1 < len(candidates) else "none left: starting from scratch"
                warn(f"{problem}; falling back to the previous checkpoint ({fallback})")
            continue
        state = _load_targets(model, optimizer, path)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)), process_group=process_group)
        names = _param_names(model, optimizer)
        index = {name: i for i, name in enumerate(names)}
        optimizer.load_state_dict({"param_groups": optimizer.state_dict()["param_groups"],
                                   "state": {index[name]: s for name, s in state["optimizer"].items()}})
        extra = {k: v for k, v in record.items() if k not in ("format", "step", "lineage", "group_size", "files")}
        extra["bases"] = state.get("bases", {})
        return extra, path
    return None


def read_sharded_checkpoint(path: str | Path) -> dict:
    """The whole state of an intact sharded checkpoint in one process, no process group: ``model`` (full
    tensors by name), ``optimizer`` (by parameter name), ``bases``, and the record's entries.
    CheckpointCorruptError if it is not intact. For tests, reports and export."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    record = verify(path)
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state: dict = {}
    for key, meta in metadata.items():  # DCP's keys: model.<name>, optimizer.<name>.<field>, bases.<name>
        kind, _, rest = key.partition(".")
        tensor = torch.zeros(meta.size, dtype=meta.properties.dtype)
        if kind == "optimizer":
            name, _, field = rest.rpartition(".")
            state.setdefault(kind, {}).setdefault(name, {})[field] = tensor
        else:
            state.setdefault(kind, {})[rest] = tensor
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is what we mean
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return {**state, **{k: v for k, v in record.items() if k != "files"}}


def prune_sharded(directory: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest sharded checkpoints, and temporary directories of saves that
    never finished and are older than the newest kept one."""
    kept = list_sharded(directory)
    for _, path in kept[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    if kept:
        newest = kept[0][0]
        for tmp in Path(directory).glob(".step_*.dcp.tmp-*"):
            if int(tmp.name[6:14]) < newest:
                shutil.rmtree(tmp, ignore_errors=True)


def check_resume_format(directory: str | Path, shard: str) -> None:
    """Refuse (ConfigError naming ``shard``) a ``--resume`` whose checkpoint directory holds only checkpoints of
    the other ``--shard``: whole-state files (``none``) cannot feed a sharded group's load, nor the reverse."""
    from .checkpoint import list_checkpoints
    from .config import ConfigError

    files, dirs = list_checkpoints(directory), list_sharded(directory)
    if shard == "fsdp" and files and not dirs:
        raise ConfigError("shard", f"{directory} holds whole-state checkpoints ({files[0][1].name}: written with "
                                   "--shard none); resume it with --shard none")
    if shard != "fsdp" and dirs and not files:
        raise ConfigError("shard", f"{directory} holds sharded checkpoints ({dirs[0][1].name}: written with "
                                   "--shard fsdp); resume it with --shard fsdp")
