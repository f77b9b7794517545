"""The job store's client across a store restart, its journal (--state-dir), and the group admission rules
built on it, on real TCPStores (one process; the multi-process cases are in test_group_faults.py)."""

import gc
import json
import socket
import threading
import time

import pytest

from mecefo.fencing import CommitLedger, Fenced
from mecefo.group import AdmissionError, GroupGuard, check_start, committed_steps, launch_generation, leaves
from mecefo.jobstore import (DURABLE_KEY, GENERATION_KEY, IDENTITY_KEY, READY_KEY, ControlPlaneLost, JobStore, Journal, group_key,
                             ledger_key)
from mecefo.quorum import BoundStore


def serve(port: int = 0) -> BoundStore:
    server = BoundStore("127.0.0.1", port)
    server.store.set(READY_KEY, "1")
    return server


def stop(server: BoundStore) -> None:
    server.store = server._socket = None
    gc.collect()


def test_the_client_outlives_a_restart_of_the_store_and_gives_up_in_one_line():
    server = serve()
    port = server.port
    client = JobStore(f"127.0.0.1:{port}", wait_s=20)
    client.set("a", "1")
    stop(server)
    restarted = []
    threading.Timer(1.0, lambda: restarted.append(serve(port))).start()
    started = time.monotonic()
    assert client.get_or("a") is None, "the restarted store is empty (nothing journalled)"
    assert 0.9 < time.monotonic() - started < 15
    client.set("b", "2")
    assert client.get("b") == b"2"

    stop(restarted[0])
    short = JobStore(f"127.0.0.1:{port}", wait_s=1.5)
    started = time.monotonic()
    with pytest.raises(ControlPlaneLost, match=rf"the job store at 127.0.0.1:{port} has not answered for 1.5 s "
                                               r"\(.*; --lighthouse-wait\)"):
        short.get("b")
    assert time.monotonic() - started < 15


def test_a_journalled_store_restarts_with_its_ledger_identity_and_owners(tmp_path):
    """Claims return once journalled; a store restarted from the journal fences what the old one would:
    a step claimed by one quorum cannot be claimed by another (a restarted lighthouse's quorum 3 has
    another label than the old quorum 3), a stale replica behind the job is behind; it keeps the job's
    launch generation (on disk before the first claim), which the run directory alone would not give."""
    run_dir = tmp_path / "run"
    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "metrics" / "replica_0.jsonl").write_text(json.dumps({"step": 0, "generation": 1, "time": 0}) + "\n")
    tmp_path = tmp_path / "state"
    server = serve()
    journal = Journal(tmp_path)
    journal.restore(server.store)
    done = threading.Event()
    keeping = threading.Thread(target=journal.run, args=(JobStore(server.address, 10), done))
    keeping.start()
    client = JobStore(server.address, 10)
    client.set(IDENTITY_KEY, json.dumps({"replicas": 2}))
    client.set(group_key(1, "owner"), "host pid 1 [ab]")
    client.set(group_key(1, "beat"), "7")
    assert launch_generation(client, run_dir) == 2  # one past the run directory's newest
    ledger = CommitLedger(client, 0)
    try:
        for step in range(3):
            ledger.claim(step, "3:aaaa")
            kept = [json.loads(line)["key"] for line in (tmp_path / "job_store.jsonl").read_text().splitlines()]
            assert ledger_key(0, step) in kept, "a claim returns once its entry is on disk"
            assert kept.index(GENERATION_KEY) < kept.index(ledger_key(0, 0))
        time.sleep(2 * Journal.POLL_S)
    finally:
        done.set()
        keeping.join(timeout=10)
        journal.close()
    port = server.port
    stop(server)

    server = serve(port)
    again = Journal(tmp_path)
    assert again.next_step == 3 and "3 committed steps, 1 group owners" in again.describe()
    again.restore(server.store)
    client = JobStore(server.address, 10)
    assert client.get_or(group_key(1, "owner")) == "host pid 1 [ab]" and client.get_or(group_key(1, "beat")) is None
    assert client.check([DURABLE_KEY]) and json.loads(client.get(IDENTITY_KEY))["replicas"] == 2
    ledger = CommitLedger(client, 0)
    with pytest.raises(Fenced, match="step 2 was committed by quorum 3:aaaa, not this replica's quorum 3:bbbb"):
        ledger.claim(2, "3:bbbb")
    with pytest.raises(Fenced, match="the job already committed step 1"):
        ledger.check_behind(1, "1:cccc")
    ledger.claim(2, "3:aaaa")  # a member of the old quorum that claims late: the same step, the same quorum
    assert committed_steps(client) == 3
    # a group restarted into the job after the lighthouse: its launch, though the run directory now holds it
    (run_dir / "metrics" / "replica_0.jsonl").write_text(json.dumps({"step": 3, "generation": 2, "time": 1}) + "\n")
    assert launch_generation(client, run_dir) == 2


