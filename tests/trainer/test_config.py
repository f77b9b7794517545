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
    (dict(model="tiny", model_factory="my_models:build"), "--model and --model-factory are exclusive"),
    (dict(init="scratch"), "init must be one of random, pretrained"),
    (dict(grad_accum=0), "grad_accum must be >= 1, got 0"),
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


# ---------------------------------------------------------------------------- the command line

@pytest.fixture
def short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few bytes\n" * 3)
    return path


@pytest.mark.parametrize("args,message", [
    (["--steps", "-5"], "argument --steps: must be >= 1, got -5"),
    (["--rank", "0"], "argument --rank: must be an int >= 1 or a fraction in (0, 1], got 0"),
    (["--tau", "0"], "argument --tau: must be >= 1, got 0"),
    (["--timeout", "0"], "argument --timeout: must be > 0, got 0.0"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--inject", "kill@x:1"], "--inject 'kill@x:1': expected kill@STEP:REPLICA"),
    (["--inject", "kill@3:7"], r"--inject 'kill@3:7': replica 7 is not in [0, 4)"),
    (["--failures", "schedule:/nonexistent"], "argument --failures: failure schedule '/nonexistent' is neither"),
    (["--data", "/nonexistent"], "--data '/nonexistent': no such file or directory"),
    (["--resume"], "argument --resume: needs --run-dir naming the run to continue"),
    (["--resume", "--run-dir", "{tmp}/absent"], "argument --resume: {tmp}/absent does not exist: nothing to resume"),
    (["--run-dir", "{tmp}/short.txt"], "argument --run-dir: {tmp}/short.txt exists and is not a directory"),
    (["--model", "meta-llama/Llama-3.2-1B"], "--model 'meta-llama/Llama-3.2-1B' is not a local directory, and "
                                             "nothing is downloaded at run time"),
    (["--model", "{tmp}/short.txt"], "--model {tmp}/short.txt: not a directory"),
    (["--preset", "llama-3b"], "--model 'llama-3b' is neither a preset (tiny, small"),
    (["--init", "pretrained"], "--init pretrained: preset 'tiny' has no weights"),
    (["--model-factory", "no_such_module:build"], "--model-factory 'no_such_module:build': cannot import "
                                                  "no_such_module: ModuleNotFoundError"),
    (["--model", "tiny", "--model-factory", "m:f"], "argument --model-factory: --model and --model-factory are exclusive"),
    (["--grad-accum", "0"], "argument --grad-accum: must be >= 1, got 0"),
    (["--reduce-dtype", "bfloat16"], "argument --reduce-dtype: bfloat16 needs --dtype bfloat16 and "
                                     "--device cuda"),
    (["--data", "{tmp}/short.txt", "--seq-len", "64"], "argument --data: the train split of 1 text file(s) under "
                                                       "{tmp} (byte-level) has 49 tokens, fewer than seq_len + 2 = 66"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, short_text, capsys, monkeypatch, args, message):
    """Issue 15, items 4-6: every rejected value is one line naming the option, before anything starts."""
    from mecefo.launch import train_main

    monkeypatch.chdir(tmp_path)  # the default --run-dir is runs/... here: nothing may be created

    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_:
        train_main([*args, "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("mecefo-train: error: " + message.replace("{tmp}", str(tmp_path))), err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "absent").exists() and not list(tmp_path.glob("runs*"))


def test_a_schedule_file_error_names_the_option_and_the_line(tmp_path, capsys):
    from mecefo.launch import train_main

    schedule = tmp_path / "failures.txt"
    schedule.write_text("0 1\n")
    with pytest.raises(SystemExit):
        train_main(["--failures", f"schedule:{schedule}", "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert capsys.readouterr().err == (f"mecefo-train: error: argument --failures: {schedule}:1: expected 'REPLICA "
                                       "START END' (integers), got '0 1'\n")
