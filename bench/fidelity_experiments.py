"""bench/fidelity.py's training experiments: quality (every schedule and policy), seeds (the high-schedule
comparison over seeds), ladder (failure-free runs of several lengths) and the rank / tau sweep."""

from __future__ import annotations

from pathlib import Path

from fidelity_runs import (DEFAULT_RANK, DEFAULT_TAU, Profile, rank_label, reference_config, run_name,
                           schedule_label, schedule_spec, train, train_config, with_change)

# Training runs per approximation mode (MECEFO.md: quality depends only on which work is approximated,
# not on who runs it; tests/trainer/test_sync.py shows a spread step and a neighbour step of the same
# approximation give the same gradient): exact (spread: the full-batch gradient, as ndb-exact), orphan-only
# (spread-orphan, = neighbour-orphan's quality), the paper's (mecefo), dropping (shrink); ":momentum" runs
# a policy with gradient-aware bases (--basis momentum).
POLICIES = ("shrink", "mecefo", "spread", "spread-orphan", "mecefo:momentum", "spread-orphan:momentum")
LADDER = (300, 450, 600, 750)  # no-failure run lengths besides --steps: loss against steps, fully annealed


def quality(profile: Profile, work: Path, cache_dir: str | None, schedules, policies) -> dict:
    print(f"[quality] {profile.preset}, {profile.replicas} replicas, {profile.steps} steps", flush=True)
    reference = train(reference_config(profile, work, cache_dir), "no failure")
    runs = {}
    for schedule in schedules:
        label = schedule_label(schedule)
        for policy in policies:
            cfg = train_config(profile, work / f"{label}-{run_name(policy)}", cache_dir=cache_dir,
                               failures=schedule_spec(schedule), policy=policy)
            runs[f"{label}/{policy}"] = with_change(train(cfg, f"{label} / {policy}"), reference)
    return {"reference": reference, "runs": runs, "schedules": [schedule_label(s) for s in schedules],
            "policies": list(policies)}


SEED_RUN_KEYS = ("val_loss", "val_ppl", "ppl_change_pct", "failed_fraction", "steps_under_failure", "max_dead",
                 "train_s", "val_curve", "approximated_fraction", "dropped_fraction")


def seeds(profile: Profile, work: Path, cache_dir: str | None, schedule: str, policies, seed_list) -> dict:
    """The quality comparison under ``schedule`` repeated with other seeds.

    A seed draws the initial weights, the data order and the failure pattern; within one seed every
    policy sees the same three, so the per-seed change against no failure is a paired difference.
    Seed 0 is the quality part's runs (same directories, reused)."""
    label = schedule_label(schedule)
    print(f"[seeds] {label} schedule, seeds {list(seed_list)}: no failure and {', '.join(policies)}", flush=True)
    per_seed = {}
    for seed in seed_list:
        base = work if seed == 0 else work / f"seed{seed}"
        ref_cfg = (reference_config(profile, work, cache_dir) if seed == 0
                   else train_config(profile, base / "none", cache_dir=cache_dir, seed=seed))
        reference = train(ref_cfg, f"seed {seed}: no failure")
        runs = {"none": {k: reference[k] for k in ("val_loss", "val_ppl", "train_s", "val_curve")}}
        for policy in policies:
            cfg = train_config(profile, base / f"{label}-{run_name(policy)}", cache_dir=cache_dir,
                               failures=schedule_spec(schedule), policy=policy, seed=seed)
            run = with_change(train(cfg, f"seed {seed}: {label} / {policy}"), reference)
            runs[policy] = {k: run[k] for k in SEED_RUN_KEYS}
        per_seed[str(seed)] = runs
    return {"schedule": label, "policies": list(policies), "seeds": list(seed_list), "runs": per_seed}


def ladder(profile: Profile, work: Path, cache_dir: str | None, seed_list, lengths) -> dict:
    """No-failure runs of other lengths (each its own warm-up and cosine decay to its end): the validation
    loss a failure-free job reaches in S steps, per seed. Time-to-quality reads a policy's final loss off
    this curve as the steps a failure-free job needs to match it (its effective steps)."""
    lengths = sorted({*lengths, profile.steps})
    print(f"[ladder] no-failure runs of {lengths} steps, seeds {list(seed_list)}", flush=True)
    per_seed = {}
    for seed in seed_list:
        base = work if seed == 0 else work / f"seed{seed}"
        losses = {}
        for steps in lengths:
            if steps == profile.steps:
                cfg = (reference_config(profile, work, cache_dir) if seed == 0
                       else train_config(profile, base / "none", cache_dir=cache_dir, seed=seed))
            else:
                cfg = train_config(profile, base / f"none-steps{steps}", cache_dir=cache_dir, seed=seed, steps=steps)
            losses[str(steps)] = train(cfg, f"seed {seed}: no failure, {steps} steps")["val_loss"]
        per_seed[str(seed)] = losses
    return {"lengths": lengths, "seeds": list(seed_list), "val_loss": per_seed}


def sweep(profile: Profile, work: Path, cache_dir: str | None, schedule: str) -> dict:
    """mecefo under ``schedule`` with each rank (tau default) and each tau (rank default)."""
    print(f"[sweep] mecefo under {schedule}: ranks {[rank_label(r) for r in profile.ranks]}, taus {profile.taus}",
          flush=True)
    reference = train(reference_config(profile, work, cache_dir), "no failure")
    settings = sorted({(r, DEFAULT_TAU) for r in profile.ranks} | {(DEFAULT_RANK, t) for t in profile.taus},
                      key=lambda rt: (rt[0], rt[1]))
    runs = []
    for rank, tau in settings:
        default = rank == DEFAULT_RANK and tau == DEFAULT_TAU
        # the default setting is exactly the quality part's run: same directory, reused
        name = f"{schedule_label(schedule)}-mecefo"
        if not default:
            name += f"-r{rank_label(rank).replace('/', 'over')}-tau{tau}"
        cfg = train_config(profile, work / name, cache_dir=cache_dir, failures=schedule_spec(schedule),
                           rank=None if default else rank, tau=None if default else tau)
        run = with_change(train(cfg, f"rank {rank_label(rank)}, tau {tau}"), reference)
        run.update(rank=rank, tau=tau)
        runs.append(run)
    return {"schedule": schedule_label(schedule), "reference_val_ppl": reference["val_ppl"], "runs": runs}
