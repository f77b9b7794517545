"""Membership on torchft, loopback only, with a synchronous quorum.

One replica = one torchft replica group of world size 1. Pieces:

* the lighthouse (:func:`start_lighthouse`, run by the launcher) decides each quorum;
* each replica hosts the TCPStore of its replica group (:class:`LoopbackStore`) and a torchft
  ``Manager``; the cross-replica process group is torchft's reconfigurable gloo group, and a
  rejoining replica receives its state over that group (``PGTransport``), not over HTTP;
* everything binds and advertises 127.0.0.1: the lighthouse and the stores are bound there
  explicitly, gloo uses the loopback interface (GLOO_SOCKET_IFNAME=lo), and the Manager's
  server, which torchft 0.2.0 binds to ``[::]`` unconditionally, is bound to 127.0.0.1 by
  :func:`_loopback_manager_server` while the Manager is built.

Synchronous quorum: NDB needs the live set before the forward pass, so the Manager is built
with ``use_async_quorum=False``: ``start_quorum`` returns only when the quorum is decided, the
process group is rebuilt and a healing replica has received and loaded its state. The live
set is what torchft passes to the process group's ``configure`` (``global_ranks``: replica
``replica_<i>`` is rank ``i``), recorded by :class:`LiveSetGloo`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust servers log every quorum at info

import torch  # noqa: E402
import torchft.manager as _torchft_manager  # noqa: E402
from torch.distributed import ReduceOp, TCPStore  # noqa: E402
from torchft.checkpointing.pg_transport import PGTransport  # noqa: E402
from torchft.coordination import LighthouseServer  # noqa: E402
from torchft.process_group import ProcessGroupGloo  # noqa: E402

from .fencing import CommitLedger  # noqa: E402

LOOPBACK = "127.0.0.1"


def _port_of(address: str) -> int:
    return int(address.rstrip("/").rsplit(":", 1)[1])


def start_lighthouse(*, min_replicas: int, heartbeat_timeout_s: float,
                     join_timeout_s: float = 30.0) -> tuple[LighthouseServer, str]:
    """A lighthouse on 127.0.0.1 and its address.

    A replica that dies or hangs stops heartbeating and is dropped after ``heartbeat_timeout_s``.
    ``join_timeout_s`` is how long a quorum waits for a replica that still heartbeats but has not
    asked to join yet (alive, merely busy: writing a checkpoint, evaluating). It is long on
    purpose: it never delays failure detection, and a short one would drop slow live replicas.
    """
    server = LighthouseServer(bind=f"{LOOPBACK}:0", min_replicas=min_replicas,
                              join_timeout_ms=int(join_timeout_s * 1000), quorum_tick_ms=20,
                              heartbeat_timeout_ms=int(heartbeat_timeout_s * 1000))
    # address() advertises the host name; the server listens on loopback only.
    return server, f"http://{LOOPBACK}:{_port_of(server.address())}"


class LoopbackStore:
    """A TCPStore server listening on 127.0.0.1 only (TCPStore itself binds every interface)."""

    def __init__(self):
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((LOOPBACK, 0))
        self._socket.listen(128)
        self.port = self._socket.getsockname()[1]
        self.store = TCPStore(LOOPBACK, self.port, is_master=True, wait_for_workers=False,
                              master_listen_fd=self._socket.fileno())

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def connect_store(address: str, timeout_s: float) -> TCPStore:
    host, port = address.rsplit(":", 1)
    return TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                    timeout=timedelta(seconds=timeout_s))


@contextlib.contextmanager
def _loopback_manager_server() -> Iterator[None]:
    original = _torchft_manager.ManagerServer

    def loopback(*args, **kwargs):
        kwargs["bind"] = f"{LOOPBACK}:0"
        return original(*args, **kwargs)

    _torchft_manager.ManagerServer = loopback
    try:
        yield
    finally:
        _torchft_manager.ManagerServer = original


class LiveSetGloo(ProcessGroupGloo):
    """torchft's gloo group, remembering which replicas the current quorum holds."""

    live: tuple[int, ...] = ()

    def configure(self, store_addr, replica_id, rank, world_size, quorum_id=None, group_rank=None,
                  group_world_size=None, global_ranks=None):
        self.live = tuple(sorted(global_ranks or ()))
        super().configure(store_addr, replica_id, rank, world_size, quorum_id, group_rank, group_world_size,
                          global_ranks)


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


