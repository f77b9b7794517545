"""examples/slurm_mecefo.sbatch's logic against a stub Slurm (issue 20): no real Slurm, no training.

The recipe runs as sbatch runs it (bash, SLURM_* in the environment) with ``srun``, ``scontrol``,
``scancel`` and ``getent`` replaced on PATH by one stub (:data:`STUB`) that records every call in
``calls.jsonl`` and plays a scripted outcome per job step: a group that finishes (it writes the
record of the job's last step into RUN_DIR/metrics, as a group's rank 0 does, and exits 0), a lost
node (srun exits 0, as with --no-kill, and the node stops answering), a crash (exit 1), a step that
runs until it is signalled. The recipe's own ``python -m mecefo.report --complete`` is the real one.
Node ``nK`` has the address 127.0.1.K. Each run is bounded in time; every process is killed in a
finally.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[2] / "examples" / "slurm_mecefo.sbatch"
JOB_ID = "4242"

STUB = r'''#!{python}
"""srun / scontrol / scancel / getent for the recipe's tests: see tests/examples/test_slurm_recipe.py."""
import fcntl, json, os, signal, sys, time
from pathlib import Path

world = Path(os.environ["STUB_WORLD"])
scenario = json.loads((world / "scenario.json").read_text())
tool, args = Path(sys.argv[0]).name, sys.argv[1:]


def log(**record):
    with open(world / "calls.jsonl", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(dict(record, time=time.time())) + "\n")


def calls():
    with open(world / "calls.jsonl") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        return [json.loads(line) for line in f.read().splitlines()]


def dead():
    path = world / "dead_nodes"
    return set(path.read_text().split()) if path.is_file() else set()


def value(option):
    return args[args.index(option) + 1]


if tool == "scontrol":  # scontrol show hostnames LIST
    print("\n".join(scenario["nodes"]))
elif tool == "getent":  # getent ahostsv4 NODE
    print(f"127.0.1.{{scenario['nodes'].index(args[1])}}   STREAM {{args[1]}}")
elif tool == "scancel":
    log(tool="scancel", args=args)
elif "true" in args:  # the recipe's probe: a trivial step on a node
    node = value("--nodelist")
    log(tool="srun", role="probe", node=node, answered=node not in dead())
    sys.exit(1 if node in dead() else 0)
else:
    role = "lighthouse" if "mecefo.lighthouse" in args else f"group{{value('--group')}}"
    node = value("--nodelist")
    index = sum(1 for c in calls() if c.get("role") == role and c.get("event") == "start")
    log(tool="srun", role=role, event="start", node=node, args=args)

    def terminated(*_):
        log(tool="srun", role=role, event="terminated", node=node)
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminated)
    script = scenario[role]
    if index >= len(script):
        log(tool="srun", role=role, event="unscripted", node=node)
        sys.exit(98)
    action = script[index]
    deadline = time.monotonic() + 20
    for condition in action.get("after", []):  # "ROLE:N": until ROLE's step was started N times
        who, count = condition.split(":")
        while sum(1 for c in calls() if c.get("role") == who and c.get("event") == "start") < int(count):
            if time.monotonic() > deadline:
                log(tool="srun", role=role, event="stuck", node=node, waiting_for=condition)
                sys.exit(99)
            time.sleep(0.05)
    do = action["do"]
    log(tool="srun", role=role, event=do, node=node)
    if do == "finish":  # the job's last step committed: rank 0's record of it, then exit 0
        run_dir = Path(value("--run-dir"))
        (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({{"steps": scenario["steps"]}}))
        with open(run_dir / "metrics" / f"replica_{{value('--group')}}.jsonl", "a") as f:
            f.write(json.dumps({{"step": scenario["steps"] - 1, "replica": int(value("--group"))}}) + "\n")
        sys.exit(0)
    if do == "lost":  # the node fails: with --no-kill, srun exits 0
        with open(world / "dead_nodes", "a") as f:
            f.write(node + "\n")
        sys.exit(0)
    if do == "crash":
        sys.exit(1)
    while True:  # "serve": runs until signalled (a lighthouse, a group waiting or training)
        signal.pause()
