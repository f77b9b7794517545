"""A data-parallel job under a failure process: its step rate and throughput for each failure policy.

The simulator reuses the trainer's rules instead of restating them:

* failures: :func:`mecefo.failures.renewal_schedule`, the trainer's reading of the paper's scenarios
  (each of the n replicas alternates up and down, mean up-time the node's MTBF, down for its repair
  time), on a one-minute grid over ``hours`` of wall clock, seeded; the paper's low / mid / high
  scenarios are such processes (:data:`mecefo.failures.SCENARIOS`);
* who runs what: :func:`mecefo.membership.plan_step` for the live set (neighbours, dropped shards).

A step of synchronous data parallelism lasts as long as its slowest replica:
``overhead + compute x load``, ``load`` being the plan's predicted step time (1 for a replica
running its own shard exactly; a neighbour-mode sequence costs ``work.neighbour`` of an exact one).
Throughput is shards processed per second, integrated over the failure process. Each failure also
stalls the job for the time the survivors take to notice (``detect``) and each return for a heal
(state transfer). Policy ``restart`` (every failure restarts the whole job from its newest
checkpoint, spares taking the failed replicas' places) loses the restart time plus the progress
since the last checkpoint, and pays a checkpoint save every Young/Daly interval
sqrt(2 x save x MTBF). The drop is 1 - time-averaged throughput / failure-free throughput.

**Hot spares** (``spares`` > 0): a failed replica's place is taken by a spare node after detection
and the spare's process start (``detect_s + start_s``; it then heals like any returning replica),
and the failed node joins the spare pool once repaired. With no spare free, the replica stays down
until the first node of the pool is free (or its own node is repaired, whichever is first).
Failures keep the schedule's times: a slot's next failure comes when the schedule says, whichever
node holds it. Restart's accounting is unchanged by spares (it already assumes them).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from .costs import WorkCosts
from .failures import PAPER_REPLICAS, SCENARIOS, Schedule, renewal_schedule
from .membership import (DEFAULT_DROP_PENALTY, DEFAULT_PENALTY, StepPlan, approximated_share, dropped_share,
                         plan_step)

SLOT_S = 60.0  # the failure process's grid: one minute
FLOOR_EXACT = "floor-exact"  # the full batch run exactly by the survivors, perfectly spread: drop k / n
FLOOR_APPROXIMATE = "floor-approximate"  # only the orphan work, approximated and perfectly spread
FLOORS = (FLOOR_EXACT, FLOOR_APPROXIMATE)
DEFAULT_SEQUENCES = 16  # sequences per replica per step in the simulation (a global batch of 512 on 32 replicas)


@dataclass(frozen=True)
class FailureProcess:
    """Each node fails after an exponential up-time of mean ``mtbf_h`` and is repaired ``repair_h`` later."""

    mtbf_h: float
    repair_h: float
    name: str

    @classmethod
    def scenario(cls, name: str) -> "FailureProcess":
        """The paper's low / mid / high: a failure every interval_h in a 32-replica job, lasting duration_h."""
        if name not in SCENARIOS:
            raise ValueError(f"unknown failure scenario {name!r}; choose {', '.join(SCENARIOS)}")
        sc = SCENARIOS[name]
        return cls(sc.interval_h * PAPER_REPLICAS, sc.duration_h, name)

    def job_mtbf_h(self, n: int) -> float:
        """Mean time between failures of an n-replica job (the restart policy's checkpoint period uses it)."""
        return self.mtbf_h / n

    def schedule(self, n: int, hours: float, seed: int) -> Schedule:
        slots = int(round(hours * 3600 / SLOT_S))
        return renewal_schedule(self.mtbf_h, self.repair_h, replicas=n, steps=slots, hours=hours, seed=seed,
                                name=self.name)


def failure_process(failures: "str | FailureProcess") -> FailureProcess:
    return failures if isinstance(failures, FailureProcess) else FailureProcess.scenario(failures)


