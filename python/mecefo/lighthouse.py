"""``mecefo-lighthouse`` (``python -m mecefo.lighthouse``): the job's coordinator for a multi-host run.

Runs, until SIGINT or SIGTERM:

* torchft's lighthouse on ``--bind HOST:PORT``: it decides each step's quorum of replica groups
  and drops a group silent for ``--heartbeat-timeout`` seconds;
* the **job store** (a TCPStore) on the same host, port ``--store-port`` (default PORT + 1): the
  launch barrier, the commit ledger that fences a group gone behind (:mod:`mecefo.fencing`), the
  job's configuration every group must match, and which process holds each group index
  (:mod:`mecefo.group`).

With ``--state-dir DIR`` the job store's lasting part (the ledger, the job's configuration, the
groups' holders) is journalled in DIR (:class:`mecefo.jobstore.Journal`): a lighthouse that died
can be started again with the same ``--bind`` and ``--state-dir``, and the groups, which wait for it
(``--lighthouse-wait``), carry on from where they were; no step is lost or applied twice.

Neither is authenticated: anyone who can reach them can join the job or disturb it. The default
bind is loopback; on a cluster bind the cluster's private interface, never a public one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from .command import OneLineErrors

os.environ.setdefault("RUST_LOG", "warn")  # torchft's Rust servers log every quorum at info

DEFAULT_BIND = "127.0.0.1:29510"
JOB_STORE_PORT_OFFSET = 1  # the job store listens on the lighthouse's port + this, unless --store-port


def job_store_address(lighthouse: str) -> str:
    """The job store's default address for a lighthouse at ``lighthouse`` (HOST:PORT, http:// allowed)."""
    from .quorum import split_address

    host, port = split_address(lighthouse, "--lighthouse")
    return f"{host}:{port + JOB_STORE_PORT_OFFSET}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(prog="mecefo-lighthouse", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default=DEFAULT_BIND, metavar="HOST:PORT",
                        help="where the lighthouse listens (default %(default)s; unauthenticated: bind the "
                             "cluster's private interface)")
    parser.add_argument("--store-port", type=int, default=None,
                        help="the job store's port on the same host (default: the lighthouse's port + 1)")
    parser.add_argument("--min-replicas", type=int, default=1,
                        help="replica groups a quorum needs (default %(default)s)")
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0,
                        help="seconds of silence after which a group is dropped (default %(default)s)")
    parser.add_argument("--join-timeout", type=float, default=30.0,
                        help="seconds a quorum waits for a live group that has not asked to join yet "
                             "(default %(default)s)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="journal the job store's ledger, configuration and group holders in DIR, and load "
                             "them when started again with the same DIR: the groups then carry on (default: "
                             "nothing kept, a restarted lighthouse starts a new job)")
    args = parser.parse_args(argv)
    from .jobstore import READY_KEY, Journal
    from .quorum import BoundStore, split_address, start_lighthouse

    try:
        host, _ = split_address(args.bind, "--bind")
    except ValueError as e:
        parser.error(str(e))
    journal = None
    if args.state_dir:
        try:
            journal = Journal(args.state_dir)
        except OSError as e:
            parser.error(f"argument --state-dir: cannot use {args.state_dir}: {e.strerror or e}")
    if args.min_replicas < 1:
        parser.error(f"argument --min-replicas: must be >= 1, got {args.min_replicas}")
    for name in ("heartbeat_timeout", "join_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"argument --{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
    try:
        server, address = start_lighthouse(min_replicas=args.min_replicas, heartbeat_timeout_s=args.heartbeat_timeout,
                                           join_timeout_s=args.join_timeout, bind=args.bind)
    except Exception as e:  # noqa: BLE001  (the Rust server's bind errors are plain exceptions)
        parser.error(f"argument --bind: cannot listen on {args.bind}: {str(e).splitlines()[0]}")
    store_port = args.store_port
    if store_port is None:  # next to the lighthouse's port (the one it got, when --bind asked for any)
        store_port = split_address(address, "--bind")[1] + JOB_STORE_PORT_OFFSET
    try:
        store = BoundStore(host, store_port)
    except OSError as e:
        server.shutdown()
        parser.error(f"argument --store-port: cannot listen on {host}:{store_port}: {e.strerror or e}")
    stop = threading.Event()
    keeping = None
    if journal is not None:
        journal.restore(store.store)
        keeping = threading.Thread(target=journal.run, args=(_client(store), stop), name="journal", daemon=True)
        keeping.start()
    store.store.set(READY_KEY, "1")  # clients wait for this after connecting: the restored state is in
    kept = f"; {journal.describe()}" if journal is not None else ""
    print(f"mecefo-lighthouse: lighthouse {address} job-store {store.address} (unauthenticated; "
          f"min replicas {args.min_replicas}, heartbeat timeout {args.heartbeat_timeout:g} s{kept})", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # a timed wait: the signal handler runs between waits
        pass
    if keeping is not None:
        keeping.join(timeout=5)
        journal.close()
    server.shutdown()
    return 0


def _client(store):
    """A connection of this process to its own job store (the journal's: the server object is not shared
    between threads)."""
    from .quorum import connect_store

    return connect_store(store.address, 60)


if __name__ == "__main__":
    sys.exit(main())
