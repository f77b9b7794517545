"""The job store: the TCPStore every process of a job shares, its keys, a client that outlives a restart
of it, and the journal that makes it durable (``mecefo-lighthouse --state-dir``).

Keys (who writes them):

* ``job/identity``: the job's configuration, set by the first group admitted (:mod:`mecefo.group`);
* ``job/generation``: the job's launch generation, fixed by the first group admitted
  (:func:`mecefo.group.launch_generation`): it marks the records and lineage of this launch;
* ``group/<I>/owner``, ``group/<I>/beat``, ``group/<I>/address``: which process holds group index
  ``I``, its heartbeat, and where its rank 0 accepts connections (:class:`mecefo.group.GroupLease`);
* ``launch/<generation>``: the launch barrier's count (:mod:`mecefo.replica`);
* ``ledger/<generation>/step/<s>``: the quorum that committed step ``s`` (:mod:`mecefo.fencing`), and
  ``ledger/<generation>/durable/<s>`` once that entry is on disk;
* ``job/durable``: set when the store is journalled: a commit then waits until its ledger entry is
  on disk before the update is applied;
* ``job/ready``: set by whoever serves the store once its state is in (a restarted lighthouse: after
  loading its journal); clients wait for it after every (re)connection.

**Client** (:class:`JobStore`): every call that fails (the store died, restarted, or its host is cut
off) reconnects and retries, until ``wait_s`` have passed without an answer: then
:class:`ControlPlaneLost`, one line naming the address and the option (``--lighthouse-wait``).

**Journal** (:class:`Journal`, run by the lighthouse with ``--state-dir``): the job's identity and
launch generation (on disk before the first ledger entry: a restarted lighthouse never hands a
resumed ledger to a new generation), every group's owner and address and every ledger entry of generation 0 (a group job's) are appended
to ``DIR/job_store.jsonl`` (fsynced) as they appear; a lighthouse restarted with the same directory
loads them into its fresh store before it answers anyone. Not kept: the heartbeats (a holder's beat
resumes against the new store), the launch count (a group that starts while others train skips the
barrier: it heals from them).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

IDENTITY_KEY = "job/identity"
GENERATION_KEY = "job/generation"
DURABLE_KEY = "job/durable"
READY_KEY = "job/ready"
RETRY_S = 0.5  # between attempts to reach a store that does not answer
OP_TIMEOUT_S = 5.0  # one store operation (a host cut off leaves the connection silent, not closed)
JOURNAL_FILE = "job_store.jsonl"
LEDGER_GENERATION = 0  # a group job's ledger generation: the one the journal keeps


def group_key(group: int, name: str) -> str:
    return f"group/{group}/{name}"


def launch_key(generation: int) -> str:
    return f"launch/{generation}"


def ledger_key(generation: int, step: int) -> str:
    return f"ledger/{generation}/step/{step}"


def ledger_durable_key(generation: int, step: int) -> str:
    return f"ledger/{generation}/durable/{step}"


class ControlPlaneLost(RuntimeError):
    """The lighthouse or the job store has not answered for the allowed time (a one-line reason)."""


class JobStore:
    """A client of the job store at ``address`` (HOST:PORT) that reconnects and retries every call until
    the store has been silent for ``wait_s`` seconds (then :class:`ControlPlaneLost`).

    Calls are get, check, set, compare_set, add, as on a TCPStore. ``add`` is retried only when the
    store never answered: a lost reply could otherwise count twice.
    """

    def __init__(self, address: str, wait_s: float, op_timeout_s: float = OP_TIMEOUT_S):
        self.address = address
        self.wait_s = wait_s
        self.op_timeout_s = min(op_timeout_s, wait_s)
        self._store = None

    def _connected(self):
        from .quorum import connect_store

        if self._store is None:
            store = connect_store(self.address, self.op_timeout_s)
            deadline = time.monotonic() + self.op_timeout_s
            while not store.check([READY_KEY]):  # a restarted lighthouse still loading its journal
                if time.monotonic() > deadline:
                    raise RuntimeError("the job store is up but not ready (its journal is still loading)")
                time.sleep(0.01)
            self._store = store
        return self._store

    def _call(self, op: str, *args):
        silent_since = None
        while True:
            try:
                return getattr(self._connected(), op)(*args)
            except RuntimeError as e:  # torch.distributed.DistError: closed, reset, timed out, refused
                self._store = None
                error = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            now = time.monotonic()
            silent_since = silent_since or now
            if now - silent_since > self.wait_s:
                raise ControlPlaneLost(f"the job store at {self.address} has not answered for {self.wait_s:g} s "
                                       f"({error}; --lighthouse-wait)")
            time.sleep(RETRY_S)

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)

    def set(self, key: str, value: str) -> None:
        self._call("set", key, value)

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        return self._call("compare_set", key, expected, desired)

    def add(self, key: str, amount: int) -> int:
        return self._call("add", key, amount)

    def get_or(self, key: str, default: str | None = None) -> str | None:
        """The key's value, or ``default`` if it is not set (never blocks on a missing key)."""
        return self.get(key).decode() if self.check([key]) else default

    def wait_for(self, key: str, timeout_s: float) -> bool:
        """Whether ``key`` is set within ``timeout_s`` (polled: a store restart in between is survived)."""
        deadline = time.monotonic() + timeout_s
        while not self.check([key]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True


class Journal:
    """The job store's durable part in ``state_dir`` (module docstring). One writer: the lighthouse."""

    POLL_S = 0.2  # owners and addresses are looked at this often
    LEDGER_POLL_S = 0.005  # ledger entries this often

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / JOURNAL_FILE
        self.values: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write: everything after it was never acked
                    break
                self.values[entry["key"]] = entry["value"]
        self.next_step = 0
        while ledger_key(LEDGER_GENERATION, self.next_step) in self.values:
            self.next_step += 1
        self._file = open(self.path, "a")

    def describe(self) -> str:
        groups = sum(1 for k in self.values if k.endswith("/owner"))
        return f"state {self.path}: {self.next_step} committed steps, {groups} group owners"

    def restore(self, store) -> None:
        """Load the kept keys into a fresh store and mark it durable (the caller sets READY_KEY after)."""
        if self.values:
            store.multi_set(list(self.values), list(self.values.values()))
        if self.next_step:  # the last entry's acknowledgement: its claimant may be waiting for it
            store.set(ledger_durable_key(LEDGER_GENERATION, self.next_step - 1), "1")
        store.set(DURABLE_KEY, "1")

    def _append(self, entries: dict[str, str]) -> None:
        for key, value in entries.items():
            self._file.write(json.dumps({"key": key, "value": value}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.values.update(entries)

    def _watched(self) -> list[str]:
        keys = [IDENTITY_KEY, GENERATION_KEY]
        identity = self.values.get(IDENTITY_KEY)
        if identity is not None:
            for group in range(int(json.loads(identity).get("replicas", 0))):
                keys += [group_key(group, "owner"), group_key(group, "address")]
        return keys

    def run(self, store, stop: threading.Event) -> None:
        """Persist until ``stop`` is set: ledger entries as they appear (then acknowledged; looked for every
        LEDGER_POLL_S, which a commit may wait), the rest every POLL_S."""
        last_poll = 0.0
        while not stop.wait(self.LEDGER_POLL_S):
            key = ledger_key(LEDGER_GENERATION, self.next_step)
            pending = store.check([key])
            # the generation (set at admission, before any commit) is on disk before the first ledger entry
            if (pending and GENERATION_KEY not in self.values) or time.monotonic() - last_poll >= self.POLL_S:
                last_poll = time.monotonic()
                self._persist_watched(store)
            while pending:
                self._append({key: store.get(key).decode()})
                store.set(ledger_durable_key(LEDGER_GENERATION, self.next_step), "1")
                self.next_step += 1
                key = ledger_key(LEDGER_GENERATION, self.next_step)
                pending = store.check([key])

    def _persist_watched(self, store) -> None:
        changed = {}
        for key in self._watched():
            if store.check([key]):
                value = store.get(key).decode()
                if self.values.get(key) != value:
                    changed[key] = value
        if changed:
            self._append(changed)

    def close(self) -> None:
        self._file.close()
