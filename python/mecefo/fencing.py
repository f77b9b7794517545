"""Fencing: a job trains one lineage; a replica that is behind and alone stops instead of branching.

torchft decides who is in each step's quorum, but a quorum knows only its own members' steps.
A replica that was hung (SIGSTOP, a stalled host) long enough for the others to finish or die
wakes up, forms a quorum of itself at its stale step, and would train a second branch of the
job from there: the same steps committed twice, checkpoints and the summary overwritten by a
model the job never had. Two rules, enforced through the job's :class:`CommitLedger`, prevent it:

1. **Behind**: after its quorum, a replica about to run step ``s`` checks that nobody committed
   ``s`` yet. Members of a current quorum are all at the job's next step, which nobody has
   committed; a replica whose quorum is at a step the job already committed is behind, and since
   its quorum did not heal it, nobody it can reach holds the job's state.
2. **Claim**: a replica that torchft lets commit step ``s`` first claims ``s`` for its quorum
   (compare-and-set in the job's store). The members of one quorum all claim the same id; a
   second quorum committing the same step (two disjoint quorums can exist when a hung replica
   wakes) finds the step owned by another quorum and applies nothing.

A fenced replica applies no update and writes nothing: it raises :class:`Fenced`, and the
replica process exits with :data:`FENCED_EXIT_CODE`. The supervisor then restarts it to heal
from a live peer, or, when every replica is gone, relaunches the job from the newest valid
checkpoint; when the job has already finished, a fenced replica is reported and the run is
complete.

The ledger lives in the supervisor's store (a TCPStore on 127.0.0.1 that outlives every
replica process of a launch), one key per committed step, under the launch generation (a job
restart replays steps from a checkpoint under a new generation, a new set of keys).

Lineage: every committed step extends the training state's lineage, a short hash chain over
(step, generation, quorum id) of the commits that produced it; it travels with the state (heal,
checkpoints) so a checkpoint can tell whether it belongs to the same branch as the file it would
replace (:func:`mecefo.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import hashlib

from torch.distributed import Store

FENCED_EXIT_CODE = 76  # a replica stopped by fencing: it was behind and nobody could heal it
ROOT_LINEAGE = "root"  # the lineage of a job's initial state (every replica builds it from the seed)


class Fenced(RuntimeError):
    """This replica may not train or commit this step: the job has moved on without it."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"step {step}: {reason}")
        self.step = step
        self.reason = reason


def next_lineage(lineage: str, step: int, generation: int, quorum_id: int) -> str:
    """The lineage after committing ``step`` in quorum ``quorum_id`` of launch generation ``generation``."""
    return hashlib.sha256(f"{lineage}|{step}|{generation}|{quorum_id}".encode()).hexdigest()[:16]


class CommitLedger:
    """Which quorum committed each step of the job, in the job's store (see the module docstring)."""

    def __init__(self, store: Store, generation: int):
        self.store = store
        self.generation = generation

    def _key(self, step: int) -> str:
        return f"ledger/{self.generation}/step/{step}"

    def owner(self, step: int) -> str | None:
        """The id of the quorum that committed ``step``, or None if nobody has yet."""
        key = self._key(step)
        return self.store.get(key).decode() if self.store.check([key]) else None

    def check_behind(self, step: int, quorum_id: int) -> None:
        """Rule 1: raise :class:`Fenced` if ``step`` was already committed (by a quorum other than this one)."""
        owner = self.owner(step)
        if owner is not None:
            raise Fenced(step, f"the job already committed step {step} (quorum {owner}) and this replica's "
                               f"quorum {quorum_id} could not heal it: it is behind and no live replica "
                               "holds the job's state")

    def claim(self, step: int, quorum_id: int) -> None:
        """Rule 2: record that quorum ``quorum_id`` commits ``step``; :class:`Fenced` if another quorum did."""
        owner = self.store.compare_set(self._key(step), "", str(quorum_id)).decode()
        if owner != str(quorum_id):
            raise Fenced(step, f"step {step} was committed by quorum {owner}, not this replica's quorum "
                               f"{quorum_id}: two quorums trained the same step, this one applies nothing")
