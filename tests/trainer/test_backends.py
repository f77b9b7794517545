"""Which collective library a group uses inside and across groups (mecefo.backends), and the options that
choose how a group holds the model: pure choices, no process group."""

import pytest

from mecefo.backends import choose_backends
from mecefo.config import ConfigError, TrainConfig
from mecefo.sharding import planned_state_bytes, shard_rows


def test_cpu_is_gloo_everywhere():
    b = choose_backends("cpu")
    assert (b.intra, b.cross, b.device) == ("gloo", "gloo", "cpu")
    assert choose_backends("cpu", (2, 21, 5)) == b, "NCCL's presence changes nothing for CPU tensors"


@pytest.mark.parametrize("version,cross", [((2, 25, 1), "nccl"), ((2, 27, 3), "nccl"), ((2, 26), "nccl"),
                                           ((2, 24, 3), "baby-nccl"), ((2, 18, 1), "baby-nccl")])
def test_cuda_is_nccl_inside_and_torchfts_nccl_group_that_can_abort_across(version, cross):
    """torchft's ProcessGroupNCCL aborts a hung collective with ncclCommAbort from NCCL 2.25 on; before that only
    ProcessGroupBabyNCCL (NCCL in a child process that is killed) can."""
    b = choose_backends("cuda", version)
    assert (b.intra, b.cross, b.device) == ("cpu:gloo,cuda:nccl", cross, "cuda")
    assert ".".join(map(str, version)) in b.why


def test_cuda_without_nccl_and_other_devices_are_refused():
    with pytest.raises(ValueError, match="has no NCCL"):
        choose_backends("cuda", None)
    with pytest.raises(ValueError, match="device must be cpu or cuda, got 'xpu'"):
        choose_backends("xpu")


def test_shard_and_group_size_options():
    assert TrainConfig(run_dir="r", shard="fsdp", group_size=2).shard == "fsdp"
    with pytest.raises(ConfigError, match="shard must be one of none, fsdp, got 'zero3'") as e:
        TrainConfig(run_dir="r", shard="zero3")
    assert e.value.field == "shard"
    with pytest.raises(ConfigError, match="group_size must be >= 1, got 0"):
        TrainConfig(run_dir="r", group_size=0)


def test_fsdp_rows_and_bytes_per_rank():
    """FSDP2 cuts dim 0 as torch.chunk does: ceil(rows / G) each, the last ranks shorter or empty."""
    assert [shard_rows(10, 4, r) for r in range(4)] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert [shard_rows(3, 4, r) for r in range(4)] == [(0, 1), (1, 1), (2, 1), (3, 0)]
    held = planned_state_bytes([(10, 4), (10,)], 4, 4)  # rank 0: 3 rows of each
    assert held == {"param_bytes": 4 * (12 + 3), "optimizer_bytes": 2 * 4 * (12 + 3) + 4 * 2}


def test_a_peer_gone_is_told_from_other_errors():
    """A failed collective inside a group stops the group (GroupFailed); any other error stays what it is."""
    from mecefo.sharding import collective_failure

    assert collective_failure(RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                                           "closed by peer [127.0.0.1]:21668"))
    assert not collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))


def test_resuming_checkpoints_of_the_other_shard_is_refused(tmp_path):
    from mecefo.sharded_checkpoint import check_resume_format

    (tmp_path / "step_00000010.ckpt").write_bytes(b"")
    check_resume_format(tmp_path, "none")
    with pytest.raises(ConfigError, match=r"holds whole-state checkpoints \(step_00000010.ckpt: written with --shard "
                                          r"none\); resume it with --shard none") as e:
        check_resume_format(tmp_path, "fsdp")
    assert e.value.field == "shard"
    (tmp_path / "step_00000010.ckpt").unlink()
    (tmp_path / "step_00000020.dcp").mkdir()
    check_resume_format(tmp_path, "fsdp")
    with pytest.raises(ConfigError, match=r"sharded checkpoints \(step_00000020.dcp: .*resume it with --shard fsdp"):
        check_resume_format(tmp_path, "none")
    check_resume_format(tmp_path / "nothing-here", "fsdp")
