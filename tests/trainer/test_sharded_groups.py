"""The trainer with FSDP2 inside its replica groups (--shard fsdp), against DDP-style groups (--shard none):
real processes (mecefo-train --group-size 2), a real lighthouse, a real SIGKILL, loopback only.

Both jobs are 2 groups x 2 ranks on the tiny LLaMA in float64, policy mecefo. In the FSDP job rank 1 of
group 1 is SIGKILLed at step 5, group 1 is dropped, group 0 runs its shard in neighbour mode (low-rank
bases refreshed from the AdamW first moments, computed from the shards), group 1 is restarted at once
and heals at some step H (rank r from rank r of group 0). When H comes depends on how fast the
restarted processes start, so the DDP-style reference follows the FSDP job's membership: group 1 is
failed on a schedule for steps [5, H) (it sits out, the plan is the same), and both jobs must end in
the same place.
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from mecefo.checkpoint import read_checkpoint
from mecefo.models import build_model
from mecefo.optim import build_optimizer
from mecefo.report import read_jsonl, read_metrics, step_series
from mecefo.sharded_checkpoint import list_sharded, read_sharded_checkpoint
from trainer_runs import check_replicas_agree, make_config, relative_difference, run

pytestmark = pytest.mark.slow

STEPS = 80  # long enough for the restarted group (5-10 s to start on 2 shared cores) to heal and train again
JOB = dict(replicas=2, group_size=2, steps=STEPS, policy="mecefo", inject=["kill@5:1"], restart_after=0,
           checkpoint_every=10, max_wall_s=300.0)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, corpus_cache):
    """The FSDP job, then the DDP-style job failing group 1 over the steps the FSDP job ran without it (module
    docstring), each run once for the tests below."""
    tmp = tmp_path_factory.mktemp("sharded-groups")
    fsdp = make_config(tmp / "fsdp", corpus_cache, shard="fsdp", **JOB)
    out = {"fsdp": (fsdp, run(fsdp))}
    series = step_series(read_metrics(fsdp.run_path))
    back = next(r["step"] for r in series if r["step"] > 5 and 1 in r["members"])
    schedule = tmp / "group_1_failed.txt"
    schedule.write_text(f"1 5 {back}\n")
    none = make_config(tmp / "none", corpus_cache, shard="none", **{**JOB, "inject": [], "failures": f"schedule:{schedule}"})
    out["none"] = (none, run(none))
    return out


def optimizer_by_name(state: dict, cfg) -> dict:
    """A single-file checkpoint's AdamW state keyed by parameter name (as a sharded checkpoint keys it)."""
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in build_optimizer(model, cfg).param_groups for p in group["params"]]
    return {order[int(i)]: s for i, s in state["state"].items()}


def same_rank_agrees(run_dir) -> int:
    """Rank 1 of every group holds the same shards at every step both committed; the number of such steps."""
    by_step: dict[int, set] = {}
    for path in (run_dir / "metrics" / "ranks").glob("replica_*_rank_1.jsonl"):
        for r in read_jsonl(path):
            if "event" not in r:
                by_step.setdefault(r["step"], set()).add((r["param_hash"], r["optim_hash"]))
    assert all(len(states) == 1 for states in by_step.values()), "rank 1 of the groups disagree"
    return len(by_step)


