"""Group jobs through faults of the control plane and of a group's identity (issue 20, parts 2 and 3):
a replaced group whose old holder wakes up (two live copies of one group index), and a lighthouse that
dies, with and without a restart from its --state-dir. Real processes (mecefo-lighthouse, torchrun,
mecefo.group) on loopback addresses, each host a distinct 127.0.0.K as in test_groups.py; every process is
killed in a finally block (the cluster fixture) and every wait is bounded.

Each test checks the promises against an independent reference: every committed step once per group
(replica_<I>.jsonl has one record per step), every group at the same state, every step's loss equal to
single-process full-batch training (ndb-exact keeps the global batch, so a lost or doubled step shows).
"""

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from mecefo.checkpoint import list_checkpoints, read_checkpoint
from mecefo.report import read_jsonl, read_metrics
from test_groups import LIGHTHOUSE_HOST, Cluster, _free_port
from test_groups import cluster  # noqa: F401 (the fixture: a lighthouse and its groups, every process killed after)
from trainer_runs import check_replicas_agree, final_model, full_batch_reference, relative_difference

pytestmark = pytest.mark.slow


def start_lighthouse(cluster: Cluster, bind: str, state_dir: Path | None = None, min_replicas: int = 1,
                     timeout_s: float = 60.0):
    """mecefo-lighthouse on ``bind`` (a fixed port: a restart must come back on the same address)."""
    log = cluster.tmp / f"lighthouse_{len(cluster.procs)}.log"
    cmd = [sys.executable, "-m", "mecefo.lighthouse", "--bind", bind, "--heartbeat-timeout", "1.5",
           "--min-replicas", str(min_replicas)]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    proc = cluster._popen(cmd, log)
    deadline = time.monotonic() + timeout_s
    while "job-store" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, f"the lighthouse did not start: {log.read_text()}"
        time.sleep(0.1)
    words = log.read_text().split()
    cluster.lighthouse = words[words.index("lighthouse") + 1]
    return proc


