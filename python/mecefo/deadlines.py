"""How long a rank waits for its peers, and how often one step may be replayed before the run gives up.

A collective's timeout runs from the moment a rank posts it. With uneven work (a replica that sits
out, a neighbour running two shards) the early ranks post long before the late ones, so a fixed
timeout shorter than the plan's own imbalance fails every attempt of the step, and the replay has
the same plan: an endless replay. Two rules keep "a peer is slow" apart from "a peer is gone":

* **Deadline from the plan.** Every replica knows the plan, so it knows how much longer than its own
  work the slowest replica's work is (:meth:`mecefo.membership.StepPlan.load`, in normal shards).
  The collective deadline of replica ``i`` is ``floor + SLACK x (max load - load_i) x unit``:
  ``floor`` is ``--timeout`` (how long a peer may be silent beyond its predicted work), ``unit`` the
  job's measured compute seconds per shard (the mean over every rank, summed in the step's loss
  all-reduce, so every replica holds the same figure once a step has committed; the largest of the
  last :data:`WINDOW` steps). A state transfer (healing) waits ``floor + SLACK x bytes / bandwidth``
  per message, ``bytes`` the largest tensor of the state and ``bandwidth`` the best this replica
  measured on its gradient all-reduces (:data:`ASSUMED_BANDWIDTH` before it has measured any).
  Each replay of a step lengthens both deadlines once more (``x (1 + replay)``): an estimate that was
  too short (no step measured yet, a rank slower than the job's mean) is outgrown within a few replays.
* **Bounded replays.** A step discarded more than ``--max-replays`` times in a row ends the run
  (:class:`ReplaysExhausted`, exit 1), naming the last failure and the option. Before that, a group
  cut off from the other groups while the lighthouse still answers (so it stays in every quorum and
  every step fails) leaves the job (:class:`CutOff`), so that the others go on without it
  (:meth:`mecefo.group.GroupGuard.cut_off`).

Dead peers are not found by these deadlines: a process that dies closes its connections (the
collective fails at once) and stops heartbeating (the lighthouse drops it); a hung or cut-off one is
dropped by the lighthouse after ``--heartbeat-timeout``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SLACK = 2.0  # a rank may be this many times slower than the job's mean before its peers stop waiting
WINDOW = 8  # committed steps over which the compute time per shard is remembered (the largest is used)
ASSUMED_BANDWIDTH = 100e6  # bytes/s before any all-reduce was measured: gloo over 1 Gb/s Ethernet


class ReplaysExhausted(RuntimeError):
    """One step was discarded more often in a row than ``--max-replays`` allows."""


class CutOff(RuntimeError):
    """This group cannot reach most of its quorum while the lighthouse still answers: it leaves the job."""


@dataclass
class Deadlines:
    """A replica's deadlines (module docstring); ``floor_s`` is ``--timeout``."""

    floor_s: float
    units: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # seconds per shard of work, per step
    bandwidth: float | None = None  # bytes/s, the best gradient all-reduce this replica measured

    @property
    def unit_s(self) -> float | None:
        """Compute seconds per shard of work (the largest of the last steps), None before any was measured."""
        return max(self.units) if self.units else None

    def observe_compute(self, seconds: float, shards: float) -> None:
        """The job's compute seconds and shards of work of one committed step (summed over every rank)."""
        if shards > 0 and seconds > 0:
            self.units.append(seconds / shards)

    def observe_allreduce(self, nbytes: int, seconds: float) -> None:
        """One of this replica's gradient all-reduces: waiting in it only lowers the estimate (safe side)."""
        if nbytes > 0 and seconds > 0:
            self.bandwidth = max(self.bandwidth or 0.0, nbytes / seconds)

    def collective_s(self, own_load: float, max_load: float, replay: int = 0) -> float:
        """Seconds this replica's collectives wait: ``own_load`` / ``max_load`` in shards of work."""
        unit = self.unit_s or 0.0
        return (self.floor_s + SLACK * max(0.0, max_load - own_load) * unit) * (1 + replay)

    def transfer_s(self, largest_message: int, replay: int = 0) -> float:
        """Seconds one message of a state transfer may take (``largest_message`` bytes)."""
        return (self.floor_s + SLACK * largest_message / (self.bandwidth or ASSUMED_BANDWIDTH)) * (1 + replay)


@dataclass
class ReplayBudget:
    """Counts the discarded attempts of the step being tried; :class:`ReplaysExhausted` past ``max_replays``."""

    max_replays: int
    step: int = -1
    discarded: int = 0

    def replay(self, step: int) -> int:
        """How many times ``step`` was discarded in a row so far (0: this is its first attempt)."""
        if step != self.step:
            self.step, self.discarded = step, 0
        return self.discarded

    def discard(self, step: int, reason: str) -> None:
        """Record a discarded attempt of ``step``; raise if no replay is left."""
        self.replay(step)
        self.discarded += 1
        if self.discarded > self.max_replays:
            raise ReplaysExhausted(
                f"step {step} was discarded {self.discarded} time{'s' if self.discarded > 1 else ''} in a row "
                f"(last: {reason}); a peer stays "
                f"unreachable or slower than every deadline: ending the run (--max-replays {self.max_replays}; "
                "--timeout is the deadlines' floor)")
