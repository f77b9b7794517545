"""Membership on torchft, with a synchronous quorum.

One replica = one torchft replica group (of world size 1 under the single-host launcher, of G
ranks under ``mecefo.group``: :mod:`mecefo.ranks`). Pieces:

* the lighthouse (:func:`start_lighthouse`, run by the launcher or by ``mecefo-lighthouse``)
  decides each quorum;
* each replica group has a TCPStore (:class:`BoundStore`: hosted by the replica itself under the
  launcher, by the group's rank 0 under ``mecefo.group``) and each rank a torchft ``Manager``;
  the cross-replica process group is torchft's reconfigurable gloo group (rank ``r`` of every
  group together), and a rejoining replica receives its state over that group
  (``PGTransport``), not over HTTP;
* every server binds the address it advertises: the launcher's lighthouse, stores and Manager
  servers 127.0.0.1 (gloo on the loopback interface, GLOO_SOCKET_IFNAME=lo, set by the
  launcher), a group's the address given by ``--advertise``. torchft 0.2.0 binds the Manager's
  server to ``[::]`` unconditionally; :func:`_manager_server_bound_to` binds it to the advertised
  address while the Manager is built.

Synchronous quorum: NDB needs the live set before the forward pass, so the Manager is built
with ``use_async_quorum=False``: ``start_quorum`` returns only when the quorum is decided, the
process group is rebuilt and a healing replica has received and loaded its state. The live
set is what torchft passes to the process group's ``configure`` (``global_ranks``: rank ``r`` of
replica group ``replica_<i>`` is ``i*G + r``), recorded by :class:`LiveSetGloo` as replica indices.

Deadlines (:mod:`mecefo.deadlines`): the replica sets, per step, how long its collectives wait
(:meth:`Membership.set_deadlines`: gloo's per-operation timeout, through the process group's
options hook) and how long one message of a state transfer may take (the Manager's timeout, which
torchft 0.2.0 reads for the heal's sends and receives).

Quorum identity and twins: every quorum the lighthouse returns is recorded (:class:`_QuorumClient`).
Its *label* (quorum id and a digest of its members' replica ids, which torchft makes unique per
process) is what the commit ledger and the lineage record: a restarted lighthouse numbers its
quorums from 1 again, and the label tells its quorum 3 from the old one's. A group index listed
twice (a replaced group whose old holder still runs: torchft gives each process its own replica id)
is reported by :attr:`Membership.twins`.

A lighthouse that stops answering (dead, restarting, cut off) is waited for, up to
``lighthouse_wait_s``, then :class:`~mecefo.jobstore.ControlPlaneLost` is raised (see
:meth:`Membership.start_quorum`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta

os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust servers log every quorum at info

import torch  # noqa: E402
import torchft.manager as _torchft_manager  # noqa: E402
from torch.distributed import ReduceOp, TCPStore  # noqa: E402
from torchft.checkpointing.pg_transport import PGTransport  # noqa: E402
from torchft.coordination import LighthouseServer  # noqa: E402
from torchft.process_group import ProcessGroupGloo  # noqa: E402

from .fencing import CommitLedger  # noqa: E402
from .jobstore import ControlPlaneLost  # noqa: E402

LOOPBACK = "127.0.0.1"
PROBE_S = 1.0  # a lighthouse that does not accept a connection within this long is not answering
# torchft's Manager re-sends a failed lighthouse request this many times, paced by its connection attempts
# (measured: a lighthouse restarted 23 s into a request got it 0.1 s later, at no CPU cost while down); the
# request's timeout, not this count, bounds the wait
QUORUM_RETRIES = 10_000


def _port_of(address: str) -> int:
    return int(address.rstrip("/").rsplit(":", 1)[1])


def split_address(address: str, what: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (an ``http://`` prefix allowed); ValueError naming ``what`` otherwise."""
    bare = address.removeprefix("http://").rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def start_lighthouse(*, min_replicas: int, heartbeat_timeout_s: float, join_timeout_s: float = 30.0,
                     bind: str = f"{LOOPBACK}:0") -> tuple[LighthouseServer, str]:
    """A lighthouse listening on ``bind`` (HOST:PORT; port 0: any free one) and its address.

    A replica that dies or hangs stops heartbeating and is dropped after ``heartbeat_timeout_s``.
    ``join_timeout_s`` is how long a quorum waits for a replica that still heartbeats but has not
    asked to join yet (alive, merely busy: writing a checkpoint, evaluating). It is long on
    purpose: it never delays failure detection, and a short one would drop slow live replicas.
    """
    host, _ = split_address(bind, "bind")
    server = LighthouseServer(bind=bind, min_replicas=min_replicas,
                              join_timeout_ms=int(join_timeout_s * 1000), quorum_tick_ms=20,
                              heartbeat_timeout_ms=int(heartbeat_timeout_s * 1000))
    # address() advertises the host name; the server listens on the bound address only.
    return server, f"http://{host}:{_port_of(server.address())}"


