"""Real network partitions (issue 20, part 4): hosts as network namespaces made by the test, links taken down.

Hosts: the lighthouse on ``lh`` (10.77.0.2, control network only) and groups 0 and 1 (one rank each,
torchrun) on ``g0`` and ``g1``, each on the control network (10.77.0.1I: lighthouse, job store) and on the
data network (10.77.1.1I: gloo, healing, probes). A partition takes links down: nothing is closed,
packets are lost, as when a cable, a switch port or a host's network fails.

Cases, each a job of its own: a group cut off from everything for longer than the heartbeat timeout,
then reconnected; a group cut off from the other groups but not from the lighthouse; the lighthouse's
host cut off. In each: every committed step once per group and equal on every group, every step's loss
equal to single-process full-batch training (ndb-exact keeps the global batch), one lineage, every
process ending with a documented exit code; detection and recovery times are printed.
"""

import re
import sys
import time
from pathlib import Path

import pytest

from netns import Network, unavailable
from test_group_faults import no_traceback_through_mecefo
from test_groups import GROUP_OPTIONS, Cluster, _options
from trainer_runs import check_replicas_agree, full_batch_reference, relative_difference, final_model
from mecefo.report import read_metrics

pytestmark = pytest.mark.slow
# two groups: the sum of two group gradients is the same in any order, so every step's loss equals full-batch
# training's to float64 rounding for the whole run; with three, this trajectory amplifies the summation orders'
# rounding from 1e-10 at step 1 to 4e-4 by step 200 (seen), as large as a lost step. The split rule's harder
# side is then exercised: a tie (one of two groups reached), broken by the lowest index
GROUPS = 2
LIGHTHOUSE = "10.77.0.2:29510"
JOB = dict(GROUP_OPTIONS, timeout=2.0, policy="ndb-exact", lighthouse_wait=60)


@pytest.fixture(scope="module")
def network():
    why = unavailable()
    if why:
        print(f"skipped: {why}")
        pytest.skip(why)
    net = Network()
    try:
        for switch in ("ctl", "dat"):
            net.add_switch(switch)
        net.add_host("lh", {"ctl": "10.77.0.2/24"})
        for g in range(GROUPS):
            net.add_host(f"g{g}", {"ctl": f"10.77.0.1{g}/24", "dat": f"10.77.1.1{g}/24"})
        yield net
    finally:
        net.close()


class Job:
    """The lighthouse and the groups of one job in the namespaces; close() kills them and reconnects every host."""

    def __init__(self, network: Network, tmp: Path, cache: Path, steps: int):
        self.net = network
        self.cluster = Cluster(tmp, cache)
        self.run_dir = tmp / "run"
        self.steps = steps
        log = tmp / "lighthouse.log"
        self.lighthouse = self.cluster._popen(network.command("lh", [
            sys.executable, "-m", "mecefo.lighthouse", "--bind", LIGHTHOUSE, "--heartbeat-timeout", "1.5"]), log)
        deadline = time.monotonic() + 60
        while "job-store" not in log.read_text():
            assert self.lighthouse.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        self.groups = [self.start_group(g) for g in range(GROUPS)]

    def start_group(self, group: int):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
               "--master-addr", "127.0.0.1", "--master-port", "29400", "--max-restarts", "1",
               "--monitor-interval", "0.2", "-m", "mecefo.group", "--lighthouse", LIGHTHOUSE, "--group", str(group),
               "--groups", str(GROUPS), "--run-dir", str(self.run_dir), "--cache-dir", str(self.cluster.cache),
               "--advertise", f"10.77.1.1{group}", *_options(dict(JOB, steps=self.steps))]
        return self.cluster._popen(self.net.command(f"g{group}", cmd), self.cluster.tmp / f"group_{group}.log",
                                   dict(GLOO_SOCKET_IFNAME="dat"))

    def committed(self) -> list[dict]:
        return [r for r in read_metrics(self.run_dir) if "event" not in r]

    def wait_for(self, predicate, timeout_s: float, what: str) -> float:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; logs in {self.cluster.tmp}"
            time.sleep(0.05)
        return time.time()

    def step(self) -> int:
        return max((r["step"] for r in self.committed()), default=-1)

    def finish(self) -> list[dict]:
        """Wait for every group to end with 0; check the promises against full-batch training."""
        for proc in self.groups:
            assert self.cluster.wait(proc, 300) == 0, f"a group failed; logs in {self.cluster.tmp}"
            no_traceback_through_mecefo(proc)
        series = check_replicas_agree(self.run_dir, self.steps)
        reference = full_batch_reference(self.run_dir)
        error = [abs(r["loss"] - ref) / abs(ref) for r, ref in zip(series, reference.losses, strict=True)]
        assert max(error) < 1e-7 and relative_difference(final_model(self.run_dir), reference.state) < 1e-7
        committed = self.committed()
        assert len({(r["step"], r["lineage"]) for r in committed}) == len({r["step"] for r in committed}), "one lineage"
        return series

    def close(self) -> None:
        for host in ("lh", *(f"g{g}" for g in range(GROUPS))):
            self.net.heal(host)
        self.cluster.close()


