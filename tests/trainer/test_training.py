"""The trainer end to end: real replica processes, a real lighthouse, real SIGKILL / SIGSTOP, loopback only.

Each run is bounded by the supervisor's max_wall_s (it kills every replica's process group on
the way out) and by pytest-timeout.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mecefo_kernels
from trainer_runs import (check_replicas_agree, final_model, full_batch_reference, make_config,
                          max_relative_difference, run)

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
HAS_MECEFO_API = hasattr(mecefo_kernels, "apply_mecefo")


def test_no_failure_is_bit_identical_to_plain_data_parallel(tmp_path, corpus_cache):
    """MeCeFO's machinery (torchft, NDB, the patched model) changes nothing while nobody fails."""
    policy = "mecefo" if HAS_MECEFO_API else "ndb-exact"
    cfg = make_config(tmp_path / "run", corpus_cache, policy=policy, dtype="float32", steps=12, seq_len=32)
    run(cfg)
    series = check_replicas_agree(cfg.run_path, cfg.steps)
    assert not any(r["neighbour"] for r in series)

    out = tmp_path / "plain"
    out.mkdir()
    procs = [subprocess.Popen([sys.executable, str(HERE / "plain_dp.py"), cfg.run_dir, str(rank), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for rank in range(cfg.replicas)]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stdout.read().decode()[-2000:]
    finally:
        for p in procs:
            p.kill()
    reference = json.loads((out / "hashes_0.json").read_text())
    assert [r["param_hash"] for r in series] == reference, "every step bit-identical to plain data parallel"
    plain = torch.load(out / "final.pt")
    ours = final_model(cfg.run_path)
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


def test_ndb_exact_loses_nothing_when_a_replica_is_killed_and_shrink_does(tmp_path, corpus_cache):
    """A SIGKILLed replica's shard is run by its neighbour: the result equals single-process full-batch training."""
    cfg = make_config(tmp_path / "ndb", corpus_cache, policy="ndb-exact", steps=90, inject=["kill@6:2"])
    result = run(cfg)
    series = check_replicas_agree(cfg.run_path, cfg.steps)
    reference = full_batch_reference(cfg.run_path)
    assert max_relative_difference(final_model(cfg.run_path), reference) < 1e-12

    # replica 2 died at step 6: replica 3 ran shard 2 as a neighbour until 2 came back and healed
    covered = [r for r in series if r["neighbours"]]
    assert covered and covered[0]["step"] == 6 and all(r["neighbours"] == {"2": 3} for r in covered)
    back = covered[-1]["step"] + 1
    assert back < cfg.steps - 5, "replica 2 rejoined well before the end"
    assert all(r["neighbours"] == {} and r["live"] == [0, 1, 2, 3] for r in series[back:])
    records = [json.loads(line) for line in (cfg.run_path / "metrics" / "replica_2.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "healed" for r in records)
    after = [r for r in records if "event" not in r and r["step"] >= back]
    assert after and after[0]["step"] == back and not any(r["neighbour"] for r in after)
    assert result.summary["kills"] == 1 and result.summary["heals"] >= 1
    assert result.summary["detect_s_mean"] < 5 and result.plot.is_file()

    shrink = make_config(tmp_path / "shrink", corpus_cache, policy="shrink", steps=20, inject=["kill@6:2"],
                         restart_after=None)
    run(shrink)
    check_replicas_agree(shrink.run_path, shrink.steps)
    assert max_relative_difference(final_model(shrink.run_path), full_batch_reference(shrink.run_path)) > 1e-4


AWKWARD = {  # injections, steps, restart the dead this many steps later, most replicas down at once
    # 2 dies; in the new quorum that drops it, 1 dies before the process group is rebuilt (the
    # others block in the rebuild until the timeout): two replicas down at once, both come back
    "quorum": (["kill@6:2", "kill@6:1:quorum"], 80, 10, 2),
    # dies with its gradient all-reduce posted but not complete
    "allreduce": (["kill@6:1:allreduce"], 60, 0, 1),
    # replica 2 dies; when it rejoins, the replica sending it the state dies mid-transfer
    "send": (["kill@4:2", "kill@0:*:send"], 110, 0, 1),
    # SIGSTOPped for 6 s (heartbeats stop too), then SIGCONT: dropped, then heals
    "hang": (["hang@6:1=6"], 70, 0, 1),
}


@pytest.mark.parametrize("moment", sorted(AWKWARD))
def test_failures_at_awkward_moments_lose_no_step_and_apply_none_twice(tmp_path, corpus_cache, moment):
    inject, steps, restart_after, most_down = AWKWARD[moment]
    cfg = make_config(tmp_path / moment, corpus_cache, policy="ndb-exact", steps=steps, inject=inject,
                      restart_after=restart_after)
    result = run(cfg)
    series = check_replicas_agree(cfg.run_path, cfg.steps)
    # a lost or doubly applied step would change the trajectory: it equals full-batch training
    assert max_relative_difference(final_model(cfg.run_path), full_batch_reference(cfg.run_path)) < 1e-12
    fired = sorted((f["action"], f["phase"]) for f in json_records(cfg.run_path / "injections"))
    assert fired == sorted((i.split("@")[0], i.split("=")[0].split(":")[2] if i.count(":") > 1 else "step")
                           for i in inject), "every injection fired, at its phase"
    assert result.summary["discarded_attempts"] >= 1
    assert result.summary["max_dead_at_once"] == most_down
    if moment == "quorum":
        assert any(r["neighbours"] == {"1": 0, "2": 3} for r in series), "both orphans covered"
    assert series[-1]["live"] == [0, 1, 2, 3] and not series[-1]["neighbours"], "every failed replica is back"


def json_records(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.iterdir())
            if p.is_file() and p.name.startswith(("kill-", "hang-"))]