@dataclass(frozen=True)
class StepCosts:
    """Seconds of one synchronous step: ``overhead_s + compute_s x`` the slowest replica's load (the plan's
    predicted step time, :meth:`mecefo.membership.StepPlan.step_time`: 1 for its own shard run exactly)."""

    compute_s: float  # one replica's forward + backward of its own shard, exactly
    overhead_s: float = 0.0  # the rest of a step, whatever the replicas run (all-reduce, optimizer, quorum, ...)
    work: WorkCosts = field(default_factory=WorkCosts)  # per-sequence costs by mode
    sequences: int = DEFAULT_SEQUENCES  # m: spreading's granularity
    penalty: float = DEFAULT_PENALTY  # auto's progress lost per unit share approximated
    drop_penalty: float = DEFAULT_DROP_PENALTY  # ... and dropped

    def plan(self, n: int, failed: frozenset[int], policy: str) -> StepPlan:
        """The trainer's plan (policy restart trains with every replica, as the trainer does)."""
        return _plan(n, frozenset() if policy == "restart" else failed, policy, self.sequences, self.work,
                     self.penalty, self.drop_penalty)

    def step_s(self, plan: StepPlan) -> float:
        return self.overhead_s + self.compute_s * plan.step_time(self.work)

    def floor_step_s(self, n: int, dead: int, which: str) -> float:
        """A floor's step: the dead shards' work spread over the survivors with no granularity."""
        orphan = self.work.exact if which == FLOOR_EXACT else self.work.neighbour
        return self.overhead_s + self.compute_s * (1 + orphan * dead / (n - dead))


@dataclass(frozen=True)
class EventCosts:
    """Job-wide stalls around a failure (policies other than restart), a restart's costs, a spare's start."""

    detect_s: float = 0.0  # a failure stalls every replica until the quorum drops the failed one
    heal_s: float = 0.0  # a returning replica receives the state from a live one
    restart_s: float = 0.0  # restart: dead time from the failure to the relaunched job's first step
    save_s: float = 0.0  # restart: one checkpoint save
    start_s: float = 0.0  # hot spares: a spare's process start, from its launch to asking to heal


# A GPU-scale job's event costs (the CPU trainer restarts in ~4 s, which no 32-GPU job does). restart: the
# checkpoint-restart of a multi-node job takes minutes: "several minutes" per recovery (Just-In-Time
# Checkpointing, Gupta et al., EuroSys 2024), and standby-machine recovery in ~20 s is "up to ~70x" faster
# than checkpoint-based baselines at 1,024 GPUs (TrainMover, Lao et al., arXiv 2412.12636), i.e. tens of
# minutes; we take 10 minutes. detect: torchft's lighthouse heartbeat timeout (5 s by default). heal: a
# LLaMA-1B replica's weights and AdamW state (~16 GB) over a ~2 GB/s path, ~10 s. save: the same 16 GB to
# shared storage at ~0.5 GB/s, ~30 s. start: a spare's torchrun, CUDA context and model build, ~1 minute
# (an assumption; the CPU trainer's replica starts in ~4-5 s).
GPU_EVENTS = EventCosts(detect_s=5.0, heal_s=10.0, restart_s=600.0, save_s=30.0, start_s=60.0)
GPU_STEP_S = 1.0  # a GPU-scale step (e.g. LLaMA-1B at the paper's 471k tokens/s: a 512 x 1024-token batch, ~1.1 s)


@lru_cache(maxsize=None)
def _plan(n: int, failed: frozenset[int], policy: str, sequences: int, work: WorkCosts, penalty: float,
          drop_penalty: float) -> StepPlan:
    return plan_step(n, [r for r in range(n) if r not in failed], policy, sequences=sequences, costs=work,
                     penalty=penalty, drop_penalty=drop_penalty)


@dataclass(frozen=True)
class PlanStats:
    """What the simulation needs of a step's plan: its predicted step time (loads), shards processed, and
    the shares of the global batch approximated and dropped."""

    step_time: float
    processed: float
    approximated_share: float
    dropped_share: float


def plan_stats(costs: StepCosts, n: int, dead: int, policy: str) -> PlanStats:
    """The statistics of the plan with ``dead`` of ``n`` replicas failed. They depend on how many are
    dead, not on which (every takeover rule deals the same multiset of loads for any pattern: tested
    against random failed sets in tests/trainer/test_simulate.py), so one plan per count serves a
    whole failure process: the simulation of 1024 replicas takes seconds."""
    return _plan_stats(n, dead, "restart" if policy == "restart" else policy, costs.sequences, costs.work,
                       costs.penalty, costs.drop_penalty)