@pytest.fixture
def job_factory(network, tmp_path, corpus_cache):
    jobs = []

    def make(steps: int) -> Job:
        jobs.append(Job(network, tmp_path, corpus_cache, steps))
        return jobs[-1]

    try:
        yield make
    finally:
        for job in jobs:
            job.close()


def worker_exits(proc) -> list[int]:
    return [int(code) for code in re.findall(r"failed \(exitcode: (-?\d+)\)", proc.log_path.read_text())]


def first_time(records: list[dict], predicate) -> float:
    return min(r["time"] for r in records if predicate(r))


def test_a_group_cut_off_from_everything_is_dropped_and_heals_when_reconnected(job_factory, network):
    """Group 1 loses both links for 8 s (heartbeat timeout 1.5 s): group 0 stops waiting for it after its
    collective deadline (--timeout 2), the lighthouse drops it, group 0 runs its shard; reconnected, group 1
    gets a quorum again (its pending request goes through) and heals. Exit 0 everywhere."""
    job = job_factory(steps=200)
    job.wait_for(lambda: job.step() >= 20, 150, "step 20")
    network.cut("g1")
    cut = time.time()
    time.sleep(8)
    network.heal("g1")
    healed = time.time()
    job.wait_for(lambda: any(r.get("event") == "healed" and r["replica"] == 1 and r["time"] > healed
                             for r in read_metrics(job.run_dir)), 120, "group 1 to heal")
    series = job.finish()
    records = read_metrics(job.run_dir)
    dropped = first_time([r for r in records if "event" not in r], lambda r: r["time"] > cut and 1 not in r["live"])
    back = first_time(records, lambda r: r.get("event") == "healed" and r["replica"] == 1 and r["time"] > healed)
    assert any(r["neighbours"] == {"1": 0} for r in series), "group 0 ran group 1's shard"
    assert series[-1]["live"] == [0, 1]
    print(f"cut off from everything: group 0 went on without it {dropped - cut:.1f} s after the cut; "
          f"reconnected -> healed {back - healed:.1f} s")


def test_a_group_cut_off_from_the_groups_but_not_the_lighthouse_leaves_and_the_job_goes_on(job_factory, network):
    """Group 1 loses its data link only: it still heartbeats, so it stays in every quorum and every step
    fails for both. After two failed attempts each group probes the other: each reaches half of the quorum
    (itself), so the side without the lowest index, group 1, leaves (exit 1, one line) and group 0 stays; the
    lighthouse drops group 1 and the job goes on without it. torchrun restarts group 1, which waits until it
    reaches the running group; reconnected, it joins and heals. The replay bound never ends the job."""
    job = job_factory(steps=300)
    job.wait_for(lambda: job.step() >= 20, 150, "step 20")
    network.cut("g1", "dat")
    cut = time.time()
    job.wait_for(lambda: worker_exits(job.groups[1]) == [1], 90, "group 1 to leave")
    left = time.time()
    time.sleep(3)
    network.heal("g1", "dat")
    healed = time.time()
    job.wait_for(lambda: any(r.get("event") == "healed" and r["replica"] == 1 and r["time"] > healed
                             for r in read_metrics(job.run_dir)), 120, "group 1 to heal")
    series = job.finish()
    text = job.groups[1].log_path.read_text()
    lines = [line for line in text.splitlines() if line.startswith("mecefo-group: group 1:")]
    assert len(lines) == 1 and "cannot reach groups [0] of its quorum [0, 1] though the lighthouse answers" \
        in lines[0], text[-3000:]
    records = read_metrics(job.run_dir)
    on_without = first_time([r for r in records if "event" not in r], lambda r: r["time"] > cut and 1 not in r["live"])
    back = first_time(records, lambda r: r.get("event") == "healed" and r["replica"] == 1 and r["time"] > healed)
    assert not [r for r in records if r.get("event") == "gave_up"]
    assert series[-1]["live"] == [0, 1]
    print(f"cut off from the groups: group 1 left {left - cut:.1f} s after the cut, group 0 went on "
          f"{on_without - cut:.1f} s after it; reconnected -> healed {back - healed:.1f} s")


def test_the_lighthouse_host_cut_off_stalls_the_job_which_resumes_when_reconnected(job_factory, network):
    """The lighthouse's host loses its link for 8 s: the groups finish the step in flight among themselves,
    then wait for the job store to take its commit and for the lighthouse to give the next quorum (their
    state kept, --lighthouse-wait 60). Reconnected, the job goes on where it was: nothing lost, nobody
    dropped for good. Exit 0 everywhere."""
    job = job_factory(steps=150)
    job.wait_for(lambda: job.step() >= 20, 150, "step 20")
    network.cut("lh")
    cut = time.time()
    time.sleep(8)
    at_cut_end = job.step()
    network.heal("lh")
    healed = time.time()
    resumed = job.wait_for(lambda: job.step() > at_cut_end + 1, 120, "a step after the reconnection")
    job.finish()
    times = sorted(r["time"] for r in job.committed() if r["replica"] == 0)
    stall = max(b - a for a, b in zip(times, times[1:]))
    print(f"lighthouse host cut off 8 s: longest gap between commits {stall:.1f} s; reconnected -> next step "
          f"{resumed - healed:.1f} s (cut at {cut:.0f})")
