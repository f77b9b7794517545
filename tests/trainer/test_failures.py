"""Failure schedules (the paper's scenarios, files) and injection specs: pure, plus one real SIGKILL."""

import json
import subprocess
import sys

import pytest

from mecefo.failures import (PAPER_REPLICAS, SCENARIOS, FailureWindow, Injection, Injector, Schedule, fired_injections,
                             load_schedule, parse_injection, read_schedule_file, scenario_schedule)


def test_scenarios_are_seeded_and_scaled_to_steps():
    a = scenario_schedule("high", replicas=8, steps=500, hours=48, seed=1)
    b = scenario_schedule("high", replicas=8, steps=500, hours=48, seed=1)
    c = scenario_schedule("high", replicas=8, steps=500, hours=48, seed=2)
    assert a.windows == b.windows and a.windows != c.windows
    assert a.windows and all(0 <= w.start < w.end <= 500 and 0 <= w.replica < 8 for w in a.windows)
    # duration 2 h of a 48 h run over 500 steps: windows last ~21 steps (cut only at the end of the run)
    assert {w.end - w.start for w in a.windows if w.end < 500} <= {20, 21, 22}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenarios_keep_the_papers_failed_fraction(name):
    """Per replica: up ~ Exp(32 * interval), down = duration; long-run failed fraction D / (32 I + D)."""
    sc = SCENARIOS[name]
    schedule = scenario_schedule(name, replicas=PAPER_REPLICAS, steps=20000, hours=5000, seed=0)
    expected = sc.duration_h / (PAPER_REPLICAS * sc.interval_h + sc.duration_h)
    assert schedule.failed_fraction(20000) == pytest.approx(expected, rel=0.1)


def test_more_failures_in_higher_scenarios():
    fractions = [scenario_schedule(n, replicas=4, steps=2000, hours=2000, seed=0).failed_fraction(2000)
                 for n in ("low", "mid", "high")]
    assert fractions == sorted(fractions) and fractions[0] > 0


def test_a_schedule_never_takes_every_replica_out():
    schedule = scenario_schedule("high", replicas=2, steps=3000, hours=20000, seed=0)
    assert schedule.windows
    assert all(len(schedule.failed_at(s)) < 2 for s in range(3000))


def test_schedule_file(tmp_path):
    path = tmp_path / "failures.txt"
    path.write_text("# replica start end\n2 5 9\n0 7 20  # runs past the end\n\n")
    schedule = read_schedule_file(path, replicas=4, steps=12)
    assert schedule.failed_at(4) == frozenset()
    assert schedule.failed_at(7) == {0, 2}
    assert schedule.failed_at(11) == {0}
    assert schedule.failure_starts() == [5, 7]
    assert load_schedule(f"schedule:{path}", replicas=4, steps=12, hours=1, seed=0).windows == schedule.windows
    assert load_schedule(None, replicas=4, steps=12, hours=1, seed=0).windows == []


def test_the_members_of_a_quorum_are_never_all_scheduled_failed(tmp_path):
    """Issue 20: the schedule keeps replica 2 up, but replica 2 is really dead (not a quorum member) while
    0 and 1 are scheduled-failed: the member whose window ends first (1, at step 8) runs the step instead of
    every replica failing to plan one. Members the schedule leaves up, and non-members, are unaffected."""
    path = tmp_path / "failures.txt"
    path.write_text("0 5 9\n1 5 8\n0 12 14\n1 12 14\n")
    schedule = read_schedule_file(path, replicas=3, steps=20)
    assert schedule.failed_among(6, [0, 1, 2]) == {0, 1}, "replica 2 is up: the schedule as written"
    assert schedule.failed_among(6, [0, 1]) == {0}, "1's window ends first: 1 runs"
    assert schedule.failed_among(8, [0, 1]) == {0}, "1's window is over"
    assert schedule.failed_among(12, [0, 1]) == {1}, "windows end together: the lowest member runs"
    assert schedule.failed_among(6, [1]) == frozenset() and schedule.failed_among(6, [0, 2]) == {0}
    assert schedule.failed_among(4, [0, 1]) == frozenset() and schedule.failed_among(6, []) == frozenset()
    overlapping = Schedule([*schedule.windows, FailureWindow(1, 4, 10)], replicas=3)  # 1 is down until 10
    assert overlapping.failed_among(6, [0, 1]) == {1}


