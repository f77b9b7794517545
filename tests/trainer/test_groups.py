"""Replica groups across "hosts": mecefo-lighthouse plus groups of 2 ranks started through torchrun.

Every host is a distinct loopback address (127.0.0.K): the lighthouse, each group's servers and
its torchrun master bind there. (torchrun's own store, on MASTER_PORT, listens on every interface:
that is torchrun's doing, so each group gets its own free port.) Every process runs in its own
process group and is killed in a finally block; every wait is bounded.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mecefo.checkpoint import checkpoint_path
from mecefo.config import TrainConfig
from mecefo.failures import injections_dir
from mecefo.report import main as report_main
from mecefo.report import read_jsonl, read_metrics
from trainer_runs import FAST, check_replicas_agree, final_model, relative_difference, run

pytestmark = pytest.mark.slow
LIGHTHOUSE_HOST = "127.0.0.5"
# the job's options, as mecefo.group takes them (FAST's, less what a group job sets itself)
GROUP_OPTIONS = dict(model="tiny", dtype="float64", seq_len=16, micro_batch=2, warmup=5, lr=1e-3,
                     checkpoint_every=0, eval_batches=2, heartbeat_timeout=1.5, timeout=4.0, quorum_timeout=60.0)


def _options(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Cluster:
    """A lighthouse and replica groups on loopback addresses; :meth:`close` kills whatever is left."""

    def __init__(self, tmp: Path, cache: Path):
        self.tmp = tmp
        self.cache = cache
        self.procs: list[subprocess.Popen] = []
        self.lighthouse = self.job_store = None

    def start_lighthouse(self, timeout_s: float = 60.0) -> None:
        proc = self._popen([sys.executable, "-m", "mecefo.lighthouse", "--bind", f"{LIGHTHOUSE_HOST}:0",
                            "--heartbeat-timeout", "1.5"], self.tmp / "lighthouse.log")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = (self.tmp / "lighthouse.log").read_text()
            if "job-store" in text:
                words = text.split()
                self.lighthouse = words[words.index("lighthouse") + 1]
                self.job_store = words[words.index("job-store") + 1]
                return
            assert proc.poll() is None, f"the lighthouse exited: {text}"
            time.sleep(0.1)
        raise AssertionError("the lighthouse did not start within 60 s")

    def _group_args(self, group: int, groups: int, run_dir: Path, lighthouse: str | None, options: dict,
                    extra: tuple[str, ...]) -> list[str]:
        return ["-m", "mecefo.group", "--lighthouse", lighthouse or self.lighthouse, "--group", str(group),
                "--groups", str(groups), "--run-dir", str(run_dir), "--cache-dir", str(self.cache),
                *_options({**GROUP_OPTIONS, **options}), *extra]

    def start_group(self, group: int, groups: int, run_dir: Path, *, nproc: int = 2, max_restarts: int = 0,
                    extra: tuple[str, ...] = (), lighthouse: str | None = None, host: str | None = None,
                    **options) -> subprocess.Popen:
        """Group ``group`` on ``host`` (default 127.0.0.(10 + group)), its ranks started by torchrun."""
        host = host or f"127.0.0.{10 + group}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", host, "--master-port", str(_free_port(host)), "--max-restarts", str(max_restarts),
               "--monitor-interval", "0.2", *self._group_args(group, groups, run_dir, lighthouse, options, extra),
               "--advertise", host]
        return self._popen(cmd, self.tmp / f"group_{group}_{len(self.procs)}.log")

    def start_group_as_srun(self, group: int, groups: int, run_dir: Path, *, nproc: int = 2,
                            **options) -> list[subprocess.Popen]:
        """Group ``group`` on host 127.0.0.(10 + group), one process per rank with the environment srun gives
        its tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) and MASTER_ADDR / MASTER_PORT, no torchrun."""
        host = f"127.0.0.{10 + group}"
        master = dict(MASTER_ADDR=host, MASTER_PORT=str(_free_port(host)), SLURM_NTASKS=str(nproc))
        cmd = [sys.executable, *self._group_args(group, groups, run_dir, None, options, ())]
        return [self._popen(cmd, self.tmp / f"group_{group}_{len(self.procs)}.log",
                            dict(master, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))) for rank in range(nproc)]

    def _popen(self, cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc.log_path = log_path
        self.procs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen, timeout_s: float) -> int:
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{proc.args[:8]} still running after {timeout_s} s; logs in {self.tmp}") from None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path, corpus_cache):
    c = Cluster(tmp_path, corpus_cache)
    try:
        yield c
    finally:
        c.close()


def rank_records(run_dir: Path) -> list[dict]:
    """Committed-step records of the groups' ranks other than 0 (metrics/ranks/)."""
    return [r for path in sorted((run_dir / "metrics" / "ranks").glob("*.jsonl")) for r in read_jsonl(path)
            if "event" not in r]


