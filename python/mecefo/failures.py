"""Failure sources: the paper's scenarios as seeded step schedules, files, and real injections.

Schedules (``--failures schedule:low|mid|high|FILE``): a list of windows ``[start, end)`` in
steps during which a replica is failed. The replica process stays up but sits out (runs no
shard, contributes a zero gradient, still applies the update so it needs no recovery), and the
policy decides what happens to its shard. Fast and reproducible; no process dies.

The paper's scenarios are stated for a 32-GPU job: a failure every 2 h / 1 h / 0.5 h lasting
4 h / 3 h / 2 h (low / mid / high). We read that as 32 data-parallel replicas, each failing on
its own with mean time between failures ``32 * interval`` and staying down for ``duration``
(an alternating renewal process, exponential up-times, seeded), which keeps the paper's
fraction of failed replicas for any replica count. The run's ``steps`` span ``schedule_hours``
hours of that clock. A window that would leave no replica live is skipped. The replica a schedule
keeps up may be really down: a step whose quorum members are all scheduled-failed keeps one of
them up (:meth:`Schedule.failed_among`).

Injections (``--inject``) are real failures of a replica process, fired once per run:

* ``kill@STEP:REPLICA[:PHASE]``: the replica SIGKILLs itself at the first PHASE at or after STEP;
* ``hang@STEP:REPLICA[:PHASE]=SECONDS``: it SIGSTOPs itself; the supervisor SIGCONTs it after
  SECONDS (the replica's heartbeats stop meanwhile, so the others drop it, then it heals).

Phases: ``step`` (after the quorum, before the forward pass), ``quorum`` (right after the
lighthouse returned a new quorum that includes it, before the process group is rebuilt: the
others block rebuilding a group with a dead member until the timeout),
``allreduce`` (after its gradient all-reduce was posted, before it completes), ``send`` (while
it is sending its state to a rejoining replica, after the first tensors went out; REPLICA may be
``*``: whichever replica is the sender). "Once per run" is a marker file created with O_EXCL in
``RUN_DIR/injections``, so a replayed step or a restarted replica never fires it twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAPER_REPLICAS = 32


@dataclass(frozen=True)
class Scenario:
    interval_h: float  # mean time between failures in the whole 32-replica job
    duration_h: float


SCENARIOS = {"low": Scenario(2.0, 4.0), "mid": Scenario(1.0, 3.0), "high": Scenario(0.5, 2.0)}


@dataclass(frozen=True)
class FailureWindow:
    replica: int
    start: int  # first failed step
    end: int  # first step live again (exclusive)


class Schedule:
    """Failure windows and queries on them."""

    def __init__(self, windows: list[FailureWindow], replicas: int, name: str = "none"):
        self.windows = sorted(windows, key=lambda w: (w.start, w.replica))
        self.replicas = replicas
        self.name = name

    def failed_at(self, step: int) -> frozenset[int]:
        return frozenset(w.replica for w in self.windows if w.start <= step < w.end)

    def failed_among(self, step: int, members) -> frozenset[int]:
        """The quorum ``members`` the schedule takes out at ``step``: never all of them.

        A schedule keeps some replica up at every step, but that replica may be really down (killed,
        its host lost: the schedule knows nothing of it), leaving every member of the quorum
        scheduled-failed. Then the member whose failure window ends first (the lowest on ties) runs
        the step, its window cut short for it: the job trains with the members that are up rather
        than with none. A pure function of ``(step, members)``: every member decides the same.
        """
        members = frozenset(members)
        failed = self.failed_at(step) & members
        if failed and failed == members:
            ends: dict[int, int] = {}
            for w in self.windows:
                if w.replica in failed and w.start <= step < w.end:
                    ends[w.replica] = max(ends.get(w.replica, 0), w.end)
            failed -= {min(failed, key=lambda r: (ends[r], r))}
        return failed

    def failure_starts(self) -> list[int]:
        return sorted({w.start for w in self.windows})

    def failed_fraction(self, steps: int) -> float:
        """Mean fraction of replicas failed per step over ``steps`` steps."""
        down = np.zeros((self.replicas, steps), dtype=bool)
        for w in self.windows:
            down[w.replica, w.start:w.end] = True
        return float(down.mean())

    def as_list(self) -> list[dict]:
        return [w.__dict__ for w in self.windows]


def _keep_one_live(windows: list[FailureWindow], replicas: int, steps: int) -> list[FailureWindow]:
    """Drop every window that would leave no replica live at some step (earlier windows win)."""
    down = np.zeros(steps, dtype=np.int64)
    kept: list[FailureWindow] = []
    for w in sorted(windows, key=lambda w: (w.start, w.replica)):
        if (down[w.start:w.end] + 1 < replicas).all():
            down[w.start:w.end] += 1
            kept.append(w)
    return kept


def scenario_schedule(name: str, *, replicas: int, steps: int, hours: float, seed: int) -> Schedule:
    """The paper's ``low``/``mid``/``high`` scenario for ``replicas`` replicas over ``steps`` steps."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown failure scenario {name!r}; choose low, mid, high or a schedule file")
    sc = SCENARIOS[name]
    return renewal_schedule(sc.interval_h * PAPER_REPLICAS, sc.duration_h, replicas=replicas, steps=steps,
                            hours=hours, seed=seed, name=name)