@lru_cache(maxsize=None)
def _plan_stats(n: int, dead: int, policy: str, sequences: int, work: WorkCosts, penalty: float,
                drop_penalty: float) -> PlanStats:
    failed = frozenset() if policy == "restart" else frozenset(range(dead))
    plan = _plan(n, failed, policy, sequences, work, penalty, drop_penalty)
    return PlanStats(plan.step_time(work), plan.processed, approximated_share(plan), dropped_share(plan))


def plan_at(schedule: Schedule, failed: frozenset[int], policy: str, costs: StepCosts | None = None) -> StepPlan:
    """The trainer's step plan for a failed set (policy restart trains with every replica, as the trainer does)."""
    return (costs or StepCosts(1.0)).plan(schedule.replicas, failed, policy)


@dataclass(frozen=True)
class DownSpan:
    """A replica's place is empty over ``[start_s, end_s)`` (seconds); ``returns``: someone heals into it."""

    replica: int
    start_s: float
    end_s: float


def down_spans(schedule: Schedule, slots: int, spares: int = 0, replace_s: float = 0.0) -> list[DownSpan]:
    """When each replica's place is empty: the schedule's windows (slots of SLOT_S), shortened by hot spares
    (module docstring; ``replace_s``: detection + a spare's start)."""
    pool = [0.0] * spares  # when each spare node is free
    out = []
    for w in schedule.windows:  # in start order
        start, repaired = w.start * SLOT_S, min(w.end, slots) * SLOT_S
        end = repaired
        if pool and max(start, pool[0]) + replace_s < repaired:
            end = max(start, heapq.heappop(pool)) + replace_s
            heapq.heappush(pool, repaired)  # the failed node, once repaired, is a spare
        out.append(DownSpan(w.replica, start, end))
    return out


def failure_intervals(spans: list[DownSpan], horizon_s: float) -> list[tuple[float, float, frozenset[int]]]:
    """[start, end) second ranges over which the failed set is constant, with that set."""
    changes: dict[float, list[tuple[int, int]]] = {}
    for s in spans:
        changes.setdefault(s.start_s, []).append((s.replica, 1))
        changes.setdefault(s.end_s, []).append((s.replica, -1))
    edges = sorted({0.0, horizon_s, *changes})
    down: dict[int, int] = {}
    out = []
    for a, b in zip(edges, edges[1:]):
        for replica, delta in changes.get(a, ()):
            down[replica] = down.get(replica, 0) + delta
        if a < horizon_s:
            out.append((a, b, frozenset(r for r, c in down.items() if c > 0)))
    return out


def down_counts(spans: list[DownSpan], horizon_s: float) -> list[tuple[float, float, int]]:
    """[start, end) second ranges over which the number of empty replica places is constant, with it."""
    changes: dict[float, int] = {}
    for s in spans:
        changes[s.start_s] = changes.get(s.start_s, 0) + 1
        changes[s.end_s] = changes.get(s.end_s, 0) - 1
    edges = sorted({0.0, horizon_s, *changes})
    out, k = [], 0
    for a, b in zip(edges, edges[1:]):
        k += changes.get(a, 0)
        if a < horizon_s:
            out.append((a, b, k))
    return out


def fraction_with_failure(schedule: Schedule, slots: int) -> float:
    spans = down_spans(schedule, slots)
    return sum(b - a for a, b, failed in failure_intervals(spans, slots * SLOT_S) if failed) / (slots * SLOT_S)


def young_daly_interval_s(save_s: float, mtbf_s: float) -> float:
    """The checkpoint period that minimises save time plus expected lost work: sqrt(2 x save x MTBF)."""
    return math.sqrt(2 * save_s * mtbf_s)