@pytest.mark.parametrize("text,message", [
    ("1 2", r"failures.txt:1: expected 'REPLICA START END'"),
    ("4 0 3", r"failures.txt:1: replica 4 is not in \[0, 4\)"),
    ("1 5 5", r"need 0 <= START < END"),
    ("0 0 2\n1 0 2\n2 0 2\n3 1 2", "every replica is failed at step 1"),
])
def test_schedule_file_errors(tmp_path, text, message):
    path = tmp_path / "failures.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_schedule_file(path, replicas=4, steps=10)


def test_schedule_spec_errors():
    with pytest.raises(ValueError, match="schedule:low|mid|high|FILE"):
        load_schedule("high", replicas=4, steps=10, hours=1, seed=0)
    with pytest.raises(FileNotFoundError, match="neither low, mid, high nor an existing file"):
        load_schedule("schedule:extreme", replicas=4, steps=10, hours=1, seed=0)


def test_parse_injection():
    assert parse_injection("kill@12:2", 4) == Injection("kill", 12, 2, "step", 0.0)
    assert parse_injection("kill@3:1:allreduce", 4) == Injection("kill", 3, 1, "allreduce", 0.0)
    assert parse_injection("kill@3:*:send", 4) == Injection("kill", 3, None, "send", 0.0)
    assert parse_injection("hang@8:0:quorum=2.5", 4) == Injection("hang", 8, 0, "quorum", 2.5)
    assert parse_injection("hang@8:0=6", 4).key == "hang-8-0-step"


@pytest.mark.parametrize("spec,message", [
    ("kill@x:1", "expected kill@STEP:REPLICA"),
    ("kill@1:9", r"replica 9 is not in \[0, 4\)"),
    ("kill@1:*", "only allowed with phase send"),
    ("hang@1:1", "a hang needs a duration"),
    ("kill@1:1=3", "a kill takes no duration"),
    ("kill@1:1:backward", "expected kill@STEP:REPLICA"),
])
def test_parse_injection_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_injection(spec, 4)


def test_injector_arms_only_its_own_injections(tmp_path):
    injections = [parse_injection(s, 4) for s in ("kill@5:1", "kill@5:2:allreduce", "kill@0:*:send")]
    injector = Injector(injections, 1, tmp_path)
    assert [i.key for i in injector.mine] == ["kill-5-1-step", "kill-0-any-send"]
    assert not injector.armed("step", 4) and injector.armed("step", 5) and injector.armed("step", 9)
    assert not injector.armed("allreduce", 5)
    injector.fire("allreduce", 5)  # nothing of replica 1's: returns


KILL_SCRIPT = """
import sys
from mecefo.failures import Injector, parse_injection
Injector([parse_injection("kill@3:1", 4)], 1, sys.argv[1]).fire("step", int(sys.argv[2]))
print("survived")
"""


def test_a_kill_is_a_real_sigkill_and_fires_once(tmp_path):
    def run(step):
        return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(step)], capture_output=True,
                              text=True, timeout=60)

    assert run(2).stdout.strip() == "survived"  # before its step
    first = run(4)  # first chance at or after step 3
    assert first.returncode == -9 and first.stdout == ""
    assert run(4).stdout.strip() == "survived"  # already fired in this run directory
    fired = fired_injections(tmp_path)
    assert len(fired) == 1 and fired[0]["action"] == "kill" and fired[0]["replica"] == 1 and fired[0]["step"] == 4
    assert json.loads((tmp_path / "injections" / "kill-3-1-step").read_text())["phase"] == "step"
