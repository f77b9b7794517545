"""bench/fidelity.py's gradient-error probe part (:mod:`mecefo.probe` on the no-failure run's checkpoints),
and summaries of its rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fidelity_runs import DEFAULT_TAU, SCHEDULE_HOURS, Profile, reference_config, schedule_label, \
    schedule_spec, train
from mecefo.checkpoint import list_checkpoints, read_checkpoint
from mecefo.data import Batches, CorpusFiles
from mecefo.failures import load_schedule
from mecefo.membership import plan_step
from mecefo.models import build_model
from mecefo.neighbor import MeCeFOPath
from mecefo.probe import (GROUPS, compare, exact_gradients, neighbour_run_shards, parameter_groups, shard_gradient,
                          single_failure_plan)
from mecefo.replica import CORPUS_FILE

PAPER_REPLICAS = 32


def probe_plans(profile: Profile, schedule: str) -> dict:
    """Named failure plans: one of n dead, one of the paper's 32 dead, the schedule's worst moment."""
    n = profile.replicas
    plans = {f"1 of {n} dead": single_failure_plan(n), f"1 of {PAPER_REPLICAS} dead": single_failure_plan(PAPER_REPLICAS)}
    sched = load_schedule(schedule_spec(schedule), replicas=n, steps=profile.steps, hours=SCHEDULE_HOURS, seed=0)
    worst = max((sched.failed_at(s) for s in range(profile.steps)), key=len, default=frozenset())
    if len(worst) > 1:
        plans[f"{len(worst)} of {n} dead ({schedule_label(schedule)} schedule's worst)"] = plan_step(
            n, [r for r in range(n) if r not in worst], "mecefo")
    return plans


def probe(profile: Profile, work: Path, cache_dir: str | None, schedule: str, threads: int) -> dict:
    ref_cfg = reference_config(profile, work, cache_dir)
    print(f"[probe] weights of the no-failure run every {profile.probe_every} steps", flush=True)
    train(ref_cfg, "no failure")
    t0 = time.time()
    torch.set_num_threads(threads)
    run_dir = ref_cfg.run_path
    corpus = CorpusFiles(**json.loads((run_dir / CORPUS_FILE).read_text()))
    device = torch.device("cuda" if profile.device == "cuda" else "cpu")
    model = build_model(ref_cfg, device)
    batches = Batches(corpus, seq_len=ref_cfg.seq_len, micro_batch=ref_cfg.micro_batch, seed=ref_cfg.seed,
                      vocab_size=model.config.vocab_size)
    weights = {step: path for step, path in list_checkpoints(run_dir / "checkpoints")}
    initial = {k: v.clone() for k, v in model.state_dict().items()}  # step 0: the seeded initialisation
    paths = {rank: MeCeFOPath(rank, tau=None) for rank in profile.ranks}
    ages = (0, *profile.taus)
    plans = probe_plans(profile, schedule)
    groups = parameter_groups(paths[profile.ranks[0]].prepare(model), paths[profile.ranks[0]])
    shards = sorted({s for plan in plans.values() for s in neighbour_run_shards(plan)})

    def load(step: int) -> None:
        model.load_state_dict(read_checkpoint(weights[step])["model"] if step else initial)

    rows = []
    for t in range(0, profile.steps + 1, profile.probe_every):
        load(t)
        exact = {name: exact_gradients(model, paths[profile.ranks[0]], batches, t, plan) for name, plan in plans.items()}
        for age in (a for a in ages if a <= t):
            for rank, path in paths.items():
                load(t - age)
                path.prepare(model)  # bases from the weights `age` steps ago
                load(t)
                neighbour = {s: shard_gradient(model, path, batches, t, s, neighbour=True) for s in shards}
                for name, plan in plans.items():
                    r = compare(exact[name], {s: neighbour[s] for s in neighbour_run_shards(plan)}, groups)
                    rows.append({"step": t, "plan": name, "rank": rank, "age": age, "step_error": r.step,
                                 "shard_error": r.shard_mean(), "shrink_error": r.shrink})
        print(f"  step {t}: {sum(1 for r in rows if r['step'] == t)} probes", flush=True)
    print(f"  probe took {time.time() - t0:.0f} s", flush=True)
    return {"plans": list(plans), "plan_details": {k: p.describe() for k, p in plans.items()}, "ages": list(ages),
            "ranks": list(profile.ranks), "rows": rows, "seconds": time.time() - t0}



def _rows(probe_result: dict, **match) -> list[dict]:
    return [r for r in probe_result["rows"] if all(r[k] == v for k, v in match.items())]


def probe_summary(probe_result: dict, kind: str, stat, **match) -> dict[str, float]:
    """``stat`` (mean or max) over the matching rows of each group's ``kind`` ("step_error", "shard_error")."""
    rows = _rows(probe_result, **match)
    return {g: stat(r[kind][g] for r in rows) for g in ("total", *GROUPS)}


def default_age(profile: Profile) -> int:
    """The oldest the bases get with the default tau, within the probed ages (the run is shorter than tau)."""
    return max(a for a in (0, *profile.taus) if a <= DEFAULT_TAU)