class _QuorumHookClient:
    """torchft's ManagerClient, calling ``hook()`` when the lighthouse returned a new quorum.

    "New": its quorum id differs from the one the process group is configured for, so the
    Manager is about to rebuild the group; the hook runs before it does.
    """

    def __init__(self, client, current_quorum_id: Callable[[], int], hook: Callable[[], None]):
        self._client = client
        self._current = current_quorum_id
        self._hook = hook

    def _quorum(self, *args, **kwargs):
        result = self._client._quorum(*args, **kwargs)
        if result.quorum_id != self._current():
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
        timeout_s: collectives, commit and state transfer; quorum_timeout_s: waiting for a quorum.
        on_quorum / on_send: failure-injection hooks (after a new quorum is returned, before the
            process group is rebuilt; after the n-th message of a state transfer). None in normal runs.
        ledger: the job's commit ledger (:mod:`mecefo.fencing`); with one, a commit first claims
            its step for this quorum and :meth:`check_current` refuses a quorum that is behind.
            None: no fencing (a replica used outside the launcher).
    """

    def __init__(self, *, replica: int, lighthouse: str, state_dict: Callable[[], dict],
                 load_state_dict: Callable[[dict], None], min_replicas: int, timeout_s: float,
                 quorum_timeout_s: float, on_quorum: Callable[[], None] | None = None,
                 on_send: Callable[[int], None] | None = None, ledger: CommitLedger | None = None):
        timeout = timedelta(seconds=timeout_s)
        self.replica = replica
        self.ledger = ledger
        self.store = LoopbackStore()
        self.pg = LiveSetGloo(timeout=timeout)
        transport_pg = _SendHookGroup(self.pg, on_send) if on_send else self.pg
        with _loopback_manager_server():
            self.manager = _torchft_manager.Manager(
                pg=self.pg, load_state_dict=load_state_dict, state_dict=state_dict,
                min_replica_size=min_replicas, use_async_quorum=False, timeout=timeout,
                quorum_timeout=timedelta(seconds=quorum_timeout_s), connect_timeout=timeout,
                rank=0, world_size=1, store_addr=LOOPBACK, store_port=self.store.port,
                lighthouse_addr=lighthouse, replica_id=f"replica_{replica}", hostname=LOOPBACK,
                checkpoint_transport=PGTransport(transport_pg, timeout, torch.device("cpu")),
                # every replica builds the same initial weights from the seed; a replica that
                # starts late heals from a peer instead
                init_sync=False)
        if on_quorum:
            self.manager._client = _QuorumHookClient(self.manager._client, lambda: self.manager._quorum_id,
                                                     on_quorum)

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

    def start_quorum(self) -> None:
        """Block until this step's quorum is decided (and, if this replica was behind, it has healed)."""
        self.manager.start_quorum()

    def errored(self) -> bool:
        return self.manager.errored() is not None

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
        (a failed commit makes the lighthouse issue a new quorum id even if nobody left).
        """
        self.pg.abort()

    def check_current(self) -> None:
        """Fencing rule 1 after the quorum: :class:`~mecefo.fencing.Fenced` if this quorum's step was
        already committed by another quorum (this replica is behind and nobody healed it)."""
        if self.ledger is not None:
            self.ledger.check_behind(self.step, self.quorum_id)

    def commit(self) -> bool:
        """torchft's should_commit: True if this step's update may be applied (the step count advances).

        With a ledger, a step torchft lets commit is first claimed for this quorum (fencing rule 2);
        :class:`~mecefo.fencing.Fenced` if another quorum committed it, and nothing may be applied.
        """
        step = self.step
        if not self.manager.should_commit():
            return False
        if self.ledger is not None:
            self.ledger.claim(step, self.quorum_id)
        return True

    def load_manager_state(self, state: dict) -> None:
        self.manager.load_state_dict(state)

    def manager_state(self) -> dict:
        return self.manager.state_dict()

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
