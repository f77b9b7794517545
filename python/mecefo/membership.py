"""Who runs which sequences in a step, in which mode: the step plan and its gradient normalisers.

The job has ``n`` replicas and the global batch has ``n`` shards of ``m`` sequences; replica ``i``
owns shard ``i``. Each step starts from the set of live replicas (torchft's quorum, minus replicas
a failure schedule has taken out). A plan assigns every live replica a list of **work items**
``(shard, sequence range, mode)`` with mode ``exact`` or ``neighbour`` (MeCeFO's neighbour mode).
Everything here is a pure, deterministic function of ``(n, live, m, policy, costs)``, so every
replica computes the same plan without talking to the others, and a replayed step replays it.

Takeover (:mod:`mecefo.policy`):

* ``neighbour`` (Neighbor-Do-Both): each live replica runs its own shard and at most one orphaned
  shard (a dead replica's), so no replica does more than twice the normal work. A dead shard goes
  to the first live replica after it in ring order (``d+1, d+2, ... mod n``) that does not already
  hold an orphan. Dead shards are served nearest-first: the shard right before a live replica
  claims it first, then the one before that continues along the ring. A single failure of ``d``
  is therefore always covered by the next live replica, and a second failure elsewhere does not
  move that assignment. With more than half the replicas gone, ``dead - live`` shards (the ones
  farthest from a live successor) are dropped for that step.
* ``spread``: the dead shards' sequences are dealt one at a time to the least-loaded live replica
  (load: the predicted time of its work; ties in ring order from the first dead shard), each at
  most ``max_load`` shards of work in all; then laid out in order, so each replica gets contiguous
  sequence ranges, run as extra micro-batches of at most ``m`` sequences (peak activation memory
  as in a normal step). What exceeds every bound is dropped and reported.
* ``drop``: dead shards are dropped (torchft's default behaviour).

Approximation: ``both`` puts all the work of a replica that takes anything over in neighbour
mode, ``orphan`` only the work taken over, ``none`` nothing.

``auto`` (either choice): among the candidate plans, the one with the least predicted **time per
unit of training progress**::

    score = predicted step time / (1 - penalty x approximated share - drop_penalty x dropped share)

the shares being fractions of the global batch (n x m sequences) run in neighbour mode and
dropped. Predicted step time: the largest load over the live replicas, a sequence costing
``costs.exact`` (1) exactly and ``costs.neighbour`` in neighbour mode
(:class:`mecefo.costs.WorkCosts`). ``penalty`` and ``drop_penalty`` are the fractions of a step's
progress lost per unit share of its batch approximated or dropped, measured by bench/fidelity.py
(README, "Takeover policies"). So exact work is preferred while it costs at most
``1 / (1 - penalty x share) - 1`` more step time, a margin that grows with the work
approximated. Ties go to the plan dropping less, then the more exact one, then to spreading. The
plan records why it was chosen.

Normalisers follow from counting: each parameter group is divided by the number of shards'
worth of sequences that contributed a gradient to it. Attention parameters and input_layernorm
(which neighbour mode leaves without a gradient) count the exact sequences only; every other
parameter counts every processed sequence. With no failure both are ``n``; under exact takeover
both are the processed shards (the full-batch mean); under the paper's MeCeFO attention gets
``|N|``, the live replicas that are not neighbours; under shrink both are ``|live|``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from .costs import WorkCosts
from .policy import POLICIES, PRESETS, Policy, check_policy, resolve_policy  # noqa: F401  (re-exported)

EXACT = "exact"
NEIGHBOUR = "neighbour"
DEFAULT_MAX_LOAD = 2.0  # shards of work a spreading replica may run: as much as a Neighbor-Do-Both neighbour
# auto's penalties: progress lost per unit share of the batch approximated / dropped, as measured by
# bench/fidelity.py (docs/fidelity-cpu-steps900.md, tiny, high schedule, 3 seeds): orphan-only
# approximation with the momentum basis 0.42 +- 0.26, shrink 0.48 +- 0.10. Both below 1: at this scale
# a dropped or approximated sequence costs about half a sequence of progress, so auto mostly drops.
DEFAULT_PENALTY = 0.42
DEFAULT_DROP_PENALTY = 0.48


def _check_live(n: int, live: Iterable[int]) -> tuple[int, ...]:
    if n < 1:
        raise ValueError(f"n (number of replicas) must be >= 1, got {n}")
    live = tuple(sorted(set(live)))
    bad = [r for r in live if not 0 <= r < n]
    if bad:
        raise ValueError(f"live replicas must be in [0, {n}), got {bad}")
    return live


def distance_to_live(n: int, live: Iterable[int], shard: int) -> int:
    """Ring steps from ``shard`` to the first live replica after it (n if none is live)."""
    live_set = set(live)
    for k in range(1, n + 1):
        if (shard + k) % n in live_set:
            return k
    return n


def assign_orphans(n: int, live: Iterable[int]) -> dict[int, int]:
    """Neighbour takeover: dead shard -> the live replica that also runs it; missing dead shards are dropped.

    See the module docstring for the rule. Deterministic: depends only on ``n`` and the live set.
    """
    live = _check_live(n, live)
    live_set = set(live)
    dead = [d for d in range(n) if d not in live_set]
    owners: dict[int, int] = {}
    taken: set[int] = set()
    for d in sorted(dead, key=lambda s: (distance_to_live(n, live_set, s), s)):
        for k in range(1, n):
            candidate = (d + k) % n
            if candidate in live_set and candidate not in taken:
                owners[d] = candidate
                taken.add(candidate)
                break
    return owners


@dataclass(frozen=True)
class WorkItem:
    """Sequences ``[start, stop)`` of shard ``shard``'s micro-batch, run as one micro-batch in ``mode``."""

    shard: int
    start: int
    stop: int
    mode: str = EXACT

    @property
    def sequences(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"{self.shard}[{self.start}:{self.stop}]{'~' if self.mode == NEIGHBOUR else ''}"


@dataclass(frozen=True)
class Normalisers:
    """What the summed gradients are divided by, in shards (sequences / m).

    ``attention`` applies to the parameters neighbour mode skips (attention projections and
    input_layernorm); ``None`` means no sequence ran exactly this step and they are not updated.
    ``rest`` applies to every other parameter.
    """

    attention: float | None
    rest: float


@dataclass(frozen=True)
class StepPlan:
    """What every live replica runs in one step.

    ``work`` maps each live replica to its work items, its own shard first; ``policy`` is the fixed
    policy the plan follows (auto's choice); ``reason`` says why auto chose it ("" otherwise).
    """

    n: int
    live: tuple[int, ...]
    sequences: int  # m: sequences per shard
    policy: Policy
    work: dict[int, tuple[WorkItem, ...]]
    reason: str = ""
    predicted: float | None = field(default=None, compare=False)  # auto: predicted step time

    @property
    def dead(self) -> tuple[int, ...]:
        live = set(self.live)
        return tuple(r for r in range(self.n) if r not in live)

    def items_of(self, replica: int) -> tuple[WorkItem, ...]:
        """The work items ``replica`` runs, its own shard first; () if it is not live."""
        return self.work.get(replica, ())

    def shards_of(self, replica: int) -> tuple[int, ...]:
        """The shards ``replica`` runs sequences of, its own first."""
        return tuple(dict.fromkeys(item.shard for item in self.items_of(replica)))

    def taken_over(self, replica: int) -> tuple[WorkItem, ...]:
        return tuple(item for item in self.items_of(replica) if item.shard != replica)

    @property
    def owners(self) -> dict[int, tuple[int, ...]]:
        """Dead shard -> the live replicas running its sequences (a shard nobody runs is absent)."""
        found: dict[int, list[int]] = {}
        for replica in self.live:
            for item in self.taken_over(replica):
                found.setdefault(item.shard, []).append(replica)
        return {d: tuple(found[d]) for d in sorted(found)}

    @property
    def neighbours(self) -> tuple[int, ...]:
        """Live replicas that run taken-over work as well as their own."""
        return tuple(r for r in self.live if self.taken_over(r))

    def is_neighbour(self, replica: int) -> bool:
        return bool(self.taken_over(replica))

    @property
    def non_neighbours(self) -> tuple[int, ...]:
        """The set N of the paper: live replicas that run no taken-over work."""
        return tuple(r for r in self.live if not self.taken_over(r))

    def runs_neighbour_mode(self, replica: int | None = None) -> bool:
        """Whether ``replica`` (None: any replica) runs work in neighbour mode."""
        replicas = self.live if replica is None else (replica,)
        return any(item.mode == NEIGHBOUR for r in replicas for item in self.items_of(r))

    @cached_property
    def _mode_counts(self) -> dict[int, tuple[int, int]]:
        """Live replica -> (exact sequences, neighbour-mode sequences) it runs."""
        counts = {}
        for r, items in self.work.items():
            exact = sum(item.sequences for item in items if item.mode == EXACT)
            counts[r] = (exact, sum(item.sequences for item in items) - exact)
        return counts

    def _count(self, mode: str | None = None) -> int:
        column = {EXACT: (0,), NEIGHBOUR: (1,), None: (0, 1)}[mode]
        return sum(c[i] for c in self._mode_counts.values() for i in column)

    @property
    def processed_sequences(self) -> int:
        return self._count()

    @property
    def dropped_sequences(self) -> int:
        return self.n * self.sequences - self.processed_sequences

    @property
    def processed(self) -> float:
        """Shards' worth of sequences in this step's global batch."""
        return self.processed_sequences / self.sequences

    @property
    def dropped(self) -> tuple[int, ...]:
        """Shards none of whose sequences run this step."""
        run = {item.shard for items in self.work.values() for item in items}
        return tuple(s for s in range(self.n) if s not in run)

    def dropped_ranges(self) -> list[tuple[int, int, int]]:
        """(shard, start, stop) of every sequence range nobody runs."""
        covered: dict[int, list[tuple[int, int]]] = {}
        for items in self.work.values():
            for item in items:
                covered.setdefault(item.shard, []).append((item.start, item.stop))
        ranges = []
        for shard in range(self.n):
            pos = 0
            for start, stop in sorted(covered.get(shard, [])):
                if start > pos:
                    ranges.append((shard, pos, start))
                pos = max(pos, stop)
            if pos < self.sequences:
                ranges.append((shard, pos, self.sequences))
        return ranges

    def normalisers(self) -> Normalisers:
        """Per group, the shards' worth of sequences that contributed a gradient (module docstring)."""
        exact = self._count(EXACT)
        return Normalisers(attention=exact / self.sequences if exact else None, rest=self.processed)

    def load(self, replica: int, costs: WorkCosts) -> float:
        """Predicted compute time of ``replica``'s work, in normal steps (own shard exact = 1)."""
        exact, neighbour = self._mode_counts.get(replica, (0, 0))
        return (exact * costs.exact + neighbour * costs.neighbour) / self.sequences

    def step_time(self, costs: WorkCosts) -> float:
        """Predicted compute time of the step: the slowest live replica's load."""
        return max((self.load(r, costs) for r in self.live), default=0.0)

    def describe(self) -> str:
        """One line for logs: who is gone, who runs what, what is dropped."""
        if not self.dead:
            return f"all {self.n} replicas live"
        parts = [f"dead {list(self.dead)}", self.policy.name]
        takers = [f"{r}: " + " ".join(i.describe() for i in self.items_of(r)) for r in self.neighbours]
        if takers:
            parts.append("; ".join(takers))
        if self.dropped_sequences:
            whole = [f"shards {list(self.dropped)}"] if self.dropped else []
            partial = [f"{s}[{a}:{b}]" for s, a, b in self.dropped_ranges() if s not in self.dropped]
            parts.append(f"dropped {' and '.join(whole + partial)} (global batch "
                         f"{self.processed_sequences}/{self.n * self.sequences} sequences)")
        if self.reason:
            parts.append(self.reason)
        return "; ".join(parts)


def _own_mode(policy: Policy, takes_over: bool) -> str:
    return NEIGHBOUR if policy.approximate == "both" and takes_over else EXACT


def _orphan_mode(policy: Policy) -> str:
    return NEIGHBOUR if policy.approximate in ("both", "orphan") else EXACT


def _neighbour_work(n: int, live: tuple[int, ...], m: int, policy: Policy) -> dict[int, tuple[WorkItem, ...]]:
    owners = assign_orphans(n, live)
    covers = {owner: d for d, owner in owners.items()}
    work = {}
    for r in live:
        items = [WorkItem(r, 0, m, _own_mode(policy, r in covers))]
        if r in covers:
            items.append(WorkItem(covers[r], 0, m, _orphan_mode(policy)))
        work[r] = tuple(items)
    return work


def _spread_work(n: int, live: tuple[int, ...], m: int, policy: Policy, costs: WorkCosts,
                 max_load: float) -> dict[int, tuple[WorkItem, ...]]:
    dead = [d for d in range(n) if d not in set(live)]
    if not dead:
        return {r: (WorkItem(r, 0, m),) for r in live}
    capacity = max(0, int(max_load * m + 1e-9) - m)  # extra sequences a replica may take
    orphan_cost = costs.of(_orphan_mode(policy))

    def load(count: int) -> float:  # a replica's work (in sequence costs) with `count` orphan sequences
        return (m * costs.of(_own_mode(policy, count > 0))) + count * orphan_cost

    first = dead[0]
    order = sorted(live, key=lambda r: (r - first - 1) % n)  # ring order after the first dead shard
    total = len(dead) * m
    if policy.approximate != "both":
        # every replica starts at the same load and each orphan sequence adds the same cost: the
        # least-loaded-first deal is a round robin in ring order, capped by the bound
        base, extra = divmod(total, len(order))
        counts = {r: min(capacity, base + (i < extra)) for i, r in enumerate(order)}
    else:  # a replica's own shard turns approximate with its first orphan sequence: deal one at a time
        counts = dict.fromkeys(order, 0)
        rank = {r: i for i, r in enumerate(order)}
        for _ in range(total):
            open_ = [r for r in order if counts[r] < capacity]
            if not open_:
                break
            counts[min(open_, key=lambda r: (load(counts[r] + 1), rank[r]))] += 1
    # lay the orphan sequences out in order: each replica gets consecutive ranges
    sequences = [(d, j) for d in dead for j in range(m)]
    position = 0
    extra: dict[int, list[WorkItem]] = {r: [] for r in order}
    for r in order:
        chunk = sequences[position:position + counts[r]]
        position += counts[r]
        for d in dict.fromkeys(s for s, _ in chunk):
            js = [j for s, j in chunk if s == d]
            extra[r].append(WorkItem(d, js[0], js[-1] + 1, _orphan_mode(policy)))
    return {r: (WorkItem(r, 0, m, _own_mode(policy, bool(extra[r]))), *extra[r]) for r in live}


def _fixed_plan(n: int, live: tuple[int, ...], m: int, policy: Policy, costs: WorkCosts, max_load: float) -> StepPlan:
    if policy.takeover == "spread":
        work = _spread_work(n, live, m, policy, costs, max_load)
    elif policy.takeover == "neighbour":
        work = _neighbour_work(n, live, m, policy)
    else:  # drop
        work = {r: (WorkItem(r, 0, m),) for r in live}
    return StepPlan(n=n, live=live, sequences=m, policy=policy, work=work)


APPROXIMATION_PREFERENCE = ("none", "orphan", "both")


def approximated_share(plan: StepPlan) -> float:
    """Share of the global batch (n x m sequences) run in neighbour mode."""
    return plan._count(NEIGHBOUR) / (plan.n * plan.sequences)


def dropped_share(plan: StepPlan) -> float:
    """Share of the global batch nobody runs."""
    return plan.dropped_sequences / (plan.n * plan.sequences)


def progress_score(plan: StepPlan, costs: WorkCosts, penalty: float, drop_penalty: float) -> float:
    """auto's criterion: predicted step time per unit of training progress (lower is better)."""
    progress = 1.0 - penalty * approximated_share(plan) - drop_penalty * dropped_share(plan)
    return plan.step_time(costs) / progress if progress > 0 else float("inf")


def _choose(n: int, live: tuple[int, ...], m: int, policy: Policy, costs: WorkCosts, max_load: float,
            penalty: float, drop_penalty: float) -> StepPlan:
    """auto: the least time per unit of progress among the candidates (module docstring)."""
    plans = [_fixed_plan(n, live, m, candidate, costs, max_load) for candidate in policy.candidates()]
    order = {a: i for i, a in enumerate(APPROXIMATION_PREFERENCE)}

    def score(p: StepPlan) -> float:
        return progress_score(p, costs, penalty, drop_penalty)

    ranked = sorted(plans, key=lambda p: (round(score(p), 12), p.dropped_sequences, order[p.policy.approximate]))
    chosen = ranked[0]
    t = chosen.step_time(costs)
    if set(live) == set(range(n)):
        return StepPlan(n, live, m, chosen.policy, chosen.work, "", t)

    def summary(p: StepPlan) -> str:
        return (f"{p.policy.name} {p.step_time(costs):.3f}x, {approximated_share(p):.1%} approximated, "
                f"{dropped_share(p):.1%} dropped: {score(p):.3f} per unit of progress")

    others = "; ".join(summary(p) for p in ranked[1:])
    reason = (f"auto chose {summary(chosen)} (penalties {penalty:g} approximated, {drop_penalty:g} dropped"
              + (f"; others: {others})" if others else ")"))
    return StepPlan(n, live, m, chosen.policy, chosen.work, reason, t)


def plan_step(n: int, live: Iterable[int], policy: str | Policy, *, sequences: int = 1,
              costs: WorkCosts | None = None, max_load: float = DEFAULT_MAX_LOAD,
              penalty: float = DEFAULT_PENALTY, drop_penalty: float = DEFAULT_DROP_PENALTY) -> StepPlan:
    """The plan for one step with the given live replicas.

    Args:
        n: replicas (= shards) in the job.
        live: the live replicas this step.
        policy: a preset name (:data:`mecefo.policy.POLICIES`) or a :class:`mecefo.policy.Policy`.
        sequences: m, sequences per shard (spreading works at this granularity).
        costs: per-sequence costs for spreading's load balance and auto's choice (default: exact 1,
            neighbour mode :data:`mecefo.costs.DEFAULT_NEIGHBOUR_COST`).
        max_load: spreading: the most work a replica runs, in shards.
        penalty, drop_penalty: auto: progress lost per unit share of the batch approximated / dropped.
    """
    policy = resolve_policy(policy)
    live = _check_live(n, live)
    if not live:
        raise ValueError(f"no live replica among {n}: nothing can run this step")
    if isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 1:
        raise ValueError(f"sequences (per shard) must be an int >= 1, got {sequences!r}")
    if max_load < 1:
        raise ValueError(f"max_load must be >= 1 shard (a replica's own), got {max_load}")
    if penalty < 0 or drop_penalty < 0:
        raise ValueError(f"penalty and drop_penalty must be >= 0, got {penalty} and {drop_penalty}")
    costs = costs or WorkCosts()
    if policy.restart:
        policy = Policy("neighbour", "none")  # restart never trains with a replica missing; as exact NDB if it did
    if policy.is_auto:
        return _choose(n, live, sequences, policy, costs, max_load, penalty, drop_penalty)
    return _fixed_plan(n, live, sequences, policy, costs, max_load)


def normalisers(plan: StepPlan) -> Normalisers:
    """:meth:`StepPlan.normalisers`."""
    return plan.normalisers()