class BoundStore:
    """A TCPStore server listening on ``host`` only (TCPStore itself binds every interface); port 0: any free one."""

    def __init__(self, host: str, port: int = 0):
        self.host = host
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self._socket.listen(128)
        self.port = self._socket.getsockname()[1]
        self.store = TCPStore(host, self.port, is_master=True, wait_for_workers=False,
                              master_listen_fd=self._socket.fileno())

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class LoopbackStore(BoundStore):
    """A TCPStore server listening on 127.0.0.1 only."""

    def __init__(self):
        super().__init__(LOOPBACK)


def connect_store(address: str, timeout_s: float) -> TCPStore:
    host, port = split_address(address, "store address")
    return TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))


@contextlib.contextmanager
def _manager_server_bound_to(host: str) -> Iterator[None]:
    original = _torchft_manager.ManagerServer

    def bound(*args, **kwargs):
        kwargs["bind"] = f"[{host}]:0" if ":" in host else f"{host}:0"
        return original(*args, **kwargs)

    _torchft_manager.ManagerServer = bound
    try:
        yield
    finally:
        _torchft_manager.ManagerServer = original


class LiveSet:
    """Put in front of a torchft process group class: it remembers which replicas the current quorum holds.

    torchft numbers rank ``r`` of replica group ``i`` (of ``G`` ranks) ``i*G + r``; :attr:`live`
    holds the replica indices ``i``.
    """

    live: tuple[int, ...] = ()
    op_timeout: timedelta | None = None  # this step's collective deadline (None: the group's timeout)
    # the quorum's label digest, appended to the rendezvous prefix: torchft's prefix holds only the quorum
    # id, which a restarted lighthouse hands out again, and stale rendezvous keys would be read
    namespace: Callable[[], str] | None = None

    def _opts_hook(self, opts):
        if self.op_timeout is not None and hasattr(opts, "timeout"):
            opts.timeout = self.op_timeout  # gloo waits this long for this operation's peers
        return opts

    def configure(self, store_addr, replica_id, rank, world_size, quorum_id=None, group_rank=None,
                  group_world_size=None, global_ranks=None):
        ranks_per_group = group_world_size or 1
        self.live = tuple(sorted((r - (group_rank or 0)) // ranks_per_group for r in global_ranks or ()))
        if self.namespace is not None:
            store_addr = f"{store_addr}/{self.namespace()}"
        super().configure(store_addr, replica_id, rank, world_size, quorum_id, group_rank, group_world_size,
                          global_ranks)


class LiveSetGloo(LiveSet, ProcessGroupGloo):
    """torchft's gloo group with :class:`LiveSet`."""


def cross_group(cross: str, timeout: timedelta):
    """torchft's process group across replica groups (:mod:`mecefo.backends` chooses ``cross``), with
    :class:`LiveSet`."""
    if cross == "gloo":
        return LiveSetGloo(timeout=timeout)
    from torchft.process_group import ProcessGroupBabyNCCL, ProcessGroupNCCL

    base = {"nccl": ProcessGroupNCCL, "baby-nccl": ProcessGroupBabyNCCL}[cross]
    return type(f"LiveSet{base.__name__}", (LiveSet, base), {})(timeout=timeout)


class _SendHookGroup:
    """The process group as the checkpoint transport sees it, calling ``hook(n)`` after the n-th send."""

    def __init__(self, pg: LiveSetGloo, hook: Callable[[int], None]):
        self._pg = pg
        self._hook = hook
        self._sends = 0

    def send(self, tensors, dst_rank, tag):
        work = self._pg.send(tensors, dst_rank, tag)
        self._sends += 1
        self._hook(self._sends)
        return work

    def recv(self, tensors, src_rank, tag):
        return self._pg.recv(tensors, src_rank, tag)


class _QuorumClient:
    """torchft's ManagerClient, remembering the last quorum the lighthouse returned and calling
    ``hook()`` (failure injection) when it is new, i.e. its quorum id differs from the one the
    process group is configured for, so the Manager is about to rebuild the group; the hook runs
    before it does."""

    def __init__(self, client, current_quorum_id: Callable[[], int], hook: Callable[[], None] | None):
        self._client = client
        self._current = current_quorum_id
        self._hook = hook
        self.last = None

    def _quorum(self, *args, **kwargs):
        result = self._client._quorum(*args, **kwargs)
        self.last = result
        if self._hook is not None and result.quorum_id != self._current():
            self._hook()
        return result

    def __getattr__(self, name):
        return getattr(self._client, name)


class Membership:
    """A replica's view of the job: quorum, live set, healing, all-reduce and commit.

    Args:
        replica: this replica's index (its shard).
        lighthouse: the lighthouse address.
        state_dict / load_state_dict: the replica's full training state, sent to / loaded by a
            rejoining replica.
        timeout_s: collectives, commit and state transfer until :meth:`set_deadlines` says otherwise;
            quorum_timeout_s: waiting for a quorum from a lighthouse that answers.
        lighthouse_wait_s: how long a lighthouse that does not answer is waited for before
            :class:`~mecefo.jobstore.ControlPlaneLost`.
        on_quorum / on_send: failure-injection hooks (after a new quorum is returned, before the
            process group is rebuilt; after the n-th message of a state transfer). None in normal runs.
        ledger: the job's commit ledger (:mod:`mecefo.fencing`); with one, a commit first claims
            its step for this quorum and :meth:`check_current` refuses a quorum that is behind.
            None: no fencing (a replica used outside the launcher).
        group_store: HOST:PORT of the replica group's store, hosted by its rank 0 (None: a
            replica of one rank, which hosts its own on ``advertise``).
        group_rank / group_world_size: this rank within the replica group, and the group's size.
        advertise: the address this rank's servers bind and other hosts reach them at.
        backends: the collective libraries (:func:`mecefo.backends.choose_backends`; None: gloo on CPU).
    """

    def __init__(self, *, replica: int, lighthouse: str, state_dict: Callable[[], dict],
                 load_state_dict: Callable[[dict], None], min_replicas: int, timeout_s: float,
                 quorum_timeout_s: float, lighthouse_wait_s: float = 300.0, on_quorum: Callable[[], None] | None = None,
                 on_send: Callable[[int], None] | None = None, ledger: CommitLedger | None = None,
                 group_store: str | None = None, group_rank: int = 0, group_world_size: int = 1,
                 advertise: str = LOOPBACK, backends=None):
        timeout = timedelta(seconds=timeout_s)
        self.replica = replica
        self.ledger = ledger
        self.lighthouse = lighthouse
        self.min_replicas = min_replicas
        self.quorum_timeout_s = quorum_timeout_s
        self.lighthouse_wait_s = lighthouse_wait_s
        # the group's store, when this replica hosts it (kept alive with the Manager)
        self.store = BoundStore(advertise) if group_store is None else None
        group_store = group_store or self.store.address
        store_host, store_port = split_address(group_store, "group store")
        self.pg = cross_group(backends.cross if backends else "gloo", timeout)
        transport_pg = _SendHookGroup(self.pg, on_send) if on_send else self.pg
        with _manager_server_bound_to(advertise):
            self.manager = _torchft_manager.Manager(
                pg=self.pg, load_state_dict=load_state_dict, state_dict=state_dict,
                min_replica_size=min_replicas, use_async_quorum=False, timeout=timeout,
                quorum_timeout=timedelta(seconds=quorum_timeout_s), connect_timeout=timeout,
                rank=group_rank, world_size=group_world_size, store_addr=store_host, store_port=store_port,
                lighthouse_addr=lighthouse, replica_id=f"replica_{replica}", hostname=advertise,
                quorum_retries=QUORUM_RETRIES,
                checkpoint_transport=PGTransport(transport_pg, timeout,
                                                 torch.device(backends.device if backends else "cpu")),
                # every replica builds the same initial weights from the seed; a replica that
                # starts late heals from a peer instead
                init_sync=False)
        self._quorums = _QuorumClient(self.manager._client, lambda: self.manager._quorum_id, on_quorum)
        self.manager._client = self._quorums
        self.pg.namespace = lambda: self.quorum_label.partition(":")[2]

    @property
    def step(self) -> int:
        """Updates committed so far = the step this replica runs next."""
        return self.manager.current_step()

    @property
    def members(self) -> tuple[int, ...]:
        """Replicas in the current quorum (valid after start_quorum)."""
        return self.pg.live

    @property
    def quorum_id(self) -> int:
        return self.manager._quorum_id

    @property
    def quorum_label(self) -> str:
        """This quorum's identity for the ledger and the lineage: its id and a digest of its members and step
        (the same on every member; a restarted lighthouse's quorum 3 has other members' processes or step)."""
        last = self._quorums.last
        if last is None:
            return str(self.quorum_id)
        text = "|".join(sorted(last.replica_ids)) + f"|{last.max_step}"
        return f"{last.quorum_id}:{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    @property
    def twins(self) -> tuple[int, ...]:
        """Replica (group) indices the current quorum lists more than once: two processes hold one index."""
        last = self._quorums.last
        if last is None:
            return ()
        counts = Counter(int(rid.split(":")[0].rsplit("_", 1)[1]) for rid in last.replica_ids)
        return tuple(sorted(i for i, n in counts.items() if n > 1))

    def set_deadlines(self, collective_s: float, transfer_s: float) -> None:
        """From now on: collectives wait ``collective_s`` for their peers, a state-transfer message ``transfer_s``."""
        self.pg.op_timeout = timedelta(seconds=collective_s)
        # torchft 0.2.0 reads the Manager's timeout for the heal's sends / receives and should_commit
        self.manager._timeout = timedelta(seconds=transfer_s)

    def lighthouse_answers(self) -> bool:
        """Whether the lighthouse accepts a TCP connection (within :data:`PROBE_S`)."""
        host, port = split_address(self.lighthouse, "lighthouse")
        try:
            socket.create_connection((host, port), timeout=PROBE_S).close()
            return True
        except OSError:
            return False

    def start_quorum(self) -> None:
        """Block until this step's quorum is decided (and, if this replica was behind, it has healed).

        A lighthouse that stops answering is waited for, the replica's state kept: torchft re-sends
        the request (:data:`QUORUM_RETRIES`) until it answers again, and a request lasts at most
        ``lighthouse_wait_s``; then, if the lighthouse still does not accept connections (probed every
        :data:`PROBE_S`), :class:`ControlPlaneLost` once ``lighthouse_wait_s`` have passed since the
        request was sent. A lighthouse that answers but forms no quorum within ``quorum_timeout_s``
        (too few replicas) raises TimeoutError.
        """
        started = time.monotonic()
        silent_since = None
        while True:
            attempt_start = time.monotonic()
            attempt_s = max(1.0, min(self.quorum_timeout_s - (attempt_start - started), self.lighthouse_wait_s))
            try:
                self.manager.start_quorum(timeout=timedelta(seconds=attempt_s))
                return
            except Exception as e:  # noqa: BLE001  (torchft's quorum thread raises TimeoutError or RuntimeError)
                error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            self.manager._quorum_future = None  # torchft 0.2.0 would raise this failed quorum again next time
            self._rebuild_next()
            if self.lighthouse_answers():
                silent_since = None
                if time.monotonic() - started >= self.quorum_timeout_s:
                    raise TimeoutError(f"replica {self.replica}: no quorum within --quorum-timeout "
                                       f"{self.quorum_timeout_s:g} s though the lighthouse answers ({error})")
                continue
            silent_since = silent_since or attempt_start
            while not self.lighthouse_answers():
                if time.monotonic() - silent_since > self.lighthouse_wait_s:
                    raise ControlPlaneLost(f"the lighthouse at {self.lighthouse.removeprefix('http://')} has not "
                                           f"answered for {self.lighthouse_wait_s:g} s (--lighthouse-wait)")
                time.sleep(PROBE_S / 2)

    def _rebuild_next(self) -> None:
        """The next quorum rebuilds the process group, whatever its id: torchft rebuilds only on a new
        quorum id, and a restarted lighthouse numbers its quorums from 1 again."""
        self.manager._quorum_id = -1

    def errored(self) -> bool:
        return self.manager.errored() is not None

    def too_few(self) -> bool:
        """Whether this quorum has fewer replicas than min_replicas (torchft then refuses every commit)."""
        return self.manager.num_participants() < self.min_replicas

    def error(self) -> str:
        err = self.manager.errored()
        return "" if err is None else str(err.original_exception).splitlines()[0][:300]

    def allreduce_sum(self, tensor: torch.Tensor) -> bool:
        """In-place SUM over the quorum; False if it (or anything earlier this step) failed."""
        self.manager.allreduce(tensor, reduce_op=ReduceOp.SUM).wait()
        return not self.errored()

    def post_allreduce_sum(self, tensor: torch.Tensor):
        """Post a SUM all-reduce without waiting (the allreduce failure injection dies in between)."""
        return self.manager.allreduce(tensor, reduce_op=ReduceOp.SUM)

    def abort(self) -> None:
        """Tear down the process group after a failed collective.

        Peers still blocked in the collective on this replica then fail at once (their
        connection closes) instead of waiting out the timeout; the next quorum rebuilds the group
        (:meth:`_rebuild_next`).
        """
        self.pg.abort()
        self._rebuild_next()

    def report_error(self, reason: str) -> None:
        """Make this step fail on this rank: torchft's should_commit then returns False."""
        self.manager.report_error(RuntimeError(reason))

    def check_current(self) -> None:
        """Fencing rule 1 after the quorum: :class:`~mecefo.fencing.Fenced` if this quorum's step was
        already committed by another quorum (this replica is behind and nobody healed it)."""
        if self.ledger is not None:
            self.ledger.check_behind(self.step, self.quorum_label)

    def commit(self) -> bool:
        """torchft's should_commit: True if this step's update may be applied (the step count advances).

        With a ledger, a step torchft lets commit is first claimed for this quorum (fencing rule 2);
        :class:`~mecefo.fencing.Fenced` if another quorum committed it, and nothing may be applied;
        :class:`ControlPlaneLost` if the job store stayed unreachable, and the step count is put back.
        """
        step = self.step
        before = self.manager.state_dict()
        if not self.manager.should_commit():
            return False
        if self.ledger is not None:
            try:
                self.ledger.claim(step, self.quorum_label)
            except ControlPlaneLost:
                self.manager.load_state_dict(before)  # not applied: the state stays at `step`
                raise
        return True

    def load_manager_state(self, state: dict) -> None:
        self.manager.load_state_dict(state)

    def manager_state(self) -> dict:
        return self.manager.state_dict()

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
