"""bench/fidelity.py's batch part: the drop penalty measured at several global batch sizes, against the one
the gradient noise scale (:mod:`mecefo.noise`) predicts from the same runs.

For each batch size (``m`` sequences per shard, ``B = n m`` per step) and seed: a ladder of failure-free
runs (``--batch-ladder`` lengths and ``--steps``) and shrink under the schedule (``--sweep-schedule``,
high). **Measured**: shrink's final validation loss read off its seed's ladder as effective steps E
(:class:`mecefo.time_to_quality.QualityModel`), penalty ``(1 - E / S) / share``, share being the
fraction of the run's sequences dropped. **Predicted**: the empirical model of large-batch training
(McCandlish et al. 2018): a step on ``(1 - f) B`` of its ``B`` sequences makes
``e(f) = (1 - f)(B + B_noise) / ((1 - f) B + B_noise)`` of a full step's progress, with ``B_noise``
the run's own online estimate ``B_simple`` at that step (the trainer's ``noise_b_simple``); the run's
predicted efficiency is the mean of ``e`` over its steps, and its predicted penalty
``(1 - mean e) / mean f``. (For a small ``f`` that is ``B_noise / (B + B_noise)``, what ``auto``
uses.) Also predicted from the failure-free run's ``B_simple`` at the same steps, as a check that the
failures themselves do not move the estimate. Nothing is fitted.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from statistics import fmean

from fidelity_runs import Profile, mean_sd, schedule_label, schedule_spec, train, train_config
from mecefo.report import read_metrics, step_series
from mecefo.time_to_quality import QualityModel

BATCH_SIZES = (1, 2, 4, 8)  # sequences per shard
VAL_SEQUENCES = 256  # validation sequences at every batch size (eval_batches = VAL_SEQUENCES / m)


def batch_profile(profile: Profile, micro_batch: int) -> Profile:
    """The profile at ``micro_batch`` sequences per shard: validation only at the end, on the same number of
    sequences at every batch size."""
    return replace(profile, micro_batch=micro_batch, eval_every=0,
                   eval_batches=max(1, VAL_SEQUENCES // micro_batch))


def default_ladder(steps: int) -> tuple[int, ...]:
    """Failure-free lengths besides ``steps``: 0.8 S (shrink's effective steps at the high schedule lie
    between 0.88 S and S for any penalty up to 1; beyond the ladder it is extended linearly)."""
    return (round(0.8 * steps),)


def step_efficiency(dropped_share: float, batch: float, b_noise: float | None) -> float:
    """e(f): progress of a step that ran (1 - f) of its batch, as a share of a full step's (module docstring);
    ``b_noise`` None: not estimated as finite (all noise), so e = 1 - f."""
    f = dropped_share
    if b_noise is None or math.isinf(b_noise):
        return 1.0 - f
    return (1.0 - f) * (batch + b_noise) / ((1.0 - f) * batch + b_noise)


def predicted_penalty(shares: list[float], b_noise: list[float | None], batch: float) -> tuple[float, float]:
    """(predicted efficiency, predicted penalty) of a run whose steps dropped ``shares`` of their batch, with
    the noise scale ``b_noise`` at each step."""
    efficiency = fmean(step_efficiency(f, batch, b) for f, b in zip(shares, b_noise))
    share = fmean(shares)
    return efficiency, (1.0 - efficiency) / share if share > 0 else float("nan")


def noise_series(run_dir: str | Path) -> list[dict]:
    """Per committed step: the share of the global batch dropped and the noise scale after the step."""
    out = []
    for r in step_series(read_metrics(run_dir)):
        out.append({"step": r["step"], "dropped_sequences": r["dropped_sequences"],
                    "b_simple": r.get("noise_b_simple"), "batch": r.get("noise_batch"),
                    "grad_sq": r.get("noise_grad_sq"), "trace": r.get("noise_trace")})
    return out


def batch_sweep(profile: Profile, work: Path, cache_dir: str | None, schedule: str, seed_list, sizes,
                ladder_lengths=None) -> dict:
    label = schedule_label(schedule)
    lengths = sorted({*(ladder_lengths or default_ladder(profile.steps)), profile.steps})
    print(f"[batch] {list(sizes)} sequences per shard x {profile.replicas} replicas, seeds {list(seed_list)}: "
          f"failure-free {lengths} steps and shrink under {label}", flush=True)
    per_size = {}
    for m in sizes:
        p = batch_profile(profile, m)
        batch = p.replicas * m
        seeds = {}
        for seed in seed_list:
            base = work / f"batch-m{m}" / f"seed{seed}"
            ladder, reference, train_s = {}, None, 0.0
            for steps in lengths:
                cfg = train_config(p, base / f"none-steps{steps}", cache_dir=cache_dir, seed=seed, steps=steps)
                run = train(cfg, f"m={m} seed {seed}: no failure, {steps} steps")
                ladder[steps] = run["val_loss"]
                train_s += run["train_s"]
                if steps == p.steps:
                    reference = run
            cfg = train_config(p, base / f"{label}-shrink", cache_dir=cache_dir, failures=schedule_spec(schedule),
                               policy="shrink", seed=seed)
            shrink = train(cfg, f"m={m} seed {seed}: {label} / shrink")
            model = QualityModel({}, tuple(sorted(ladder.items())), p.steps)
            efficiency = model.effective_steps(shrink["val_loss"]) / p.steps
            share = shrink["dropped_fraction"]
            series = noise_series(shrink["run_dir"])
            free = {r["step"]: r for r in noise_series(reference["run_dir"])}
            shares = [r["dropped_sequences"] / batch for r in series]
            pred_eff, pred = predicted_penalty(shares, [r["b_simple"] for r in series], batch)
            _, pred_free = predicted_penalty(shares, [free[r["step"]]["b_simple"] for r in series], batch)
            failing = [r["b_simple"] for r in series if r["dropped_sequences"] and r["b_simple"] is not None]
            seeds[str(seed)] = {
                "ladder": {str(k): v for k, v in ladder.items()}, "val_loss": shrink["val_loss"],
                "reference_val_loss": reference["val_loss"], "share": share, "efficiency": efficiency,
                "penalty": (1 - efficiency) / share if share > 0 else None,
                "predicted_efficiency": pred_eff, "predicted_penalty": pred,
                "predicted_penalty_from_reference": pred_free,
                "b_simple_under_failure": fmean(failing) if failing else None,
                "b_simple_final": free[p.steps - 1]["b_simple"],
                "b_simple_curve": [[r["step"], r["b_simple"]] for r in free.values() if r["step"] % 10 == 0],
                "train_s": train_s + shrink["train_s"],
            }
        per_size[str(m)] = {"micro_batch": m, "batch": batch, "seeds": seeds, **summarize(seeds)}
    return {"schedule": label, "replicas": profile.replicas, "steps": profile.steps, "lengths": lengths,
            "seeds": list(seed_list), "sizes": list(sizes), "val_sequences": VAL_SEQUENCES, "runs": per_size,
            "pooled": pooled(per_size)}


def pooled(per_size: dict) -> dict | None:
    """Every (batch size, seed) run together: mean measured and predicted penalty, and their difference's
    mean, sd and standard error (runs are independent: each its own seed and batch size)."""
    runs = [s for size in per_size.values() for s in size["seeds"].values() if s["penalty"] is not None]
    if not runs:
        return None
    diffs = [s["penalty"] - s["predicted_penalty"] for s in runs]
    mean, sd = mean_sd(diffs)
    return {"runs": len(runs), "penalty": fmean(s["penalty"] for s in runs),
            "predicted_penalty": fmean(s["predicted_penalty"] for s in runs),
            "difference": {"mean": mean, "sd": sd, "se": sd / math.sqrt(len(runs))}}


def summarize(seeds: dict) -> dict:
    """Means and sds over seeds of the measured and predicted penalties, and their difference."""
    out = {}
    for key in ("penalty", "predicted_penalty", "predicted_penalty_from_reference", "b_simple_under_failure",
                "b_simple_final", "efficiency", "predicted_efficiency", "share"):
        values = [s[key] for s in seeds.values() if s[key] is not None]
        out[key] = dict(zip(("mean", "sd"), mean_sd(values))) if values else None
    diffs = [s["penalty"] - s["predicted_penalty"] for s in seeds.values() if s["penalty"] is not None]
    out["difference"] = dict(zip(("mean", "sd"), mean_sd(diffs))) if diffs else None
    return out