def renewal_schedule(mean_up_h: float, down_h: float, *, replicas: int, steps: int, hours: float, seed: int,
                     name: str = "renewal") -> Schedule:
    """Each replica alternates exponential up-times of mean ``mean_up_h`` (a node's MTBF) and ``down_h`` down
    (its repair), seeded; ``steps`` span ``hours``."""
    rng = np.random.default_rng(np.random.SeedSequence((seed, 0x5CED, replicas, steps)))
    windows = []
    for replica in range(replicas):
        t = 0.0
        while True:
            t += rng.exponential(mean_up_h)
            if t >= hours:
                break
            start = int(t / hours * steps)
            end = min(steps, int((t + down_h) / hours * steps))
            if end > start:
                windows.append(FailureWindow(replica, start, end))
            t += down_h
    return Schedule(_keep_one_live(windows, replicas, steps), replicas, name)


def read_schedule_file(path: str | Path, *, replicas: int, steps: int) -> Schedule:
    """Lines ``REPLICA START END`` (steps, END exclusive); ``#`` starts a comment."""
    windows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            replica, start, end = (int(v) for v in text.split())
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected 'REPLICA START END' (integers), got {line!r}") from None
        if not 0 <= replica < replicas:
            raise ValueError(f"{path}:{lineno}: replica {replica} is not in [0, {replicas})")
        if not 0 <= start < end:
            raise ValueError(f"{path}:{lineno}: need 0 <= START < END, got {start} {end}")
        windows.append(FailureWindow(replica, start, min(end, steps)))
    schedule = Schedule(windows, replicas, str(path))
    for s in range(steps):
        if len(schedule.failed_at(s)) >= replicas:
            raise ValueError(f"{path}: every replica is failed at step {s}; nothing could run")
    return schedule


def load_schedule(spec: str | None, *, replicas: int, steps: int, hours: float, seed: int) -> Schedule:
    """``None`` (no scheduled failures) or ``schedule:low|mid|high|FILE``."""
    if spec is None:
        return Schedule([], replicas)
    if not spec.startswith("schedule:"):
        raise ValueError(f"failures must look like schedule:low|mid|high|FILE, got {spec!r}")
    what = spec.split(":", 1)[1]
    if what in SCENARIOS:
        return scenario_schedule(what, replicas=replicas, steps=steps, hours=hours, seed=seed)
    if not Path(what).is_file():
        raise FileNotFoundError(f"failure schedule {what!r} is neither low, mid, high nor an existing file")
    return read_schedule_file(what, replicas=replicas, steps=steps)


