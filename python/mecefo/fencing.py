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

The ledger lives in the job's store (:mod:`mecefo.jobstore`: the supervisor's TCPStore on
127.0.0.1, or the lighthouse's job store for a group job), one key per committed step, under the
launch generation (a job restart replays steps from a checkpoint under a new generation, a new set
of keys). A quorum is named by its *label* (:attr:`mecefo.quorum.Membership.quorum_label`: its id
and a digest of its members' process ids and step), not its id alone: a restarted lighthouse
numbers its quorums from 1 again, and a stale member of the old quorum 3 must not pass for a member
of the new one. When the store is journalled (``mecefo-lighthouse --state-dir``) a claim returns
only once its entry is on disk, so a lighthouse restarted from its journal knows every step whose
update any replica applied.

Lineage: every committed step extends the training state's lineage, a short hash chain over
(step, generation, quorum id) of the commits that produced it; it travels with the state (heal,
checkpoints) so a checkpoint can tell whether it belongs to the same branch as the file it would
replace (:func:`mecefo.checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import hashlib
import time

from torch.distributed import Store

from .jobstore import DURABLE_KEY, ledger_durable_key, ledger_key

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

    DURABLE_WAIT_S = 30.0  # a journalled store acknowledges an entry within this long (else: store lost)

    def __init__(self, store: Store, generation: int):
        self.store = store  # a TCPStore or a mecefo.jobstore.JobStore
        self.generation = generation
        self.durable: bool | None = None  # whether the store is journalled (read at the first claim)

    def _key(self, step: int) -> str:
        return ledger_key(self.generation, step)

    def owner(self, step: int) -> str | None:
        """The label of the quorum that committed ``step``, or None if nobody has yet."""
        key = self._key(step)
        return self.store.get(key).decode() if self.store.check([key]) else None

    def check_behind(self, step: int, quorum: int | str) -> None:
        """Rule 1: raise :class:`Fenced` if ``step`` was already committed (by a quorum other than this one)."""
        owner = self.owner(step)
        if owner is not None:
            raise Fenced(step, f"the job already committed step {step} (quorum {owner}) and this replica's "
                               f"quorum {quorum} could not heal it: it is behind and no live replica "
                               "holds the job's state")

    def claim(self, step: int, quorum: int | str) -> None:
        """Rule 2: record that quorum ``quorum`` (its label) commits ``step``; :class:`Fenced` if another quorum
        did. On a journalled store, return only once the entry is on disk."""
        owner = self.store.compare_set(self._key(step), "", str(quorum)).decode()
        if owner != str(quorum):
            raise Fenced(step, f"step {step} was committed by quorum {owner}, not this replica's quorum "
                               f"{quorum}: two quorums trained the same step, this one applies nothing")
        if self.durable is None:
            self.durable = self.store.check([DURABLE_KEY])
        if self.durable:
            self._wait_durable(step, quorum)

    def _wait_durable(self, step: int, quorum: int | str) -> None:
        from .jobstore import ControlPlaneLost

        deadline = time.monotonic() + self.DURABLE_WAIT_S
        while not self.store.check([ledger_durable_key(self.generation, step)]):
            if time.monotonic() > deadline:
                raise ControlPlaneLost(f"the job store did not journal step {step} within {self.DURABLE_WAIT_S:g} s")
            if not self.store.check([self._key(step)]):  # a restarted store whose journal missed the claim
                self.claim(step, quorum)
                return
            time.sleep(0.002)
