"""The launcher: lighthouse + one process per replica + a supervisor; ``mecefo-train`` and ``mecefo-demo``.

:func:`launch` is the whole job as a Python call (the benchmarks drive it): it prepares the run
directory and the corpus, starts a torchft lighthouse on 127.0.0.1, starts every replica as its
own process (``python -m mecefo.replica``, its own process group, output in
``RUN_DIR/logs/replica_<i>.log``) behind a launch barrier so the first quorum holds them all,
and then supervises:

* a replica that dies (SIGKILL, crash), or is fenced while the job goes on (it was behind and
  could not heal: :mod:`mecefo.fencing`), is restarted ``restart_after`` steps later with
  ``--rejoin``: it heals from a live peer through torchft and the job never stops;
* a replica hung by an injection is sent SIGCONT when its hang is over;
* policy ``restart``, or every replica dead: the whole job is killed and relaunched from the
  newest valid checkpoint (checkpoint-restart, the baseline the paper compares against), under
  a new launch generation;
* the run is aborted (all process groups killed) past ``max_wall_s`` or ``max_restarts``;
* Ctrl-C (SIGINT) stops the run: every replica is killed and the steps done are summarised.

What the person at the terminal needs is printed as it happens (on stderr, above the progress
bar): the replicas' warnings (no checkpoint to resume from, a corrupt checkpoint and the
fallback, shards dropped, a replica fenced), relaunches and what they resumed from, and at the
end the injections that never fired and how the run ended.

Every end says what it is (:class:`RunEnd`): exit 0 only when every step is committed and the
final checkpoint and evaluation are written; 1 when the run was aborted or is incomplete (the
reason and the last committed step are printed); 130 on Ctrl-C; 2 for bad input, found before
any process starts (``prepare_run_dir``; on the command line a one-line ``PROG: error: ...``).
``summary.json`` is written for every run that started, with ``complete`` and ``end``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .checkpoint import checkpoint_path
from .command import EXIT_INTERRUPTED, OneLineErrors
from .config import ConfigError, TrainConfig, add_train_arguments, config_from_args
from .data import check_length, prepare_corpus
from .failures import injections_dir, load_schedule, parse_injection
from .fencing import FENCED_EXIT_CODE
from .report import EVENTS_FILE, METRICS_DIR, MetricsWriter, read_jsonl, write_report
from .models import check_model
from .sharded_checkpoint import check_resume_format
from .replica import (CHECKPOINT_DIR, CORPUS_FILE, FINAL_DIR, GAVE_UP_EXIT_CODE, MODEL_FILE, RESTART_EXIT_CODE,
                      RESTART_REQUEST_FILE)

POLL_S = 0.05
EXIT_INCOMPLETE = 1  # aborted, or ended without committing every step


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: its exit code, whether it did everything asked, and why not."""

    code: int
    complete: bool
    reason: str


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    summary_text: str
    plot: Path
    metrics_dir: Path
    returncode: int
    end: RunEnd


class RunAborted(RuntimeError):
    """The supervisor gave up on a run (time limit, too many restarts): the reason, and the replicas'
    last log lines in ``logs``."""

    def __init__(self, reason: str, logs: str = ""):
        super().__init__(reason)
        self.logs = logs


