"""Every failure policy of one job, side by side: throughput drop under the failure process and time to quality.

The loop bench/cluster.py, bench/fidelity.py and ``mecefo-plan`` share: each policy (and two floors)
simulated over seeded failure processes (:mod:`mecefo.simulate`), and with a quality model
(:mod:`mecefo.time_to_quality`) each variant's wall clock to the failure-free job's final loss.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, replace

from .costs import WorkCosts, neighbour_flop_ratio
from .policy import POLICIES
from .presets import get_preset
from .simulate import (FLOOR_EXACT, FLOORS, GPU_EVENTS, GPU_STEP_S, ClusterResult, EventCosts, FailureProcess,
                       StepCosts, failure_process, simulate_cluster)
from .time_to_quality import QualityModel, time_to_quality

DEFAULT_RANK = 1 / 32  # mecefo_kernels' default low-rank fraction (not imported: the planner needs no torch)
SIMULATED = (*POLICIES, *FLOORS)


@dataclass(frozen=True)
class CostSource:
    """Where a simulation's step and event costs come from."""

    name: str  # "measured PRESET" or "flop-floor"
    label: str  # what it is, for the tables
    costs: StepCosts
    events: EventCosts
    device: str
    tokens_per_shard: int


def flop_floor_source(preset: str, seq: int, sequences: int, comm_ms: float) -> CostSource:
    """A GPU-scale job at the FLOP floor: the neighbour-mode cost is the model's FLOP ratio, a step lasts
    GPU_STEP_S, events are GPU_EVENTS (a 10-minute restart, quoted)."""
    ratio = neighbour_flop_ratio(get_preset(preset), seq, DEFAULT_RANK)
    costs = StepCosts(GPU_STEP_S, comm_ms / 1e3, WorkCosts(neighbour=ratio), sequences)
    label = (f"FLOP floor: {preset}, seq {seq}, rank 1/32, neighbour-mode sequence {ratio:.3f}x; GPU-scale step "
             f"{GPU_STEP_S:g} s; events " + ", ".join(f"{k} {v:g} s" for k, v in vars(GPU_EVENTS).items()))
    return CostSource("flop-floor", label, costs, GPU_EVENTS, f"model: {preset} at the FLOP floor", seq * sequences)


def compare_policies(source: CostSource, ns, scenarios, seeds, hours: float, quality: QualityModel | None,
                     progress: bool = True, spares: int = 0) -> dict:
    """Every policy (and floor) under each scenario at each n; with ``quality``, time to quality of each
    variant. Returns {"drops": [...], "ttq": [...]} rows (means over seeds with min / max)."""
    variants = quality_variants(quality) if quality else []
    drops, ttq = [], []
    for n in ns:
        for scenario in scenarios:
            t0 = time.time()
            per_policy: dict[str, list[ClusterResult]] = {}
            for policy in SIMULATED:
                if policy == "auto" and quality:
                    continue  # with the measured penalties, below
                per_policy[policy] = [simulate_cluster(scenario, policy, source.costs, source.events, n=n,
                                                       hours=hours, seed=seed, spares=spares) for seed in seeds]
            for auto in (v for v in variants if v.split(":")[0] == "auto"):
                costs = replace(source.costs, penalty=quality.approximation_penalty(auto),
                                drop_penalty=quality.drop_penalty)
                per_policy[auto] = [simulate_cluster(scenario, "auto", costs, source.events, n=n, hours=hours,
                                                     seed=seed, spares=spares) for seed in seeds]
            for policy, results in per_policy.items():
                if ":" in policy:
                    continue
                values = [r.drop_pct for r in results]
                drops.append(dict(source=source.name, n=n, scenario=_name(scenario), policy=policy,
                                  drop_pct=statistics.mean(values), low=min(values), high=max(values),
                                  tokens_per_s=statistics.mean(r.shards_per_s for r in results) * source.tokens_per_shard,
                                  approximated_share=statistics.mean(r.approximated_share for r in results),
                                  dropped_share=statistics.mean(r.dropped_share for r in results)))
            for variant in variants:
                policy = variant.split(":")[0]
                results = per_policy.get(variant) or per_policy[policy]
                rows = [time_to_quality(variant, r, quality) for r in results]
                ratios = [t.time_ratio for t in rows]
                ttq.append(dict(source=source.name, n=n, scenario=_name(scenario), variant=variant,
                                time_ratio=statistics.mean(ratios), low=min(ratios), high=max(ratios),
                                loss_at_budget=(statistics.mean(t.loss_at_budget for t in rows)
                                                if quality.ladder else None),
                                efficiency=statistics.mean(t.efficiency for t in rows),
                                drop_pct=statistics.mean(r.drop_pct for r in results)))
            if progress:
                print(f"  {source.name} n={n} {_name(scenario)}: {time.time() - t0:.1f} s", file=sys.stderr,
                      flush=True)
    return {"drops": drops, "ttq": ttq}


def _name(failures: str | FailureProcess) -> str:
    return failure_process(failures).name


def quality_variants(quality: QualityModel) -> list[str]:
    """Variants with a time to quality: every policy and the exact floor, and each basis the runs measured."""
    bases = sorted({v.partition(":")[2] for v in quality.penalties if ":" in v})
    approximating = ("mecefo", "neighbour-orphan", "spread-orphan", "auto")
    out = [p for p in (*POLICIES, FLOOR_EXACT)]
    out += [f"{p}:{b}" for b in bases for p in approximating]
    return out
