"""bench/fidelity.py's progress per step and time to quality: each variant's efficiency and penalty from the
seeds and ladder parts, and every policy's wall clock to quality from the package's simulator
(:mod:`mecefo.planner`)."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean

from fidelity_runs import SCHEDULES, mean_sd
from mecefo.planner import compare_policies, flop_floor_source
from mecefo.simulate import DEFAULT_SEQUENCES
from mecefo.time_to_quality import QualityModel

TTQ_NS = (4, 8, 32)  # replica counts of the time-to-quality simulation
TTQ_SEEDS = 3  # failure-process seeds per scenario (x TTQ_HOURS each)
TTQ_HOURS = 1000.0


def quality_model(results: dict, steps: int) -> dict:
    """Each trained variant's progress per step and penalty, per seed, from the seeds and ladder parts.

    A run that ends at validation loss L after S steps made E = L*^-1(L) effective steps, read off
    that seed's ladder of failure-free runs (:class:`mecefo.time_to_quality.QualityModel`); its efficiency
    is E / S and its penalty (1 - E / S) / share, share being the fraction of its sequences approximated
    (dropped, for shrink). Exact variants (spread) are reported as a check: their efficiency is 1
    up to rounding, and they get no penalty. A penalty is stored as measured, negative too (a failure
    run that ended better than no failure: noise); the time-to-quality model reads it as 0."""
    sd, ladder = results["seeds"], results["ladder"]
    variants = list(sd["policies"])
    per_variant: dict[str, dict] = {v: {"efficiency": {}, "penalty": {}, "share": {}} for v in variants}
    for seed in map(str, sd["seeds"]):
        points = tuple((int(k), v) for k, v in sorted(ladder["val_loss"][seed].items(), key=lambda kv: int(kv[0])))
        model = QualityModel({}, points, steps)
        for v in variants:
            run = sd["runs"][seed][v]
            e = model.effective_steps(run["val_loss"]) / steps
            share = run["dropped_fraction"] if v.split(":")[0] == "shrink" else run["approximated_fraction"]
            per_variant[v]["efficiency"][seed] = e
            per_variant[v]["share"][seed] = share
            if share > 0:
                per_variant[v]["penalty"][seed] = (1 - e) / share
    penalties = {}
    for v, d in per_variant.items():
        if d["penalty"]:
            mean, sd_ = mean_sd(d["penalty"].values())
            penalties[v] = {"mean": mean, "sd": sd_, "per_seed": d["penalty"]}
    mean_ladder = [[length, fmean(ladder["val_loss"][str(seed)][str(length)] for seed in sd["seeds"])]
                   for length in ladder["lengths"]]
    return {"steps": steps, "ladder": mean_ladder, "penalties": penalties,
            "efficiency": {v: dict(zip(("mean", "sd"), mean_sd(d["efficiency"].values())), per_seed=d["efficiency"])
                           for v, d in per_variant.items()},
            "share": {v: fmean(d["share"].values()) for v, d in per_variant.items()}}


def ttq(results: dict, csv_path: Path | None, ns=TTQ_NS, seeds: int = TTQ_SEEDS, hours: float = TTQ_HOURS) -> dict:
    """Time to quality of every policy at n = 4, 8, 32 under low / mid / high: the package's simulation
    (:mod:`mecefo.planner`; measured CPU step costs from bench/cluster.py's rows, and the FLOP floor at GPU
    scale) with this page's quality model."""
    import cluster

    quality = QualityModel.from_results(results["quality_model"])
    # step and trainer-cost rows: the committed results, and --csv's if it is another file
    rows = cluster.read_csv(cluster.DEFAULT_CSV)
    if csv_path and csv_path.is_file() and csv_path.resolve() != cluster.DEFAULT_CSV.resolve():
        rows += cluster.read_csv(csv_path)
    sources = [cluster.measured_source(rows, None, "small", None, DEFAULT_SEQUENCES, 0.0,
                                       cluster.latest_event_costs(rows)),
               flop_floor_source("llama-1b", 2048, DEFAULT_SEQUENCES, 0.0)]
    print(f"[ttq] {len(sources)} cost sources x n {list(ns)} x low/mid/high x {seeds} seeds x {hours:g} h",
          flush=True)
    out = {"sources": {src.name: src.label for src in sources}, "ns": list(ns), "seeds": seeds,
           "hours": hours, "sequences": DEFAULT_SEQUENCES, "drops": [], "ttq": []}
    for src in sources:
        result = compare_policies(src, ns, list(SCHEDULES), range(seeds), hours, quality)
        out["drops"] += result["drops"]
        out["ttq"] += result["ttq"]
    return out
