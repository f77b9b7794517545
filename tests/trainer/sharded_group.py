"""Run a function on every rank of a gloo group of real processes (loopback), for the sharding tests.

``run_group(fn, world_size, *args)`` starts ``world_size`` processes; each builds the group as a
trainer rank does (an IntraGroup on a TCPStore, FSDP2's default process group on the same store)
and calls ``fn(group, *args)`` with ``group`` a :class:`Group`. Returns every rank's result, rank
order. Bounded in time; a rank's exception fails the call with its traceback.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

TIMEOUT_S = 120


@dataclass
class Group:
    rank: int
    world_size: int
    ranks: object  # mecefo.ranks.IntraGroup
    store: object


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn, args, results) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    try:
        from torch.distributed import PrefixStore, TCPStore

        from mecefo.ranks import IntraGroup

        store = TCPStore("127.0.0.1", port, is_master=rank == 0, world_size=world_size, timeout=_timedelta())
        ranks = IntraGroup.connect(PrefixStore("mecefo/intra", store), rank, world_size, 60.0)
        value = fn(Group(rank, world_size, ranks, ranks.store), *args)
        buffer = io.BytesIO()  # as bytes: tensors sent as shared memory die with this process
        torch.save(value, buffer)
        results.put((rank, buffer.getvalue(), None))
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, None, traceback.format_exc()))


def _timedelta():
    from datetime import timedelta

    return timedelta(seconds=60)


def run_group(fn, world_size: int, *args) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=TIMEOUT_S) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [tb for _, _, tb in out if tb]
    assert not errors, errors[0]
    return [torch.load(io.BytesIO(value), weights_only=False) for _, value, _ in sorted(out, key=lambda r: r[0])]
