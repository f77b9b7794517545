"""Who runs which data shard in a step: the live set, neighbour assignment, dropped shards.

The job has ``n`` replicas and the global batch has ``n`` shards; replica ``i`` owns shard ``i``.
Each step starts from the set of live replicas (torchft's quorum, minus replicas a failure
schedule has taken out). Everything here is a pure function of ``(n, live, policy)``, so every
replica computes the same plan without talking to the others.

Neighbour assignment (Neighbor-Do-Both, policies ``mecefo`` and ``ndb-exact``):

* each live replica runs its own shard and at most one orphaned shard (a dead replica's shard),
  so no replica ever does more than twice the normal work;
* a dead shard goes to the first live replica after it in ring order (``d+1, d+2, ... mod n``)
  that does not already hold an orphan. Dead shards are served nearest-first: the shard right
  before a live replica claims it first, then the one before that continues along the ring.
  A single failure of ``d`` is therefore always covered by the next live replica, and a second
  failure elsewhere does not move that assignment;
* with two or more simultaneous failures every dead shard is owned by exactly one live
  neighbour as long as ``dead <= live`` (at most half the replicas gone). With more than half
  gone there are not enough live replicas to double up: ``dead - live`` shards are dropped for
  that step (the ones farthest from a live successor), the global batch shrinks to
  ``n - dropped`` shards, and :func:`plan_step` records which, so the trainer logs it and
  divides by the shards actually processed.

Policy ``shrink`` (torchft's default behaviour) assigns nothing: dead shards are dropped.
Policy ``restart`` never trains with a replica missing (the job restarts from a checkpoint),
so its plan is the NDB plan, which is the plain plan when everyone is live.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

POLICIES = ("mecefo", "ndb-exact", "shrink", "restart")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


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
    """Dead shard -> the live replica that also runs it; dead shards missing from the result are dropped.

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
class StepPlan:
    """What every replica does in one step.

    ``owners`` maps each orphaned shard to the live replica that runs it; ``dropped`` lists the
    shards nobody runs this step (policy ``shrink``, or more than half the replicas gone).
    """

    n: int
    live: tuple[int, ...]
    owners: dict[int, int]
    dropped: tuple[int, ...]

    @property
    def dead(self) -> tuple[int, ...]:
        live = set(self.live)
        return tuple(r for r in range(self.n) if r not in live)

    @property
    def neighbours(self) -> tuple[int, ...]:
        """Live replicas that run an orphaned shard as well as their own."""
        return tuple(sorted(self.owners.values()))

    @property
    def non_neighbours(self) -> tuple[int, ...]:
        """The set N of the paper: live replicas that are not neighbours."""
        busy = set(self.owners.values())
        return tuple(r for r in self.live if r not in busy)

    @property
    def processed(self) -> int:
        """Shards in this step's global batch."""
        return self.n - len(self.dropped)

    def shards_of(self, replica: int) -> tuple[int, ...]:
        """The shards ``replica`` runs, its own first; () if it is not live."""
        if replica not in self.live:
            return ()
        return (replica,) + tuple(d for d, owner in sorted(self.owners.items()) if owner == replica)

    def is_neighbour(self, replica: int) -> bool:
        return replica in self.owners.values()

    def describe(self) -> str:
        """One line for logs: who is gone, who covers whom, what is dropped."""
        if not self.dead:
            return f"all {self.n} replicas live"
        parts = [f"dead {list(self.dead)}"]
        if self.owners:
            parts.append("neighbours " + ", ".join(f"{d}->{o}" for d, o in sorted(self.owners.items())))
        if self.dropped:
            parts.append(f"dropped shards {list(self.dropped)} (global batch {self.processed}/{self.n} shards)")
        return "; ".join(parts)


def plan_step(n: int, live: Iterable[int], policy: str) -> StepPlan:
    """The plan for one step with the given live replicas under ``policy``."""
    check_policy(policy)
    live = _check_live(n, live)
    if not live:
        raise ValueError(f"no live replica among {n}: nothing can run this step")
    dead = [r for r in range(n) if r not in set(live)]
    owners = {} if policy == "shrink" else assign_orphans(n, live)
    dropped = tuple(d for d in dead if d not in owners)
    return StepPlan(n=n, live=live, owners=owners, dropped=dropped)


@dataclass(frozen=True)
class Normalisers:
    """What the summed gradients are divided by.

    ``attention`` applies to the parameters the neighbour path skips (attention projections and
    input_layernorm under MeCeFO); ``None`` means no replica produced a gradient for them this
    step (every live replica is a neighbour) and they are not updated. ``rest`` applies to
    every other parameter.
    """

    attention: int | None
    rest: int


def normalisers(plan: StepPlan, policy: str) -> Normalisers:
    """MECEFO.md's averaging rules.

    * mecefo: attention params over |N| (live non-neighbour replicas; neighbours contribute
      nothing), everything else over the shards processed (n unless more than half are gone);
    * ndb-exact / restart: every shard's exact gradient is present: all params over the shards
      processed, i.e. the full-batch mean;
    * shrink: every live replica ran only its own shard: all params over |live|.
    """
    check_policy(policy)
    if policy == "shrink":
        return Normalisers(attention=len(plan.live), rest=len(plan.live))
    if policy == "mecefo":
        return Normalisers(attention=len(plan.non_neighbours) or None, rest=plan.processed)
    return Normalisers(attention=plan.processed, rest=plan.processed)