def wait_for(predicate, timeout_s: float, what: str, *procs) -> float:
    """Poll until ``predicate()``; the time it became true. Fails after ``timeout_s`` or if a proc ended."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[-1]} ended ({proc.returncode}) while waiting for {what}"
        time.sleep(0.05)
    return time.time()


def worker_exits(proc) -> list[int]:
    """The exit codes torchrun reports for the ranks it started (its own exit status is 1 for any failure)."""
    return [int(code) for code in re.findall(r"failed \(exitcode: (-?\d+)\)", proc.log_path.read_text())]


def no_traceback_through_mecefo(proc) -> None:
    """The group's ranks said why in their own lines: no Python traceback through mecefo's code, but for
    those torchft logs for an exception it handled (a failed collective or process-group configure: its
    first frame is torchft's, mecefo's LiveSetGloo may be inside). torchrun prints its own when a rank
    fails (no mecefo frame)."""
    lines = proc.log_path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last):"):
            continue
        block = []
        for frame in lines[i + 1:]:
            if not frame.startswith(" "):
                break
            block.append(frame)
        through_mecefo = any("python/mecefo/" in frame for frame in block)
        assert not through_mecefo or (block and "/torchft/" in block[0]), "\n".join(lines[i:i + 30])


def committed(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "event" not in r]


def pid_of(run_dir: Path, group: int) -> int:
    starts = [r for r in read_jsonl(run_dir / "metrics" / f"replica_{group}.jsonl") if r.get("event") == "start"]
    return starts[-1]["pid"]


def check_against_full_batch(run_dir: Path, steps: int) -> list[dict]:
    """Every step once per group and equal everywhere; every loss equals full-batch training's (the first
    steps to float64 rounding, the later ones to what ~100 steps of this trajectory amplify it to)."""
    series = check_replicas_agree(run_dir, steps)
    reference = full_batch_reference(run_dir)
    error = [abs(r["loss"] - ref) / abs(ref) for r, ref in zip(series, reference.losses, strict=True)]
    assert max(error[:40]) < 1e-12 and max(error) < 1e-7, max(error)
    assert relative_difference(final_model(run_dir), reference.state) < 1e-7
    return series


JOB = dict(policy="ndb-exact", lighthouse_wait=60)


def test_a_replaced_group_whose_old_holder_wakes_is_fenced_before_it_posts_a_gradient(tmp_path, cluster):
    """Group 1's only rank is SIGSTOPped (its lease beat stalls); the same group is started on another
    host, takes the index over and heals. The old holder is then woken: it finds itself in a quorum
    that lists index 1 twice (torchft gives each process its own replica id), where nobody trains, and
    exits fenced (76) without a gradient posted; the job goes on with the new holder. The lighthouse
    needs both groups for a quorum, so group 0 waits while group 1 is away instead of finishing."""
    start_lighthouse(cluster, f"{LIGHTHOUSE_HOST}:{_free_port(LIGHTHOUSE_HOST)}", min_replicas=2)
    run_dir = tmp_path / "run"
    steps = 100
    job = dict(JOB, quorum_timeout=300)  # group 0 waits for a quorum while group 1 is away: longer than 60 s
    first = [cluster.start_group(g, 2, run_dir, nproc=1, steps=steps, **job) for g in range(2)]
    wait_for(lambda: any(r["step"] >= 10 for r in committed(run_dir)), 120, "step 10", *first)
    old = pid_of(run_dir, 1)
    os.kill(old, signal.SIGSTOP)
    stopped = time.time()
    try:
        replacement = cluster.start_group(1, 2, run_dir, nproc=1, steps=steps, host="127.0.0.21", **job)
        wait_for(lambda: any(r.get("event") == "healed" and r["replica"] == 1 and r["time"] > stopped
                             for r in read_metrics(run_dir)), 120, "the replacement to heal", first[0], replacement)
        back = max(r["step"] for r in committed(run_dir))
        wait_for(lambda: max(r["step"] for r in committed(run_dir)) >= back + 3, 60, "3 steps with the replacement",
                 first[0], replacement)
    finally:
        os.kill(old, signal.SIGCONT)
    woken = time.time()
    assert cluster.wait(first[1], 60) != 0, "the old holder's torchrun ends with its fenced rank"
    fenced_at = time.time()
    for proc in (first[0], replacement):
        assert cluster.wait(proc, 240) == 0, f"a group failed; logs in {tmp_path}"

    fenced = [r for r in read_metrics(run_dir) if r.get("event") == "fenced"]
    assert len(fenced) == 1 and fenced[0]["replica"] == 1 and "index is held by" in fenced[0]["reason"], fenced
    assert worker_exits(first[1]) == [76]
    twin = [r for r in read_metrics(run_dir)
            if r.get("event") == "discarded" and "held by two processes" in r["reason"]]
    series = check_against_full_batch(run_dir, steps)  # replica_1.jsonl: one record per step, old or new holder
    old_steps = {r["step"] for r in committed(run_dir) if r["replica"] == 1 and r["time"] < stopped + 1}
    assert old_steps and max(old_steps) < fenced[0]["step"], "the old holder committed nothing after it woke"
    assert all(r["live"] == [0, 1] for r in series)
    print(f"old holder stopped {woken - stopped:.1f} s; woken -> fenced exit {fenced_at - woken:.1f} s; "
          f"quorums with index 1 twice (nothing trained): {len(twin)} discarded attempts")


def test_a_lighthouse_restarted_from_its_state_dir_lets_the_groups_carry_on(tmp_path, cluster):
    """The lighthouse (and its job store) is SIGKILLed mid-run and started again 4 s later on the same address
    with the same --state-dir: the groups (2 x 2 ranks) kept their state, waited, and go on from where they
    were; no step lost or applied twice, one lineage, no traceback."""
    bind = f"{LIGHTHOUSE_HOST}:{_free_port(LIGHTHOUSE_HOST)}"
    state = tmp_path / "lighthouse-state"
    lighthouse = start_lighthouse(cluster, bind, state)
    run_dir = tmp_path / "run"
    steps = 100
    groups = [cluster.start_group(g, 2, run_dir, steps=steps, **JOB) for g in range(2)]
    wait_for(lambda: any(r["step"] >= 30 for r in committed(run_dir)), 150, "step 30", *groups)
    os.killpg(lighthouse.pid, signal.SIGKILL)
    killed = time.time()
    at_kill = max(r["step"] for r in committed(run_dir))
    time.sleep(4)
    start_lighthouse(cluster, bind, state)
    restarted = time.time()
    resumed = wait_for(lambda: max(r["step"] for r in committed(run_dir)) > at_kill + 1, 90,
                       "a step after the restart", *groups)
    for proc in groups:
        assert cluster.wait(proc, 200) == 0, f"a group failed; logs in {tmp_path}"
    check_against_full_batch(run_dir, steps)
    lineages = {r["step"]: r["lineage"] for r in committed(run_dir)}
    assert len({(r["step"], r["lineage"]) for r in committed(run_dir)}) == len(lineages), "one lineage"
    for proc in groups:
        no_traceback_through_mecefo(proc)
    print(f"lighthouse down {restarted - killed:.1f} s at step {at_kill}; restart -> next committed step "
          f"{resumed - restarted:.1f} s")


def test_without_a_lighthouse_every_rank_ends_with_a_checkpoint_and_the_job_resumes_from_it(tmp_path, cluster):
    """The lighthouse dies and nobody restarts it: every rank of both groups ends within --lighthouse-wait
    (+ a quorum attempt) with exit 1 and one line, rank 0 leaving a checkpoint of the last committed step.
    The lighthouse is then started again from its --state-dir: a group started without --resume is refused
    in one line (exit 2: the ledger has committed steps and no group runs to heal from); with --resume the
    groups continue from the checkpoint and end where uninterrupted training ends."""
    bind = f"{LIGHTHOUSE_HOST}:{_free_port(LIGHTHOUSE_HOST)}"
    state = tmp_path / "lighthouse-state"
    lighthouse = start_lighthouse(cluster, bind, state)
    run_dir = tmp_path / "run"
    steps = 60
    job = dict(JOB, lighthouse_wait=5)
    groups = [cluster.start_group(g, 2, run_dir, nproc=1, steps=steps, **job) for g in range(2)]
    wait_for(lambda: any(r["step"] >= 20 for r in committed(run_dir)), 150, "step 20", *groups)
    os.killpg(lighthouse.pid, signal.SIGKILL)
    killed = time.time()
    for proc in groups:
        assert cluster.wait(proc, 60) != 0
    ended = time.time()
    done = max(r["step"] for r in committed(run_dir)) + 1
    for proc in groups:
        assert worker_exits(proc) == [1]
        text = proc.log_path.read_text()
        lines = [line for line in text.splitlines() if line.startswith("mecefo-group: group ")]
        assert len(lines) == 1 and "has not answered for 5 s" in lines[0], text[-2000:]
        assert "--lighthouse-wait" in lines[0]
        no_traceback_through_mecefo(proc)
    step, path = list_checkpoints(run_dir / "checkpoints")[0]
    assert step == done and read_checkpoint(path)["trainer"]["step"] == done, "a checkpoint of the last commit"

    start_lighthouse(cluster, bind, state)
    refused = cluster.start_group(0, 2, run_dir, nproc=1, steps=steps, **job)
    assert cluster.wait(refused, 90) != 0 and worker_exits(refused) == [2]
    line = [x for x in refused.log_path.read_text().splitlines() if x.startswith("mecefo-group: error:")]
    assert line and f"the job has committed {done} steps" in line[0] and "--resume" in line[0], line
    resumed = [cluster.start_group(g, 2, run_dir, nproc=1, steps=steps, extra=("--resume",), **job) for g in range(2)]
    for proc in resumed:
        assert cluster.wait(proc, 200) == 0, f"a resumed group failed; logs in {tmp_path}"
    check_against_full_batch(run_dir, steps)
    print(f"lighthouse killed at step {done}: every rank ended {ended - killed:.1f} s later (--lighthouse-wait 5)")