PHASES = ("step", "quorum", "allreduce", "send")
_INJECTION = re.compile(r"^(kill|hang)@(\d+):(\d+|\*)(?::(step|quorum|allreduce|send))?(?:=(\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Injection:
    action: str  # kill | hang
    step: int
    replica: int | None  # None: any replica (phase send)
    phase: str = "step"
    seconds: float = 0.0  # hang duration

    @property
    def key(self) -> str:
        who = "any" if self.replica is None else str(self.replica)
        return f"{self.action}-{self.step}-{who}-{self.phase}"

    @property
    def trigger(self) -> str:
        """When it fires, in words (said when it did not)."""
        who = "any replica" if self.replica is None else f"replica {self.replica}"
        return {
            "step": f"it fires when {who} starts step {self.step} or a later one",
            "quorum": f"it fires only when a new quorum (a change of membership) that holds {who} forms at or "
                      f"after step {self.step}",
            "allreduce": f"it fires at {who}'s gradient all-reduce of step {self.step} or a later one",
            "send": f"it fires only while {who} sends its state to a rejoining replica at or after step {self.step}",
        }[self.phase]


def parse_injection(spec: str, replicas: int) -> Injection:
    m = _INJECTION.match(spec.strip())
    if not m:
        raise ValueError(f"--inject {spec!r}: expected kill@STEP:REPLICA[:PHASE] or hang@STEP:REPLICA[:PHASE]=SECONDS "
                         f"with PHASE in {', '.join(PHASES)}")
    action, step, who, phase, seconds = m.groups()
    replica = None if who == "*" else int(who)
    if replica is not None and not 0 <= replica < replicas:
        raise ValueError(f"--inject {spec!r}: replica {replica} is not in [0, {replicas})")
    if replica is None and phase != "send":
        raise ValueError(f"--inject {spec!r}: replica '*' is only allowed with phase send")
    if action == "hang" and seconds is None:
        raise ValueError(f"--inject {spec!r}: a hang needs a duration, e.g. hang@{step}:{who}=8")
    if action == "kill" and seconds is not None:
        raise ValueError(f"--inject {spec!r}: a kill takes no duration")
    return Injection(action, int(step), replica, phase or "step", float(seconds or 0.0))


def injections_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "injections"


class Injector:
    """Fires this replica's injections at the matching phase (once per run, across restarts)."""

    def __init__(self, injections: list[Injection], replica: int, run_dir: str | Path):
        self.mine = [i for i in injections if i.replica in (None, replica)]
        self.replica = replica
        self.dir = injections_dir(run_dir)

    def armed(self, phase: str, step: int) -> bool:
        return any(i.phase == phase and step >= i.step and not (self.dir / i.key).exists() for i in self.mine)

    def fire(self, phase: str, step: int) -> None:
        for inj in self.mine:
            if inj.phase != phase or step < inj.step or not self._claim(inj, step):
                continue
            if inj.action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                request = self.dir / f"wake-{inj.key}.json"
                request.write_text(json.dumps({"pid": os.getpid(), "resume_at": time.time() + inj.seconds}))
                os.kill(os.getpid(), signal.SIGSTOP)

    def _claim(self, inj: Injection, step: int) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.dir / inj.key, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        record = {"action": inj.action, "replica": self.replica, "step": step, "phase": inj.phase,
                  "time": time.time(), "pid": os.getpid()}
        os.write(fd, json.dumps(record).encode())
        os.close(fd)
        return True


def unfired_injections(specs: list[str], replicas: int, run_dir: str | Path) -> list[str]:
    """The ``--inject`` specs that never fired in ``run_dir``, each with when it would have."""
    directory = injections_dir(run_dir)
    out = []
    for spec in specs:
        injection = parse_injection(spec, replicas)
        if not (directory / injection.key).is_file():
            out.append(f"{spec} never fired: {injection.trigger}")
    return out


def fired_injections(run_dir: str | Path) -> list[dict]:
    """What fired in a run: one record per injection (replica, step, phase, wall time)."""
    out = []
    d = injections_dir(run_dir)
    if d.is_dir():
        for path in sorted(d.iterdir()):
            if path.name.startswith(("kill-", "hang-")):
                text = path.read_text()
                if text:
                    out.append(json.loads(text))
    return out