@pytest.mark.parametrize("done", [0, 1, 2, 5, 17, 64])
def test_committed_steps_is_found_by_bisection(done):
    server = serve()
    client = JobStore(server.address, 10)
    for step in range(done):
        client.set(ledger_key(0, step), "1:x")
    assert committed_steps(client) == done


def test_a_group_may_not_start_over_a_job_nobody_holds():
    server = serve()
    client = JobStore(server.address, 10)
    assert check_start(client, 0, 2, resume=False, checkpoint_step=None) == [], "a fresh job"
    for step in range(6):
        client.set(ledger_key(0, step), "1:x")
    with pytest.raises(AdmissionError, match="the job has committed 6 steps .* group 0 was started without --resume"):
        check_start(client, 0, 2, resume=False, checkpoint_step=None)
    with pytest.raises(AdmissionError, match="--resume: the newest checkpoint here is step 4, but the job's ledger "
                                             "has committed 6 steps"):
        check_start(client, 0, 2, resume=True, checkpoint_step=4)
    assert check_start(client, 0, 2, resume=True, checkpoint_step=6) == [], "resumes where the ledger ends"
    beating = threading.Event()

    def beat():
        while not beating.wait(0.1):
            client_1.add(group_key(1, "beat"), 1)

    client_1 = JobStore(server.address, 10)
    thread = threading.Thread(target=beat)
    thread.start()
    try:
        assert check_start(client, 0, 2, resume=False, checkpoint_step=None) == [1], "group 1 runs: heal from it"
    finally:
        beating.set()
        thread.join()


def test_the_side_of_a_split_quorum_that_leaves():
    assert not leaves([0, 1, 2], 1, [])
    assert leaves([0, 1, 2], 2, [0, 1]) and not leaves([0, 1, 2], 0, [2]) and not leaves([0, 1, 2], 1, [2])
    # two groups that cannot reach each other: the one holding the lowest index stays
    assert not leaves([0, 1], 0, [1]) and leaves([0, 1], 1, [0])
    assert not leaves([0, 1, 2, 3], 0, [2, 3]) and leaves([0, 1, 2, 3], 2, [0, 1])
    assert not leaves([3], 3, [])


def test_the_guard_sees_its_index_taken_over_and_which_groups_it_cannot_reach():
    server = serve()
    client = JobStore(server.address, 10)
    client.set(group_key(0, "owner"), "host-a pid 1 [aa]")
    guard = GroupGuard("host-a pid 1 [aa]", client, 0)
    assert guard.taken_over() is None
    client.set(group_key(0, "owner"), "host-b pid 2 [bb]")
    assert guard.taken_over() == "host-b pid 2 [bb]"
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    client.set(group_key(1, "address"), "127.0.0.1:%d" % listening.getsockname()[1])
    client.set(group_key(2, "address"), "127.0.0.1:%d" % closed.getsockname()[1])
    assert guard.unreachable([0, 1, 2, 3]) == [2, 3], "3 never said where it is"
    assert guard.cut_off([0, 1, 2]) is None, "0 and 1 reach each other: a majority"
    alone = GroupGuard("x", client, 2)
    client.set(group_key(0, "address"), "127.0.0.1:%d" % closed.getsockname()[1])
    client.set(group_key(1, "address"), "127.0.0.1:%d" % closed.getsockname()[1])
    assert "group 2 cannot reach groups [0, 1] of its quorum [0, 1, 2] though the lighthouse answers" in \
        alone.cut_off([0, 1, 2])
    listening.close()
    closed.close()