def test_fsdp_groups_train_as_ddp_style_groups_through_a_kill_and_a_heal(jobs):
    """Every step committed once, the same on the same rank of every group, with the same plan in both jobs; the
    losses and the final model and AdamW state of the FSDP job equal the DDP-style job's to float64 rounding
    (1e-12 relative: the two sum the gradients and the clipping norm in other orders, and the bases come from a
    sharded randomized SVD, so they differ by ~1e-16, which AdamW's 1/sqrt(v) amplifies to ~1e-14 over these
    steps); each FSDP rank holds half the DDP-style rank's parameter and optimizer bytes."""
    (none_cfg, none_result), (fsdp_cfg, fsdp_result) = jobs["none"], jobs["fsdp"]
    series = {}
    for shard, cfg in (("none", none_cfg), ("fsdp", fsdp_cfg)):
        series[shard] = check_replicas_agree(cfg.run_path, STEPS)
        covered = [r for r in series[shard] if r["neighbours"]]
        assert covered and covered[0]["step"] == 5 and all(r["neighbours"] == {"1": 0} for r in covered)
        assert all(r["neighbour_mode"] for r in covered) and covered[-1]["step"] < STEPS - 10, "back well before the end"
    assert [r["plan"] for r in series["none"]] == [r["plan"] for r in series["fsdp"]]
    records = read_metrics(fsdp_cfg.run_path)
    assert [r["step"] for r in records if r.get("event") == "healed" and r["replica"] == 1], "healed"
    assert fsdp_result.summary["kills"] == 1 and fsdp_result.summary["heals"] >= 1
    assert same_rank_agrees(fsdp_cfg.run_path) > STEPS - 10
    ours, theirs = ([r["loss"] for r in series[s]] for s in ("fsdp", "none"))
    assert max(abs(a - b) / b for a, b in zip(ours, theirs)) < 1e-12
    # the gradient noise scale (mecefo.noise) sees the group's gradient: its shards' norms summed over the ranks
    for field in ("noise_grad_sq", "noise_trace"):
        pairs = [(a[field], b[field]) for a, b in zip(series["fsdp"], series["none"])]
        assert all((a is None) == (b is None) for a, b in pairs) and any(a is not None for a, _ in pairs)
        assert max(abs(a - b) / max(abs(b), 1e-300) for a, b in pairs if a is not None) < 1e-9

    sharded = read_sharded_checkpoint(list_sharded(fsdp_cfg.run_path / "checkpoints")[0][1])
    whole = read_checkpoint(none_cfg.run_path / "checkpoints" / f"step_{STEPS:08d}.ckpt")
    assert sharded["step"] == STEPS and sharded["group_size"] == 2
    assert relative_difference(sharded["model"], whole["model"]) < 1e-12
    adam = optimizer_by_name(whole["optimizer"], none_cfg)
    for field in ("exp_avg", "exp_avg_sq"):
        assert relative_difference({n: s[field] for n, s in sharded["optimizer"].items()},
                                   {n: s[field] for n, s in adam.items()}) < 1e-12
    assert all(torch.equal(sharded["optimizer"][n]["step"], s["step"]) for n, s in adam.items())

    held = {}
    for shard, cfg in (("none", none_cfg), ("fsdp", fsdp_cfg)):
        events = [r for p in (cfg.run_path / "metrics").rglob("replica_*.jsonl") for r in read_jsonl(p)
                  if r.get("event") == "state_bytes"]
        assert {r["rank"] for r in events} == {0, 1} and all(r["shard"] == shard for r in events)
        held[shard] = [r["param_bytes"] + r["optimizer_bytes"] for r in events]
    whole_bytes = max(held["none"])
    assert all(abs(b / (whole_bytes / 2) - 1) < 0.05 for b in held["fsdp"])
    assert fsdp_result.summary["state_bytes_per_rank"] == max(held["fsdp"])


def test_fsdp_resume_is_bit_identical_a_truncated_rank_file_falls_back_and_another_group_size_reshards(
        jobs, tmp_path):
    """The FSDP job's final checkpoint with rank 1's file cut short: --resume says so, falls back to the
    checkpoint of step 70 and ends bit for bit where the uninterrupted job ended. Resumed by 4 groups of 1 rank
    instead (the same data per rank), DCP reshards the checkpoint and the job ends where 2 x 2 ended, up to
    float64 rounding."""
    cfg, _ = jobs["fsdp"]
    uninterrupted = read_sharded_checkpoint(list_sharded(cfg.run_path / "checkpoints")[0][1])
    for name, resumed_shape in (("same", {}), ("regrouped", dict(replicas=4, group_size=1))):
        run_dir = tmp_path / name
        shutil.copytree(cfg.run_path, run_dir)
        final = run_dir / "checkpoints" / f"step_{STEPS:08d}.dcp"
        rank_file = final / "__1_0.distcp"
        data = rank_file.read_bytes()
        rank_file.write_bytes(data[: len(data) // 2])
        resumed = replace(cfg, run_dir=str(run_dir), resume=True, inject=[], **resumed_shape)
        result = run(resumed)
        warning = next(w for w in result.summary["warnings"] if "is truncated" in w)
        assert f"{final} is truncated: __1_0.distcp holds {len(data) // 2} bytes" in warning
        assert "falling back to the previous checkpoint (step_00000070.dcp)" in warning
        records = [r for r in read_metrics(run_dir) if r.get("event") == "resumed"]
        assert records and all(r["step"] == 70 and r["path"].endswith("step_00000070.dcp") for r in records)
        again = read_sharded_checkpoint(final)
        assert again["group_size"] == (resumed_shape.get("group_size") or 2)
        if not resumed_shape:
            assert all(torch.equal(t, uninterrupted["model"][n]) for n, t in again["model"].items())
            assert all(torch.equal(t, uninterrupted["optimizer"][n][k]) for n, s in again["optimizer"].items()
                       for k, t in s.items())
        else:
            assert relative_difference(again["model"], uninterrupted["model"]) < 1e-12
        assert json.loads((run_dir / "summary.json").read_text())["complete"]