def check_ranks_agree_with_groups(run_dir: Path, series: list[dict]) -> None:
    """Every other rank's state equals its group's rank 0's (and so every group's) at each step it committed."""
    by_step = {r["step"]: (r["param_hash"], r["optim_hash"]) for r in series}
    ranks = rank_records(run_dir)
    assert ranks, "ranks other than 0 wrote records"
    for r in ranks:
        assert (r["param_hash"], r["optim_hash"]) == by_step[r["step"]], \
            f"group {r['replica']} rank {r['group_rank']} step {r['step']}"


def test_a_killed_rank_fails_its_group_whose_shard_is_taken_over_and_which_heals(tmp_path, cluster):
    """3 groups of 2 ranks; rank 1 of group 1 is SIGKILLed at step 6: group 1 is dropped, group 2 runs its
    shard exactly (ndb-exact), torchrun restarts group 1 and it heals from a live group. Killed again at
    its first step past 40 (the one it healed at), with torchrun's restarts used up, it is started anew
    on another host (a replaced node: 127.0.0.21), takes its index over and heals again. Every committed
    step is the same on every rank of every group, none lost or applied twice. (That an exact takeover
    is full-batch training is tested on single-rank replicas, test_training.py; that a group computes
    what its ranks would as replicas, below.)"""
    cluster.start_lighthouse()
    run_dir = tmp_path / "run"
    steps = 230
    kills = ("--inject", "kill@6:1", "--inject", "kill@40:1")
    groups = [cluster.start_group(g, 3, run_dir, max_restarts=1, steps=steps, policy="ndb-exact",
                                  extra=kills if g == 1 else ())
              for g in range(3)]
    assert cluster.wait(groups[1], 150) != 0, "group 1's torchrun gives up after its one restart"
    replaced = cluster.start_group(1, 3, run_dir, steps=steps, policy="ndb-exact", extra=kills, host="127.0.0.21")
    for proc in (groups[0], groups[2], replaced):
        assert cluster.wait(proc, 200) == 0, f"a group failed; logs in {tmp_path}"

    series = check_replicas_agree(run_dir, steps)
    check_ranks_agree_with_groups(run_dir, series)
    rank_1_pids = {r["pid"] for r in read_jsonl(run_dir / "metrics" / "ranks" / "replica_1_rank_1.jsonl")
                   if r.get("event") == "start"}
    for key in ("kill-6-1-step", "kill-40-1-step"):
        fired = json.loads((injections_dir(run_dir) / key).read_text())
        assert fired["replica"] == 1 and fired["pid"] in rank_1_pids, "group 1's rank 1 died (not rank 0)"
    covered = [r for r in series if r["neighbours"]]
    assert covered and covered[0]["step"] == 6 and all(r["neighbours"] == {"1": 2} for r in covered)
    records = read_metrics(run_dir)
    starts = [r for r in records if r.get("event") == "start" and r["replica"] == 1]
    heals = [r for r in records if r.get("event") == "healed" and r["replica"] == 1]
    assert len(starts) == 3 and len(heals) == 2, "started, restarted by torchrun, started on the new host"
    back = covered[-1]["step"] + 1
    assert heals[-1]["step"] == back < steps - 5, "group 1 came back from the new host"
    assert all(r["live"] == [0, 1, 2] for r in series[back:])
    second = json.loads((injections_dir(run_dir) / "kill-40-1-step").read_text())
    assert second["step"] == heals[0]["step"] > 40, "killed again right after torchrun's restart healed it"
    # python -m mecefo.report: the summary no launcher wrote; a group's heal lasts until its slowest rank's
    assert report_main([str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    rank_heals = [r for r in read_jsonl(run_dir / "metrics" / "ranks" / "replica_1_rank_1.jsonl")
                  if r.get("event") == "healed"]
    assert summary["ranks_per_group"] == 2 and summary["heals"] == 2 and len(rank_heals) == 2
    rank_s = {r["step"]: r["seconds"] for r in rank_heals}
    assert summary["heal_s_mean"] == pytest.approx(sum(max(h["seconds"], rank_s[h["step"]]) for h in heals) / 2)
    assert summary["steps_done"] == steps and (run_dir / "plot.png").is_file()
    # the group is dropped once its heartbeats stop (1.5 s here; seen: 1.5-2 s), not at the 60 s quorum timeout
    assert summary["kills"] == 2 and summary["detect_s_mean"] < 10


def test_two_groups_of_two_ranks_match_four_single_rank_replicas_and_resume_exactly(tmp_path, cluster, corpus_cache):
    """Without failures, 2 groups x 2 ranks train on what 4 single-rank replicas train on (rank r of group
    g: replica 2g + r's data) and end where they end, up to the order of the gradient sums. Group 0 is
    started by torchrun, group 1 as srun starts tasks. Resumed with a fresh lighthouse from the checkpoint
    of step 6 (as after a preemption), the groups end exactly where they ended."""
    cluster.start_lighthouse()
    run_dir = tmp_path / "groups"
    steps = 12
    job = dict(steps=steps, policy="mecefo", checkpoint_every=6)
    procs = [cluster.start_group(0, 2, run_dir, **job), *cluster.start_group_as_srun(1, 2, run_dir, **job)]
    for proc in procs:
        assert cluster.wait(proc, 150) == 0, f"a group failed; logs in {tmp_path}"
    series = check_replicas_agree(run_dir, steps)
    check_ranks_agree_with_groups(run_dir, series)

    single = TrainConfig(run_dir=str(tmp_path / "single"), cache_dir=str(corpus_cache),
                         **{**FAST, "replicas": 4, "steps": steps, "policy": "mecefo"})
    run(single)
    assert relative_difference(final_model(run_dir), final_model(single.run_path)) < 1e-12
    ours = [r["loss"] for r in series]
    theirs = [r["loss"] for r in check_replicas_agree(single.run_path, steps)]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-12

    uninterrupted = final_model(run_dir)
    checkpoint_path(run_dir / "checkpoints", steps).unlink()  # preempted after the checkpoint of step 6
    cluster.start_lighthouse()  # a fresh job store: the old one's ledger has steps 6 .. 11 committed
    procs = [cluster.start_group(g, 2, run_dir, extra=("--resume",), **job) for g in range(2)]
    for proc in procs:
        assert cluster.wait(proc, 150) == 0, f"a resumed group failed; logs in {tmp_path}"
    resumed = [r for r in read_metrics(run_dir) if r.get("event") == "resumed"]
    assert sorted(r["replica"] for r in resumed) == [0, 1] and all(r["step"] == 6 for r in resumed)
    assert all(torch.equal(t, uninterrupted[name]) for name, t in final_model(run_dir).items())


def _group_error(cluster: Cluster, proc: subprocess.Popen, timeout_s: float = 90) -> str:
    """The one-line error of a group that must refuse to start (exit status 2 of its ranks)."""
    assert cluster.wait(proc, timeout_s) != 0
    text = proc.log_path.read_text()
    lines = [line for line in text.splitlines() if line.startswith("mecefo-group: error:")]
    assert lines, text[-3000:]
    return lines[0]


def test_bad_group_configurations_are_one_line_errors(tmp_path, cluster):
    """An unreachable lighthouse (bounded wait, the address named), a second group with a taken index,
    a group with another model and ranks per group than the job's: each refused in one line."""
    dead = f"{LIGHTHOUSE_HOST}:{_free_port(LIGHTHOUSE_HOST)}"
    started = time.monotonic()
    line = _group_error(cluster, cluster.start_group(0, 2, tmp_path / "nowhere", lighthouse=dead,
                                                     extra=("--connect-timeout", "2")))
    assert f"cannot reach the lighthouse at {dead} within 2 s" in line and "--lighthouse" in line
    assert time.monotonic() - started < 60

    cluster.start_lighthouse()
    run_dir = tmp_path / "run"
    first = cluster.start_group(0, 2, run_dir, steps=400)  # waits at the launch barrier for group 1
    deadline = time.monotonic() + 90
    while not (run_dir / "metrics" / "replica_0.jsonl").is_file():  # admitted: holds group 0
        assert time.monotonic() < deadline and first.poll() is None, "group 0 did not start"
        time.sleep(0.2)
    twin = cluster.start_group(0, 2, tmp_path / "twin", steps=400)
    other = cluster.start_group(1, 2, tmp_path / "other", steps=400, model="small", nproc=1)
    line = _group_error(cluster, twin)
    assert "group 0 is already running" in line and "--group 0" in line
    line = _group_error(cluster, other)
    assert "group 1 does not match the job" in line
    assert "model 'architecture LlamaForCausalLM, config " in line and "in the job (--model)" in line
    assert "ranks_per_group 1 here, 2 in the job (--nproc-per-node / WORLD_SIZE)" in line
    assert first.poll() is None, "the job's group is not disturbed"
