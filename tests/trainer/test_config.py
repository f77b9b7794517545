"""The trainer's options: validation with clear messages, JSON round trip, command line."""

import argparse

import pytest

from mecefo.config import TrainConfig, add_train_arguments, config_from_args
from mecefo.launch import DEMO, prepare_run_dir


def test_json_round_trip(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path), policy="shrink", inject=["kill@3:1"], betas=(0.8, 0.9), rank=0.25)
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("overrides,message", [
    (dict(policy="bamboo"), "policy must be one of mecefo, ndb-exact, shrink, restart"),
    (dict(preset="llama-3b"), "unknown model preset 'llama-3b'"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(device="tpu"), "device must be one of cpu, cuda"),
    (dict(replicas=0), "replicas must be >= 1, got 0"),
    (dict(seq_len=4096), "seq_len 4096 exceeds preset 'tiny'"),
    (dict(min_replicas=5), "min_replicas 5 exceeds replicas 4"),
    (dict(rank=1.5), "rank must be an int >= 1 or a fraction in"),
    (dict(failures="high"), "schedule:low|mid|high|FILE"),
    (dict(timeout_s=0), "timeout_s must be > 0"),
])
def test_bad_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)


def test_unknown_config_key():
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        TrainConfig.from_dict({"colour": "blue"})


def test_command_line():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser, DEMO)
    args = parser.parse_args(["--policy", "ndb-exact", "--inject", "hang@5:1=2", "--restart-after", "never",
                              "--rank", "0.125", "--tau", "20", "--timeout", "3", "--no-hash-state"])
    cfg = config_from_args(args)
    assert cfg.policy == "ndb-exact" and cfg.inject == ["kill@100:2", "hang@5:1=2"]
    assert cfg.restart_after is None and cfg.rank == 0.125 and cfg.tau == 20 and cfg.timeout_s == 3
    assert cfg.hash_state is False and cfg.steps == DEMO.steps


def test_bad_injection_fails_before_anything_starts(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), inject=["kill@3:7"])
    with pytest.raises(ValueError, match=r"replica 7 is not in \[0, 4\)"):
        prepare_run_dir(cfg)


def test_a_run_directory_is_not_overwritten(tmp_path):
    (tmp_path / "metrics").mkdir()
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        prepare_run_dir(TrainConfig(run_dir=str(tmp_path)))
