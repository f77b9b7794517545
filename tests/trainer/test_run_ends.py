"""How runs end, with real processes: no split brain, no silent partial run, every end said (issue 15).

Each test is one of the issue's reproductions, scaled down (tiny preset, float64, a few steps)
and bounded by the supervisor's max_wall_s and pytest-timeout.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mecefo.checkpoint import list_checkpoints, read_checkpoint
from mecefo.fencing import FENCED_EXIT_CODE
from mecefo.launch import launch
from mecefo.report import committed_steps, read_jsonl, read_metrics
from trainer_runs import (FAST, check_replicas_agree, final_model, full_batch_reference, make_config,
                          relative_difference, run)

pytestmark = pytest.mark.slow
HEADROOM = dict(max_wall_s=400.0)  # process start-up alone took 30 s under a load average of 15


def one_lineage(run_dir: Path) -> None:
    """Every committed step of the final lineage has one lineage and one state on every replica that
    committed it, and the newest checkpoint holds the lineage of its step."""
    records = read_metrics(run_dir)
    lineage_at = {}
    for step, rs in committed_steps(records).items():
        newest = max(r["generation"] for r in rs)
        final = [r for r in rs if r["generation"] == newest]
        assert len({(r["lineage"], r["param_hash"]) for r in final}) == 1, f"step {step}: two branches"
        lineage_at[step + 1] = final[0]["lineage"]
    step, path = list_checkpoints(run_dir / "checkpoints")[0]
    assert read_checkpoint(path)["trainer"]["lineage"] == lineage_at[step]


def test_a_replica_that_wakes_behind_a_finished_job_is_fenced(tmp_path, corpus_cache):
    """Issue 15, reproduction 1: replica 1 hangs at step 4 for longer than the job takes. It wakes
    (the supervisor wakes a hung replica once the job has finished), forms a quorum of itself at
    step 4 and must not train steps 4.. again, nor overwrite the final checkpoint or the summary."""
    cfg = make_config(tmp_path / "run", corpus_cache, policy="ndb-exact", replicas=2, steps=16,
                      inject=["hang@4:1=600"], restart_after=None, **HEADROOM)
    result = run(cfg)
    assert result.end.complete and result.summary["complete"]
    assert result.summary["fenced"] == [{"replica": 1, "step": 4}]
    check_replicas_agree(cfg.run_path, cfg.steps)
    one_lineage(cfg.run_path)
    records = read_metrics(cfg.run_path)
    assert max(r["step"] for r in records if "event" not in r and r["replica"] == 1) == 3, "nothing after the hang"
    assert not any(r.get("event") in ("checkpoint", "eval") for r in records if r["replica"] == 1)
    exits = [e for e in read_jsonl(cfg.run_path / "events.jsonl") if e.get("event") == "exit"]
    assert {e["replica"]: e["code"] for e in exits} == {0: 0, 1: FENCED_EXIT_CODE}
    # the job's model, not a stale branch: exactly single-process full-batch training
    assert relative_difference(final_model(cfg.run_path), full_batch_reference(cfg.run_path).state) < 1e-12
    assert result.summary["val_loss"] is not None


def test_every_replica_dead_relaunches_from_the_newest_checkpoint(tmp_path, corpus_cache):
    """Issue 15, reproduction 2: replica 1 dies; when it rejoins, the only live replica dies while
    sending it the state. The rejoiner has nobody to heal from, every replica that held the job's
    state is gone, and the job is relaunched from the newest valid checkpoint instead of ending
    early with exit 0. (min_replicas 2 makes replica 0 wait for the rejoiner, so the transfer
    happens whatever the machine's load; with 1, replica 0 could finish first.)"""
    cfg = make_config(tmp_path / "run", corpus_cache, policy="ndb-exact", replicas=2, steps=16, checkpoint_every=4,
                      inject=["kill@6:1", "kill@6:*:send"], restart_after=0, min_replicas=2, **HEADROOM)
    result = run(cfg)
    s = result.summary
    assert s["complete"] and s["steps_done"] == 16 and s["job_restarts"] == 1 and s["kills"] == 2
    assert s["steps_redone"] == 2 and s["val_loss"] is not None  # steps 4 and 5, after checkpoint 4
    events = read_jsonl(cfg.run_path / "events.jsonl")
    assert [e["code"] for e in events if e.get("event") == "exit"][:2] == [-signal.SIGKILL, -signal.SIGKILL]
    assert [e["reason"] for e in events if e.get("event") == "job_restart"] == ["every replica is dead"]
    one_lineage(cfg.run_path)
    # steps redone after the relaunch replay exactly: the final model is full-batch training's
    assert relative_difference(final_model(cfg.run_path), full_batch_reference(cfg.run_path).state) < 1e-12


def test_an_aborted_run_says_so_and_writes_its_summary(tmp_path, corpus_cache):
    """A run the supervisor gives up on (here: a replica died more often than --max-restarts allows)
    returns exit 1, not a traceback, with summary.json written: complete false, the reason, the
    steps done."""
    cfg = make_config(tmp_path / "run", corpus_cache, policy="ndb-exact", replicas=2, steps=2000, max_restarts=0,
                      inject=["kill@2:1"], **HEADROOM)
    result = launch(cfg)
    assert result.returncode == 1 and not result.end.complete
    summary = json.loads((cfg.run_path / "summary.json").read_text())
    assert summary["complete"] is False and summary["exit_code"] == 1
    assert summary["end"] == "aborted: replica 1 died 1 times (exit -9), more than --max-restarts 0"
    assert 2 <= summary["steps_done"] < 2000


# ---------------------------------------------------------------------------- the command line

def _as_in_a_terminal() -> None:
    """Ctrl-C's default disposition in the child, as a terminal's foreground command has it: a test suite
    started in the background by a non-interactive shell (`make test &`, nohup, some CI runners) ignores
    SIGINT, every child inherits that, and Python then installs no KeyboardInterrupt handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mecefo_train(*args: str, **kwargs) -> subprocess.Popen:
    """The console script, as pyproject.toml defines it (mecefo.cli), started as from a terminal."""
    return subprocess.Popen([sys.executable, "-c", "import sys; from mecefo.cli import train_main; "
                             "sys.exit(train_main())", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_as_in_a_terminal, **kwargs)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of a finished command; killed (with its replicas) if it outlives ``timeout``."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        proc.kill()


def cli_args(run_dir: Path, cache: Path, **overrides) -> list[str]:
    options = {**FAST, **HEADROOM, "run_dir": str(run_dir), "cache_dir": str(cache), **overrides}
    flags = {"timeout_s": "--timeout", "heartbeat_timeout_s": "--heartbeat-timeout",
             "quorum_timeout_s": "--quorum-timeout", "max_wall_s": "--max-wall"}
    out = ["--no-progress"]
    for key, value in options.items():
        flag = flags.get(key, "--" + key.replace("_", "-"))
        for item in value if isinstance(value, list) else [value]:
            out += [flag, "never" if item is None else str(item)]
    return out


def test_unfired_injection_corrupt_checkpoint_and_resume_are_said_on_the_console(tmp_path, corpus_cache):
    """Issue 15, reproduction 3 and items 6, 7 and the metrics dedup: an injection that never fires
    is reported; resuming past a corrupt checkpoint says so on the console; the summary of the
    resumed run counts its own checkpoints and the redone steps once."""
    run_dir = tmp_path / "run"
    first = mecefo_train(*cli_args(run_dir, corpus_cache, replicas=2, steps=8, checkpoint_every=4,
                                   inject=["kill@2:1:quorum"]))
    out, err = finish(first, 400)
    assert first.returncode == 0, err
    assert ("mecefo-train: warning: injection kill@2:1:quorum never fired: it fires only when a new quorum (a change "
            "of membership) that holds replica 1 forms at or after step 2") in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["kills"] == 0 and len(summary["injections_not_fired"]) == 1
    assert "(1 never fired)" in out

    newest = run_dir / "checkpoints" / "step_00000008.ckpt"
    newest.write_bytes(newest.read_bytes()[:-100])
    again = mecefo_train(*cli_args(run_dir, corpus_cache, replicas=2, steps=8, checkpoint_every=4), "--resume")
    out, err = finish(again, 400)
    assert again.returncode == 0, err
    assert "step_00000008.ckpt is truncated" in err and "falling back to the previous checkpoint" in err
    assert err.count("falling back") == 1, "said once, not once per replica"
    assert "mecefo-train: resumed from step_00000004.ckpt (step 4)" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["steps_done"] == 8 and summary["steps_redone"] == 4
    assert summary["checkpoints"] == 1, "the resumed launch wrote one checkpoint (step 8)"
    assert summary["warnings"] and "Traceback" not in err


def test_ctrl_c_writes_the_summary_of_the_steps_done_and_exits_130(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    proc = mecefo_train(*cli_args(run_dir, corpus_cache, replicas=2, steps=5000))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if sum(1 for r in read_metrics(run_dir) if "event" not in r) >= 6:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
    finally:
        out, err = finish(proc, 120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "mecefo-train: run incomplete (interrupted (Ctrl-C)); last committed step" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] is False and summary["end"] == "interrupted (Ctrl-C)" and summary["steps_done"] >= 3
    spawned = [e["pid"] for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "spawn"]
    assert spawned and not [pid for pid in spawned if _alive(pid)], "no replica outlives the launcher"


def test_ctrl_c_while_still_importing_is_one_line(monkeypatch, capsys):
    """The console script imports mecefo.launch (torch: seconds) inside mecefo.cli's guard. In process: a
    signal's timing against another process's imports cannot be made deterministic on a loaded machine."""
    import mecefo.cli
    import mecefo.launch

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(mecefo.launch, "train_main", interrupted)
    assert mecefo.cli.train_main() == 130
    assert capsys.readouterr().err == "mecefo-train: interrupted before training started\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