class GroupProcesses:
    """The ``G`` rank processes of one replica group (``--group-size``), supervised as one replica.

    They share a process group (rank 0 leads it), so ``os.killpg(pid)`` stops all of them, and the
    group's store, hosted here: a fresh one for every spawn (a restarted group must not read the keys
    of its previous incarnation). :meth:`poll` reports the group as a single process: running while
    every rank runs; once a rank exits with a non-zero code the others are stopped (one rank gone
    fails the whole group, as torchrun does) and that code is the group's; 0 when every rank exited 0.
    """

    def __init__(self, ranks: list[subprocess.Popen], store):
        self.ranks = ranks
        self.store = store  # kept alive as long as the group runs
        self.pid = ranks[0].pid

    def poll(self) -> int | None:
        codes = [proc.poll() for proc in self.ranks]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            self._stop()
            return failed[0]
        return None if None in codes else 0

    def _stop(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in self.ranks:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        for proc in self.ranks:
            proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.poll()


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class _MetricsTail:
    """Follows the replicas' metrics files (what this launch writes) for the progress bar, restart
    decisions, the console and the run's end."""

    def __init__(self, run_dir: Path, steps: int):
        self.dir = run_dir / METRICS_DIR
        self.steps = steps
        # a resumed run's files hold the earlier launches' records: follow from their current ends
        self.offsets: dict[Path, int] = ({p: p.stat().st_size for p in self.dir.glob("replica_*.jsonl")}
                                         if self.dir.is_dir() else {})
        self.done = 0  # committed steps (max over replicas)
        self.last: dict | None = None
        self.news: list[dict] = []  # warning and resumed events not yet printed
        self.holding: list[tuple[int, float]] = []  # (replica, time): it healed or committed a step
        self.final_checkpoint = False  # the checkpoint of the last step was written
        self.final_eval = False  # the evaluation after the last step was recorded
        self.gave_up: dict[int, str] = {}  # replica -> why it ended the run (--max-replays)

    def poll(self) -> None:
        if not self.dir.is_dir():
            return
        for path in self.dir.glob("replica_*.jsonl"):
            with open(path) as f:
                f.seek(self.offsets.get(path, 0))
                chunk = f.read()
            end = chunk.rfind("\n") + 1
            self.offsets[path] = self.offsets.get(path, 0) + len(chunk[:end].encode())
            for line in chunk[:end].splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                event = r.get("event")
                if event in (None, "healed"):
                    self.holding.append((r["replica"], r["time"]))
                if event is None and r["step"] + 1 >= self.done:
                    self.done = r["step"] + 1
                    self.last = r
                elif event in ("warning", "resumed"):
                    self.news.append(r)
                    if event == "resumed":  # steps before the checkpoint are committed (by an earlier launch)
                        self.done = max(self.done, r["step"])
                elif event == "checkpoint" and r["step"] == self.steps:
                    self.final_checkpoint = True
                elif event == "eval" and r["step"] == self.steps:
                    self.final_eval = True
                elif event == "gave_up":
                    self.gave_up[r["replica"]] = r["reason"]


class Supervisor:
    def __init__(self, cfg: TrainConfig, *, progress: bool = True, prog: str = "mecefo"):
        from .jobstore import READY_KEY
        from .quorum import LoopbackStore, start_lighthouse

        self.cfg = cfg
        self.run_dir = cfg.run_path
        self.progress = progress
        self.prog = prog
        self.bar = None
        # a resumed run continues the generation count, so records of every launch stay apart
        previous = read_jsonl(self.run_dir / EVENTS_FILE) if cfg.resume else []
        self.generation = max((e["generation"] + 1 for e in previous if "generation" in e), default=0)
        self.events = MetricsWriter(self.run_dir / EVENTS_FILE)
        self.events.write(event="launch", generation=self.generation, resume=cfg.resume)
        self.lighthouse, self.lighthouse_addr = start_lighthouse(
            min_replicas=cfg.min_replicas, heartbeat_timeout_s=cfg.heartbeat_timeout_s)
        self.barrier = LoopbackStore()  # the job's store: launch barrier and commit ledger (mecefo.fencing)
        self.barrier.store.set(READY_KEY, "1")
        self.procs: dict[int, subprocess.Popen] = {}
        self.finished: set[int] = set()
        self.dead: dict[int, int] = {}  # replica -> committed steps when it died
        self.rejoining: dict[int, float] = {}  # restarted replica -> spawn time, until it holds the job's state
        self.restarts = {r: 0 for r in range(cfg.replicas)}
        self.job_restarts = 0
        self.restart_consumed = -1
        self.tail = _MetricsTail(self.run_dir, cfg.steps)
        self.said: set[str] = set()  # console messages already printed (every replica warns alike)
        schedule = load_schedule(cfg.failures, replicas=cfg.replicas, steps=cfg.steps,
                                 hours=cfg.schedule_hours, seed=cfg.seed)
        self.max_job_restarts = cfg.max_restarts + (len(schedule.failure_starts()) if cfg.resolved_policy.restart else 0)

    # ---- console ----------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """One line for the person at the terminal (stderr, above the progress bar)."""
        line = f"{self.prog}: {message}"
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _say_news(self) -> None:
        for r in self.tail.news:
            if r["event"] == "warning":
                key, text = r["message"], f"warning: replica {r['replica']}: {r['message']}"
            else:
                key = f"resumed {r['path']}"
                text = f"resumed from {Path(r['path']).name} (step {r['step']})"
            if key not in self.said:
                self.said.add(key)
                self.say(text)
        self.tail.news.clear()

    # ---- processes --------------------------------------------------------------------------

    def _spawn(self, replica: int, *, rejoin: bool, resume: bool) -> None:
        log_dir = self.run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mecefo.replica", "--run-dir", str(self.run_dir), "--replica", str(replica),
               "--lighthouse", self.lighthouse_addr, "--barrier", self.barrier.address,
               "--generation", str(self.generation), "--restart-consumed", str(self.restart_consumed),
               "--supervisor-pid", str(os.getpid())]
        if rejoin:
            cmd.append("--rejoin")
        if resume:
            cmd.append("--resume")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(self.cfg.threads),
                   GLOO_SOCKET_IFNAME="lo", RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        env.pop("TORCHFT_LIGHTHOUSE", None)
        header = f"==== spawn generation {self.generation} rejoin={rejoin} resume={resume} at {time.time():.3f}\n"
        if self.cfg.group_size == 1:
            with open(log_dir / f"replica_{replica}.log", "a") as log:
                log.write(header)
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        else:
            proc = self._spawn_group(replica, cmd, env, header)
        self.procs[replica] = proc
        self.dead.pop(replica, None)
        if rejoin:
            self.rejoining[replica] = time.time()
        else:
            self.rejoining.pop(replica, None)
        self.events.write(event="spawn", replica=replica, pid=proc.pid, generation=self.generation, rejoin=rejoin,
                          resume=resume)

    def _spawn_group(self, replica: int, cmd: list[str], env: dict, header: str) -> GroupProcesses:
        """Replica ``replica`` as a group of --group-size rank processes (logs: replica_<i>.log for rank 0,
        replica_<i>_rank_<r>.log for the others)."""
        from .quorum import LoopbackStore

        store = LoopbackStore()
        ranks = []
        for rank in range(self.cfg.group_size):
            name = f"replica_{replica}.log" if rank == 0 else f"replica_{replica}_rank_{rank}.log"
            with open(self.run_dir / "logs" / name, "a") as log:
                log.write(header)
                log.flush()
                # one new process group, led by rank 0 (a process joins a group of its own session only, so
                # not start_new_session as a replica of one rank has; Popen's process_group= needs Python 3.11)
                pgid = ranks[0].pid if ranks else 0
                leader = {"preexec_fn": functools.partial(os.setpgid, 0, pgid)}
                ranks.append(subprocess.Popen([*cmd, "--group-store", store.address, "--group-rank", str(rank)],
                                              stdout=log, stderr=subprocess.STDOUT, env=env, **leader))
        return GroupProcesses(ranks, store)

    def _kill(self, replica: int) -> None:
        proc = self.procs.pop(replica, None)
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _kill_all(self) -> None:
        for replica in list(self.procs):
            self._kill(replica)

    def _launch_all(self, resume: bool) -> None:
        self.finished.clear()
        self.dead.clear()
        for replica in range(self.cfg.replicas):
            self._spawn(replica, rejoin=False, resume=resume)

    def _restart_job(self, reason: str) -> None:
        """Checkpoint-restart: every replica is killed and relaunched from the newest valid checkpoint."""
        self.job_restarts += 1
        if self.job_restarts > self.max_job_restarts:
            raise RunAborted(f"{self.job_restarts} job restarts, more than allowed ({self.max_job_restarts}); "
                             f"last reason: {reason}")
        self._kill_all()
        request = self.run_dir / RESTART_REQUEST_FILE
        if request.is_file():
            self.restart_consumed = max(self.restart_consumed, json.loads(request.read_text())["step"])
            request.unlink()
        self.events.write(event="job_restart", reason=reason, committed=self.tail.done, generation=self.generation + 1)
        self.generation += 1
        self._launch_all(resume=True)

    # ---- supervision ------------------------------------------------------------------------

    def _check_exits(self) -> None:
        for replica, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[replica]
            self.events.write(event="exit", replica=replica, code=code, committed=self.tail.done)
            if code == 0:
                self.finished.add(replica)
            elif code == FENCED_EXIT_CODE and self.finished:
                self.say(f"replica {replica} was fenced: it fell behind a job that has finished without it")
            elif code == GAVE_UP_EXIT_CODE:
                self.tail.poll()
                raise RunAborted(f"replica {replica}: {self.tail.gave_up.get(replica, 'it gave up (--max-replays)')}")
            elif code == RESTART_EXIT_CODE or self.cfg.resolved_policy.restart:
                self._restart_job(f"replica {replica} exited with {code}")
                return
            else:
                self.dead[replica] = self.tail.done
                self.restarts[replica] += 1
                if self.restarts[replica] > self.cfg.max_restarts:
                    raise RunAborted(f"replica {replica} died {self.restarts[replica]} times (exit {code}), more "
                                     f"than --max-restarts {self.cfg.max_restarts}",
                                     _log_tail(self.run_dir / "logs" / f"replica_{replica}.log"))

    def _wake_hung(self) -> None:
        """SIGCONT a replica hung by an injection when its hang is over, or at once when the job has
        finished (nothing waits for it any more; it wakes behind the job and is fenced)."""
        directory = injections_dir(self.run_dir)
        if not directory.is_dir():
            return
        for request in directory.glob("wake-*.json"):
            wake = json.loads(request.read_text())
            if time.time() >= wake["resume_at"] or self.finished:
                try:
                    os.kill(wake["pid"], signal.SIGCONT)
                except ProcessLookupError:
                    pass
                request.rename(request.with_suffix(".done"))
                self.events.write(event="sigcont", pid=wake["pid"], early=time.time() < wake["resume_at"])

    def _rejoin_dead(self) -> None:
        if self.finished:  # the job is over; nobody rejoins a finished run
            return
        for replica, at in self.tail.holding:  # a restarted replica that healed (or committed) holds the state
            if at >= self.rejoining.get(replica, float("inf")):
                del self.rejoining[replica]
        self.tail.holding.clear()
        # everyone holding the job's state is gone (restarted replicas still waiting to heal have nobody
        # to heal from): only a checkpoint can continue the job
        if self.dead and all(r in self.rejoining for r in self.procs):
            waiting = f" (replicas {sorted(self.procs)} had nobody left to heal from)" if self.procs else ""
            self.say(f"every replica is dead at {self.tail.done} committed steps{waiting}: relaunching the job "
                     "from the newest valid checkpoint")
            self._restart_job("every replica is dead")
            return
        after = self.cfg.restart_after
        for replica, died_at in list(self.dead.items()):
            if after is not None and self.tail.done >= died_at + after:
                self._spawn(replica, rejoin=True, resume=False)

    def _end(self) -> RunEnd:
        """How a run whose processes have all exited ended."""
        cfg = self.cfg
        missing = []
        if self.tail.done < cfg.steps:
            missing.append(f"{self.tail.done} of {cfg.steps} steps committed")
        if not self.tail.final_checkpoint and not checkpoint_path(self.run_dir / CHECKPOINT_DIR, cfg.steps).is_file():
            missing.append("no final checkpoint")
        if not self.tail.final_eval:
            missing.append("no final evaluation")
        if not (self.run_dir / FINAL_DIR).is_dir():
            missing.append(f"no final model ({FINAL_DIR}/)")
        if not self.finished:
            missing.append("no replica reached the end")
        if missing:
            return RunEnd(EXIT_INCOMPLETE, False, "the replicas exited early: " + ", ".join(missing))
        return RunEnd(0, True, f"all {cfg.steps} steps committed")

    def run(self) -> RunEnd:
        from tqdm import tqdm

        cfg = self.cfg
        deadline = time.monotonic() + cfg.max_wall_s
        self.bar = bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, disable=not self.progress,
                              mininterval=0.5, desc=f"{cfg.resolved_policy.name} x{cfg.replicas}")
        try:
            self._launch_all(resume=cfg.resume)
            while self.procs or (self.dead and not self.finished):
                time.sleep(POLL_S)
                self.tail.poll()
                self._say_news()
                self._check_exits()
                self._wake_hung()
                self._rejoin_dead()
                if self.tail.done > bar.n:
                    last = self.tail.last
                    if last is not None:  # None: only a resumed checkpoint's steps so far
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                        live=f"{len(last['live'])}/{cfg.replicas}", refresh=False)
                    bar.update(self.tail.done - bar.n)
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- replica {r}\n{_log_tail(self.run_dir / 'logs' / f'replica_{r}.log')}"
                                      for r in range(cfg.replicas))
                    raise RunAborted(f"the run took longer than --max-wall {cfg.max_wall_s:g} s", tails)
            self.tail.poll()
            self._say_news()
            bar.update(max(0, self.tail.done - bar.n))
            return self._end()
        except RunAborted as e:
            self.say(f"run aborted: {e}; the replicas' last log lines:\n{e.logs}" if e.logs else f"run aborted: {e}")
            return RunEnd(EXIT_INCOMPLETE, False, f"aborted: {e}")
        except KeyboardInterrupt:
            return RunEnd(EXIT_INTERRUPTED, False, "interrupted (Ctrl-C)")
        finally:
            with _sigint_ignored():  # a second Ctrl-C must not cut the clean-up short
                bar.close()
                self.bar = None
                self._kill_all()
                self.lighthouse.shutdown()
                self.events.write(event="end")
                self.events.close()