'''


def run_recipe(tmp_path: Path, scenario: dict, timeout_s: float = 60, **env) -> tuple[int, str, list[dict]]:
    """Run the recipe against the stub world ``scenario``; (exit status, its output, the stub's calls)."""
    world = tmp_path / "world"
    bin_dir = tmp_path / "bin"
    world.mkdir()
    bin_dir.mkdir()
    (world / "scenario.json").write_text(json.dumps(scenario))
    (world / "calls.jsonl").touch()
    stub = bin_dir / "srun"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    for tool in ("scontrol", "scancel", "getent"):
        (bin_dir / tool).symlink_to(stub)
    environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_WORLD=str(world),
                       SLURM_JOB_ID=JOB_ID, SLURM_JOB_NODELIST="n[0-9]", SLURM_CPUS_PER_TASK="16",
                       RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable, NUM_GROUPS="2", NPROC="2",
                       TRAIN_ARGS="--preset tiny --steps 10", STARTUP_WAIT="0", PROBE_TIMEOUT="10", **env)
    proc = subprocess.Popen(["bash", str(RECIPE)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environment, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the recipe still runs after {timeout_s} s; calls in {world / 'calls.jsonl'}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    calls = [json.loads(line) for line in (world / "calls.jsonl").read_text().splitlines()]
    assert not [c for c in calls if c.get("event") in ("unscripted", "stuck")], (out, calls)
    return proc.returncode, out, calls


def starts(calls: list[dict], role: str) -> list[dict]:
    return [c for c in calls if c.get("role") == role and c.get("event") == "start"]


def seconds_between(calls: list[dict], first: tuple[str, str], then: dict) -> float:
    """Seconds from the first call with (role, event) ``first`` to the first later call matching ``then``."""
    t0 = next(c["time"] for c in calls if (c.get("role"), c.get("event")) == first)
    return next(c["time"] for c in calls if c["time"] > t0 and then.items() <= c.items()) - t0


def option(call: dict, name: str) -> str | None:
    args = call["args"]
    return args[args.index(name) + 1] if name in args else None


def test_a_lost_node_is_not_a_finished_group_its_group_moves_to_a_spare(tmp_path):
    """Group 1's node is lost (srun exits 0 without the job's last step): the recipe probes the node, finds
    it dead, and starts group 1 on the spare with --resume; group 0 crashes once and is started again on
    its own node, which answers. Each group step gets the job's CPUs per task and its own master port.
    The job ends when the last step is committed: the lighthouse is stopped, exit 0, nothing cancelled."""
    scenario = dict(nodes=["n0", "n1", "n2"], steps=10, lighthouse=[{"do": "serve"}],
                    group0=[{"do": "crash"}, {"do": "finish", "after": ["group1:2"]}],
                    group1=[{"do": "lost", "after": ["group0:1"]}, {"do": "finish", "after": ["group0:2"]}])
    code, out, calls = run_recipe(tmp_path, scenario, MASTER_PORT="29600")
    assert code == 0, out
    assert [c["node"] for c in starts(calls, "group1")] == ["n1", "n2"], "the spare, not the lost node"
    recovery = seconds_between(calls, ("group1", "lost"), dict(role="group1", event="start"))
    print(f"lost node: group 1 started on the spare {recovery:.2f} s after its srun returned")
    assert recovery < 10
    assert [c["node"] for c in starts(calls, "group0")] == ["n0", "n0"], "a crash on a live node: same node"
    probes = {c["node"]: c["answered"] for c in calls if c.get("role") == "probe"}
    assert probes == {"n0": True, "n1": False}
    for role, port in (("group0", "29600"), ("group1", "29601")):
        first, again = starts(calls, role)
        assert option(first, "--cpus-per-task") == "16" and option(first, "--master-port") == port
        assert "--resume" not in first["args"] and "--resume" in again["args"]
        assert option(again, "--lighthouse") == "127.0.1.0:29510"
    assert [c["event"] for c in calls if c.get("role") == "lighthouse"] == ["start", "serve", "terminated"]
    assert not [c for c in calls if c.get("tool") == "scancel"]
    assert "job complete" in out


def test_a_group_that_gives_up_cancels_the_job(tmp_path):
    """Group 1 crashes on every start (GROUP_RETRIES=1: two starts): the recipe gives up, cancels the job
    (scancel JOBID) and stops group 0, which would otherwise wait at the launch barrier, and the
    lighthouse; exit 1, within seconds."""
    scenario = dict(nodes=["n0", "n1"], steps=10, lighthouse=[{"do": "serve"}], group0=[{"do": "serve"}],
                    group1=[{"do": "crash", "after": ["group0:1"]}, {"do": "crash"}])
    code, out, calls = run_recipe(tmp_path, scenario, GROUP_RETRIES="1")
    assert code == 1, out
    cancelled = seconds_between(calls, ("group1", "crash"), dict(tool="scancel"))  # from the first crash
    print(f"give-up: the job cancelled {cancelled:.2f} s after group 1's first crash (two starts)")
    assert cancelled < 15
    assert [c["args"] for c in calls if c.get("tool") == "scancel"] == [[JOB_ID]]
    assert [c["node"] for c in starts(calls, "group1")] == ["n1", "n1"]
    for role in ("group0", "lighthouse"):
        assert [c["event"] for c in calls if c.get("role") == role][-1] == "terminated", role
    assert "group 1 ended 2 times before the job's last step" in out and f"cancelling job {JOB_ID}" in out


def test_the_lighthouse_is_restarted_in_place_and_moved_off_a_lost_node(tmp_path):
    """The lighthouse crashes: it is started again on its node, at its address, from its state directory,
    and the groups are left alone. Then its node n0 is lost: it is started on the first node that
    answers (n1) with a fresh state directory, and every group is stopped and started again with
    --resume and the new address; group 0, whose node n0 is gone too, on the spare n2. Exit 0."""
    scenario = dict(nodes=["n0", "n1", "n2"], steps=10,
                    lighthouse=[{"do": "crash", "after": ["group0:1", "group1:1"]}, {"do": "lost"}, {"do": "serve"}],
                    group0=[{"do": "serve"}, {"do": "finish", "after": ["group1:2"]}],
                    group1=[{"do": "serve"}, {"do": "finish", "after": ["group0:2"]}])
    code, out, calls = run_recipe(tmp_path, scenario)
    assert code == 0, out
    lighthouse = starts(calls, "lighthouse")
    assert [c["node"] for c in lighthouse] == ["n0", "n0", "n1"]
    in_place = seconds_between(calls, ("lighthouse", "crash"), dict(role="lighthouse", event="start"))
    moved = seconds_between(calls, ("lighthouse", "lost"), dict(role="lighthouse", event="start"))
    regrouped = max(seconds_between(calls, ("lighthouse", "lost"), dict(role=role, event="start"))
                    for role in ("group0", "group1"))
    print(f"lighthouse: restarted in place {in_place:.2f} s after its srun returned; off a lost node {moved:.2f} s "
          f"after, every group restarted within {regrouped:.2f} s")
    assert max(in_place, moved, regrouped) < 15
    assert [option(c, "--bind") for c in lighthouse] == ["127.0.1.0:29510"] * 2 + ["127.0.1.1:29510"]
    state = [option(c, "--state-dir") for c in lighthouse]
    assert state[0] == state[1] == f"{tmp_path}/run/lighthouse/job{JOB_ID}-0" != state[2]
    assert state[2] == f"{tmp_path}/run/lighthouse/job{JOB_ID}-1"
    for role, nodes in (("group0", ["n0", "n2"]), ("group1", ["n1", "n1"])):
        first, again = starts(calls, role)
        assert [first["node"], again["node"]] == nodes
        assert option(first, "--lighthouse") == "127.0.1.0:29510" and option(again, "--lighthouse") == "127.0.1.1:29510"
        assert "--resume" in again["args"]
        assert [c["event"] for c in calls if c.get("role") == role][:3] == ["start", "serve", "terminated"]
    lost = next(c["time"] for c in calls if c.get("role") == "lighthouse" and c.get("event") == "lost")
    assert all(c["time"] > lost for c in calls if c.get("event") == "terminated" and c["role"] != "lighthouse"), \
        "the groups were left alone while the lighthouse came back at its address"
    assert not [c for c in calls if c.get("tool") == "scancel"]


def test_too_few_nodes_is_refused(tmp_path):
    code, out, calls = run_recipe(tmp_path, dict(nodes=["n0"], steps=10))
    assert code == 2 and "need at least 2 nodes, got 1" in out and not starts(calls, "lighthouse")
