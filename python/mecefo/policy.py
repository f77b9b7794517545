"""Failure policies: who runs a dead replica's work, and which work runs in MeCeFO's neighbour mode.

Two independent choices make a policy (MECEFO.md, "Beyond the paper"):

* **takeover**, who runs the sequences of a dead replica's shard (an *orphan* shard):

  - ``neighbour``: one live replica runs the whole orphan shard besides its own (Neighbor-Do-Both,
    the paper); at most one orphan per replica, so at most twice the normal work;
  - ``spread``: the orphan sequences are divided over all live replicas, least-loaded first, and
    run as extra micro-batches with gradient accumulation (what Oobleck, ReCycle and ElasWave do
    for pipelines): about ``k / (n - k)`` extra work each with ``k`` of ``n`` down;
  - ``drop``: nobody runs them; the global batch shrinks (torchft's default behaviour);

* **approximate**, which work runs in MeCeFO's neighbour mode (attention backward skipped, FFN
  recomputed, low-rank FFN weight gradients):

  - ``both``: a replica that takes work over runs *all* its work in neighbour mode, its own
    shard included (the paper's neighbour);
  - ``orphan``: only the work taken over; every replica's own shard runs exactly;
  - ``none``: everything exactly (exact Neighbor-Do-Both, or exact spreading).

``auto`` for either choice lets :func:`mecefo.membership.plan_step` pick, per step, the allowed
plan with the least predicted step time per unit of training progress, approximated and dropped
work each costing a measured fraction of a step's progress (see :mod:`mecefo.membership`).
``auto`` approximation chooses between ``none`` and ``orphan`` (``both`` approximates work that
nobody lost); ``auto`` takeover between ``spread``, ``neighbour`` and ``drop``.

The names users know are presets (``--policy``); ``--takeover`` / ``--approximate`` override a
preset's fields:

================  ============  ===========  ==================================================
preset            takeover      approximate  what it is
================  ============  ===========  ==================================================
mecefo            neighbour     both         MeCeFO as published
ndb-exact         neighbour     none         exact Neighbor-Do-Both (double work)
shrink            drop          none         drop the dead shards (torchft's default)
restart           (restart)     none         checkpoint-restart of the whole job
spread            spread        none         exact, the orphan spread over every survivor
spread-orphan     spread        orphan       spread, only the taken-over sequences approximated
neighbour-orphan  neighbour     orphan       one neighbour, only the orphan shard approximated
auto              auto          auto         per step, the least time per unit of progress
================  ============  ===========  ==================================================

Restart is not a takeover: the supervisor restarts the whole job from its newest checkpoint on
every failure, so a step never runs with a replica missing.
"""

from __future__ import annotations

from dataclasses import dataclass

TAKEOVERS = ("neighbour", "spread", "drop", "auto")
APPROXIMATIONS = ("both", "orphan", "none", "auto")
BASES = ("weight", "momentum")  # what the low-rank bases are the top right singular vectors of


@dataclass(frozen=True)
class Policy:
    """A failure policy: ``takeover`` and ``approximate`` (see the module docstring); ``restart``: the
    whole job restarts from a checkpoint on any failure (the two choices are then moot)."""

    takeover: str
    approximate: str
    restart: bool = False

    def __post_init__(self):
        if self.takeover not in TAKEOVERS:
            raise ValueError(f"takeover must be one of {', '.join(TAKEOVERS)}, got {self.takeover!r}")
        if self.approximate not in APPROXIMATIONS:
            raise ValueError(f"approximate must be one of {', '.join(APPROXIMATIONS)}, got {self.approximate!r}")
        if self.takeover == "drop" and self.approximate != "none":
            raise ValueError(f"takeover 'drop' takes no work over, so there is nothing to approximate: use "
                             f"approximate 'none', not {self.approximate!r}")

    @property
    def name(self) -> str:
        """The preset's name if it is one, else ``takeover+approximate``."""
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        return f"{self.takeover}+{self.approximate}"

    @property
    def is_auto(self) -> bool:
        return "auto" in (self.takeover, self.approximate)

    @property
    def may_approximate(self) -> bool:
        """Whether any step of this policy can run work in neighbour mode (the model must be patched)."""
        return self.approximate != "none" and not self.restart

    def candidates(self) -> list[Policy]:
        """The fixed policies ``auto`` chooses among (just this one if it is not auto)."""
        takeovers = ("spread", "neighbour", "drop") if self.takeover == "auto" else (self.takeover,)
        approximations = ("none", "orphan") if self.approximate == "auto" else (self.approximate,)
        return [Policy(t, a) for a in approximations for t in takeovers if t != "drop" or a == "none"]


PRESETS: dict[str, Policy] = {
    "mecefo": Policy("neighbour", "both"),
    "ndb-exact": Policy("neighbour", "none"),
    "shrink": Policy("drop", "none"),
    "restart": Policy("neighbour", "none", restart=True),
    "spread": Policy("spread", "none"),
    "spread-orphan": Policy("spread", "orphan"),
    "neighbour-orphan": Policy("neighbour", "orphan"),
    "auto": Policy("auto", "auto"),
}
POLICIES = tuple(PRESETS)


def check_policy(policy: str) -> str:
    if policy not in PRESETS:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def resolve_policy(policy: str | Policy, *, takeover: str | None = None, approximate: str | None = None) -> Policy:
    """A preset name (or a Policy) with ``takeover`` / ``approximate`` overriding its fields."""
    base = policy if isinstance(policy, Policy) else PRESETS[check_policy(policy)]
    if base.restart and (takeover or approximate):
        raise ValueError("policy restart restarts the whole job on a failure: --takeover and --approximate do "
                         "not apply to it")
    return Policy(takeover or base.takeover, approximate or base.approximate, base.restart)