@contextlib.contextmanager
def _sigint_ignored():
    """Ctrl-C ignored inside (main thread only: elsewhere Python cannot change signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def prepare_run_dir(cfg: TrainConfig, *, progress: bool = False) -> None:
    """Check everything a run needs before any process starts, then write the run directory (``progress``:
    a progress bar while a corpus is tokenised).

    Bad input raises :class:`ConfigError` naming the option (``field``): injections, the failure
    schedule, the data (and that it holds a sequence of ``seq_len``), the model (a directory that is
    not one, an architecture the policy cannot run, a vocabulary smaller than the corpus's, a context
    shorter than ``seq_len``), ``--resume`` with nothing to resume, a run directory that cannot be one.
    """
    run_dir = cfg.run_path
    for spec in cfg.inject:  # fail now, not in every replica
        try:
            parse_injection(spec, cfg.replicas)
        except ValueError as e:
            raise ConfigError("inject", str(e)) from None
    try:
        load_schedule(cfg.failures, replicas=cfg.replicas, steps=cfg.steps, hours=cfg.schedule_hours, seed=cfg.seed)
    except (ValueError, OSError) as e:
        raise ConfigError("failures", str(e)) from None
    if cfg.resume and not run_dir.is_dir():
        raise ConfigError("resume", f"{run_dir} does not exist: nothing to resume (--run-dir names the run to "
                                    "continue)")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run_dir", f"{run_dir} exists and is not a directory")
    if cfg.resume:
        check_resume_format(run_dir / CHECKPOINT_DIR, cfg.shard)
    if (run_dir / METRICS_DIR).is_dir() and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another "
                              "--run-dir")
    try:
        corpus = prepare_corpus(cfg.data, cache_dir=cfg.cache_dir, val_percent=cfg.val_percent,
                                data_dtype=cfg.data_dtype, tokenizer=cfg.tokenizer, text_field=cfg.text_field,
                                workers=cfg.tokenize_workers, progress=progress)
        check_length(corpus, cfg.seq_len)
    except ConfigError:  # names its own option (--tokenizer, --text-field)
        raise
    except (ValueError, OSError, ImportError) as e:  # ImportError: a format's library is not installed
        raise ConfigError("data", str(e)) from None
    identity = check_model(cfg, corpus)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        (run_dir / CORPUS_FILE).write_text(json.dumps(corpus.as_dict(), indent=2) + "\n")
        (run_dir / MODEL_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    except OSError as e:
        raise ConfigError("run_dir", f"cannot write the run directory {run_dir}: {e.strerror or e}") from None


def launch(cfg: TrainConfig, *, progress: bool = False, prog: str = "mecefo") -> RunResult:
    """Run the whole job (lighthouse, replicas, supervisor) and report on it.

    Bad input raises (:func:`prepare_run_dir`) before anything starts. Once the run has started
    every end returns a result (``returncode``, ``end``) with ``summary.json`` written.
    """
    prepare_run_dir(cfg, progress=progress)
    return _report(cfg, Supervisor(cfg, progress=progress, prog=prog).run())


def _report(cfg: TrainConfig, end: RunEnd) -> RunResult:
    """summary.json, summary.txt and plot.png of a run that ended with ``end``."""
    with _sigint_ignored():  # the summary of an interrupted run is written whole
        summary, text, png = write_report(cfg.run_path, dict(complete=end.complete, end=end.reason,
                                                              exit_code=end.code))
    return RunResult(cfg.run_path, summary, text, png, cfg.run_path / METRICS_DIR, end.code, end)


def _print_result(result: RunResult, started: float, prog: str) -> None:
    print(result.summary_text)
    print(f"wall time     {time.time() - started:.1f} s")
    print(f"plot          {result.plot}")
    print(f"metrics       {result.metrics_dir}/replica_*.jsonl  (one JSON object per step)")
    print(f"summary       {result.run_dir / 'summary.json'}")
    print(f"checkpoints   {result.run_dir / 'checkpoints'}")
    if (result.run_dir / FINAL_DIR).is_dir():
        print(f"final model   {result.run_dir / FINAL_DIR}  (AutoModelForCausalLM.from_pretrained loads it)")
    print(f"replica logs  {result.run_dir / 'logs'}", flush=True)
    s = result.summary
    for line in s["injections_not_fired"]:
        print(f"{prog}: warning: injection {line}", file=sys.stderr)
    if not result.end.complete:
        last = f"last committed step {s['steps_done'] - 1}" if s["steps_done"] else "no step committed"
        print(f"{prog}: run incomplete ({result.end.reason}); {last}, {s['steps_done']} of {s['steps_planned']} "
              f"steps done; summary in {result.run_dir / 'summary.json'}", file=sys.stderr)


def _timestamped(prefix: str) -> str:
    return str(Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def train_main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(prog="mecefo-train", description="Fault-tolerant data-parallel LLaMA training "
                            "(Neighbor-Do-Both with MeCeFO) on torchft, CPU or GPU.")
    cfg, progress = _parse_config(parser, TrainConfig(run_dir=""), argv)
    if not cfg.run_dir:
        cfg = replace(cfg, run_dir=_timestamped(cfg.resolved_policy.name))
    return _run_and_print(parser, cfg, progress)


def _parse_config(parser: OneLineErrors, defaults: TrainConfig, argv: list[str] | None) -> tuple[TrainConfig, bool]:
    """(the validated config, whether to show a progress bar); a bad value exits 2 with one line."""
    add_train_arguments(parser, defaults)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.resume and not args.run_dir:
        parser.error("argument --resume: needs --run-dir naming the run to continue")
    try:
        return config_from_args(args), not args.no_progress
    except ValueError as e:
        parser.config_error(e)


def _run_and_print(parser: OneLineErrors, cfg: TrainConfig, progress: bool) -> int:
    started = time.time()
    try:
        try:
            prepare_run_dir(cfg, progress=progress)
        except (ValueError, OSError) as e:
            parser.config_error(e)
        supervisor = Supervisor(cfg, progress=progress, prog=parser.prog)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    result = _report(cfg, supervisor.run())
    _print_result(result, started, parser.prog)
    return result.returncode


DEMO = TrainConfig(run_dir="", model="tiny", replicas=4, steps=300, seq_len=128, micro_batch=4, lr=3e-3, warmup=20,
                   policy="mecefo", inject=["kill@100:2"], restart_after=80, checkpoint_every=50, eval_every=50)


def demo_main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(
        prog="mecefo-demo", description="MeCeFO demo: a lighthouse and 4 CPU replicas train a tiny LLaMA on the "
        "Python standard library's sources; replica 2 is SIGKILLed at step 100 and restarted 80 steps later, "
        "while its neighbour covers its shard.")
    cfg, progress = _parse_config(parser, DEMO, argv)
    if not cfg.run_dir:
        cfg = replace(cfg, run_dir=_timestamped("demo"))
    print(f"mecefo-demo: {cfg.replicas} replicas, model {cfg.model_name}, policy {cfg.resolved_policy.name}, {cfg.steps} steps, "
          f"injected: {', '.join(cfg.inject) or 'nothing'}; output in {cfg.run_dir}", flush=True)
    return _run_and_print(parser, cfg, progress)
