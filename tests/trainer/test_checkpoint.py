"""Atomic checkpoints: round trip, truncation and corruption detected with a clear message, fallback,
and the lineage guard (a checkpoint is never replaced by another branch's)."""

import hashlib
import io
import struct

import pytest
import torch

from mecefo.checkpoint import (MAGIC_V1, CheckpointCorruptError, StaleCheckpointError, checkpoint_path, guard_lineage,
                               list_checkpoints, load_latest, prune_checkpoints, read_checkpoint, save_checkpoint)


def state(step):
    return {"model": {"w": torch.full((3, 4), float(step), dtype=torch.float64)}, "trainer": {"step": step},
            "optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 0.1,
                          "betas": (0.9, 0.95), "params": [0]}]}}


def test_round_trip_and_no_temporary_left(tmp_path):
    saved = save_checkpoint(tmp_path, 7, state(7))
    assert saved.path == checkpoint_path(tmp_path, 7) and saved.nbytes == saved.path.stat().st_size
    loaded = read_checkpoint(saved.path)
    assert torch.equal(loaded["model"]["w"], state(7)["model"]["w"]) and loaded["trainer"] == {"step": 7}
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000007.ckpt"]


def test_truncated_checkpoint_is_detected(tmp_path):
    path = save_checkpoint(tmp_path, 3, state(3)).path
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointCorruptError, match=r"step_00000003.ckpt is truncated: its header promises \d+ "
                                                     r"payload bytes, the file holds \d+"):
        read_checkpoint(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointCorruptError, match="is truncated: 20 bytes, shorter than its 52-byte header"):
        read_checkpoint(path)


def test_corrupt_checkpoint_is_detected(tmp_path):
    path = save_checkpoint(tmp_path, 3, state(3)).path
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="is corrupt: the sha256 of its payload does not match"):
        read_checkpoint(path)
    path.write_bytes(b"PK\x03\x04" + bytes(data[4:]))
    with pytest.raises(CheckpointCorruptError, match="is not a mecefo checkpoint"):
        read_checkpoint(path)


def test_load_latest_falls_back_to_the_previous_good_one(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, state(step))
    newest = checkpoint_path(tmp_path, 30)
    newest.write_bytes(newest.read_bytes()[:-10])
    warnings = []
    loaded, path = load_latest(tmp_path, warn=warnings.append)
    assert path == checkpoint_path(tmp_path, 20) and loaded["trainer"]["step"] == 20
    assert len(warnings) == 1
    assert "step_00000030.ckpt is truncated" in warnings[0]
    assert "falling back to the previous checkpoint (step_00000020.ckpt)" in warnings[0]
    assert load_latest(tmp_path / "empty", warn=warnings.append) is None


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, state(step))
    prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 3]


def test_a_checkpoint_is_never_replaced_by_another_lineage(tmp_path):
    save_checkpoint(tmp_path, 100, state(100), lineage="job")
    save_checkpoint(tmp_path, 100, state(100), lineage="job")  # the same branch: rewriting is harmless
    with pytest.raises(StaleCheckpointError, match="not replacing step_00000100.ckpt: it holds lineage job, this "
                                                   "state is lineage stale"):
        save_checkpoint(tmp_path, 100, state(100), lineage="stale")
    with pytest.raises(StaleCheckpointError, match=r"step_00000100.ckpt \(step 100\) is newer and intact"):
        save_checkpoint(tmp_path, 50, state(50), lineage="stale")
    assert read_checkpoint(checkpoint_path(tmp_path, 100))["trainer"] == {"step": 100}
    assert [s for s, _ in list_checkpoints(tmp_path)] == [100]


def test_a_corrupt_checkpoint_of_another_lineage_is_replaced(tmp_path):
    """Resuming falls back past a corrupt newest checkpoint; the resumed run writes that step again."""
    path = save_checkpoint(tmp_path, 30, state(30), lineage="before").path
    path.write_bytes(path.read_bytes()[:-10])
    save_checkpoint(tmp_path, 20, state(20), lineage="after")  # a corrupt newer file does not block
    save_checkpoint(tmp_path, 30, state(30), lineage="after")
    assert read_checkpoint(path)["trainer"] == {"step": 30}


def test_first_format_checkpoints_are_still_read(tmp_path):
    buf = io.BytesIO()
    torch.save(state(5), buf)
    payload = buf.getvalue()
    path = checkpoint_path(tmp_path, 5)
    path.write_bytes(struct.pack("<8s32sQ", MAGIC_V1, hashlib.sha256(payload).digest(), len(payload)) + payload)
    assert read_checkpoint(path)["trainer"] == {"step": 5}


def test_the_lineage_guard_of_either_format(tmp_path):
    """guard_lineage (whole-state files and sharded directories alike): a newer intact checkpoint or one of
    another lineage at this step refuses the write; a corrupt one is passed over; older ones end the check."""
    records = {"a": {"lineage": "L1"}, "b": {"lineage": "L2"}}

    def record_of(path):
        if path.name == "corrupt":
            raise CheckpointCorruptError("truncated")
        return records[path.name]

    guard_lineage([(10, tmp_path / "a")], 10, "L1", record_of)  # same step, same lineage: replaced
    guard_lineage([(9, tmp_path / "b")], 10, "L1", record_of)  # older, whatever its lineage
    guard_lineage([(12, tmp_path / "corrupt"), (10, tmp_path / "a")], 10, "L1", record_of)
    with pytest.raises(StaleCheckpointError, match=r"step 12.*newer and intact"):
        guard_lineage([(12, tmp_path / "a")], 10, "L1", record_of)
    with pytest.raises(StaleCheckpointError, match="holds lineage L2"):
        guard_lineage([(10, tmp_path / "b")], 10, "L1", record_of)