def restart_useful_fraction(failure_s: Iterable[float], horizon_s: float, events: EventCosts,
                            every_s: float) -> float:
    """Share of the horizon spent on work that survives, for checkpoint-restart.

    Every failure throws away the work since the last completed checkpoint and costs restart_s of
    dead time; between failures the job alternates every_s of work and a save_s checkpoint. The
    work after the last checkpoint counts at the end of the horizon (the job ends there)."""
    bounds = [0.0, *sorted(set(failure_s)), horizon_s]
    useful = 0.0
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        run = b - a - (events.restart_s if i > 0 else 0.0)
        if run <= 0:
            continue
        cycles = math.floor(run / (every_s + events.save_s))
        useful += cycles * every_s
        if b == horizon_s:
            useful += min(run - cycles * (every_s + events.save_s), every_s)
    return useful / horizon_s


@dataclass(frozen=True)
class ClusterResult:
    policy: str
    scenario: str
    seed: int
    n: int
    shards_per_s: float  # time-averaged
    drop_pct: float  # vs failure-free
    steps_per_s: float  # optimizer steps per second, time-averaged (the rate training progresses at)
    free_steps_per_s: float  # the same without failures
    approximated_share: float  # mean over steps of the share of the global batch run in neighbour mode
    dropped_share: float  # mean over steps of the share of the global batch dropped
    spares: int = 0
    down_share: float = 0.0  # mean share of replica places empty (after spares)


def simulate_cluster(failures: str | FailureProcess, policy: str, costs: StepCosts, events: EventCosts, *,
                     n: int = PAPER_REPLICAS, hours: float = 1000.0, seed: int = 0, spares: int = 0) -> ClusterResult:
    """Time-averaged throughput and step rate of an n-replica job over ``hours`` of the failure process
    (a scenario name or a :class:`FailureProcess`), with ``spares`` hot spare nodes.

    ``policy``: a trainer policy (:data:`mecefo.policy.POLICIES`) or one of :data:`FLOORS`."""
    process = failure_process(failures)
    slots = int(round(hours * 3600 / SLOT_S))
    schedule = process.schedule(n, hours, seed)
    horizon_s = slots * SLOT_S
    normal_step_s = costs.overhead_s + costs.compute_s
    free = n / normal_step_s
    if policy == "restart":
        mtbf_s = process.job_mtbf_h(n) * 3600
        every_s = young_daly_interval_s(events.save_s, mtbf_s) if events.save_s > 0 else horizon_s
        fraction = restart_useful_fraction((s * SLOT_S for s in schedule.failure_starts()), horizon_s, events, every_s)
        return ClusterResult(policy, process.name, seed, n, free * fraction, 100 * (1 - fraction),
                             fraction / normal_step_s, 1 / normal_step_s, 0.0, 0.0, spares)
    spans = down_spans(schedule, slots, spares, events.detect_s + events.start_s)
    shards = steps = approximated = dropped = down = 0.0
    for a, b, k in down_counts(spans, horizon_s):
        if policy in FLOORS:
            step_s = costs.floor_step_s(n, k, policy) if k else normal_step_s
            processed, share_approx, share_dropped = n, (k / n if policy == FLOOR_APPROXIMATE else 0.0), 0.0
        else:
            stats = plan_stats(costs, n, k, policy)
            step_s, processed = costs.overhead_s + costs.compute_s * stats.step_time, stats.processed
            share_approx, share_dropped = stats.approximated_share, stats.dropped_share
        count = (b - a) / step_s
        shards += count * processed
        steps += count
        approximated += count * share_approx
        dropped += count * share_dropped
        down += (b - a) * k
    # stalls: every failure start (detect) and every return (heal) stops the whole job, at the
    # throughput of the moment (close enough to the failure-free one: a stall is seconds long)
    stalls = len(spans) * events.detect_s + sum(s.end_s < horizon_s for s in spans) * events.heal_s
    shards -= stalls * free
    approximated_mean, dropped_mean = approximated / steps, dropped / steps
    steps -= stalls / normal_step_s
    return ClusterResult(policy, process.name, seed, n, shards / horizon_s, 100 * (1 - shards / horizon_s / free),
                         steps / horizon_s, 1 / normal_step_s, approximated_mean, dropped_mean, spares,
                         down / (horizon_s * n))
