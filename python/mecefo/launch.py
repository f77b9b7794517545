"""The launcher: lighthouse + one process per replica + a supervisor; ``mecefo-train`` and ``mecefo-demo``.

:func:`launch` is the whole job as a Python call (the benchmarks drive it): it prepares the run
directory and the corpus, starts a torchft lighthouse on 127.0.0.1, starts every replica as its
own process (``python -m mecefo.replica``, its own process group, output in
``RUN_DIR/logs/replica_<i>.log``) behind a launch barrier so the first quorum holds them all,
and then supervises:

* a replica that dies (SIGKILL, crash) is restarted ``restart_after`` steps later with
  ``--rejoin``: it heals from a live peer through torchft and the job never stops;
* a replica hung by an injection is sent SIGCONT when its hang is over;
* policy ``restart``, or every replica dead: the whole job is killed and relaunched from the
  newest valid checkpoint (checkpoint-restart, the baseline the paper compares against);
* the run is aborted (all process groups killed) past ``max_wall_s`` or ``max_restarts``.

At the end it writes ``summary.json`` and ``plot.png`` and returns a :class:`RunResult`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import TrainConfig, add_train_arguments, config_from_args
from .data import prepare_corpus
from .failures import injections_dir, load_schedule, parse_injection
from .report import EVENTS_FILE, METRICS_DIR, MetricsWriter, format_summary, plot, summarize
from .replica import CORPUS_FILE, RESTART_EXIT_CODE, RESTART_REQUEST_FILE

POLL_S = 0.05


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    summary_text: str
    plot: Path
    metrics_dir: Path
    returncode: int


class RunAborted(RuntimeError):
    """The supervisor gave up on a run (time limit, too many restarts); the message has the log tails."""


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class _MetricsTail:
    """Follows the replicas' metrics files for the progress bar and restart decisions."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / METRICS_DIR
        self.offsets: dict[Path, int] = {}
        self.done = 0  # committed steps (max over replicas)
        self.last: dict | None = None

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
                if "event" not in r and r["step"] + 1 >= self.done:
                    self.done = r["step"] + 1
                    self.last = r


class Supervisor:
    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        from .quorum import LoopbackStore, start_lighthouse

        self.cfg = cfg
        self.run_dir = cfg.run_path
        self.progress = progress
        self.events = MetricsWriter(self.run_dir / EVENTS_FILE)
        self.lighthouse, self.lighthouse_addr = start_lighthouse(
            min_replicas=cfg.min_replicas, heartbeat_timeout_s=cfg.heartbeat_timeout_s)
        self.barrier = LoopbackStore()
        self.procs: dict[int, subprocess.Popen] = {}
        self.finished: set[int] = set()
        self.dead: dict[int, int] = {}  # replica -> committed steps when it died
        self.restarts = {r: 0 for r in range(cfg.replicas)}
        self.generation = 0
        self.job_restarts = 0
        self.restart_consumed = -1
        self.tail = _MetricsTail(self.run_dir)
        schedule = load_schedule(cfg.failures, replicas=cfg.replicas, steps=cfg.steps,
                                 hours=cfg.schedule_hours, seed=cfg.seed)
        self.max_job_restarts = cfg.max_restarts + (len(schedule.failure_starts()) if cfg.resolved_policy.restart else 0)

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
        with open(log_dir / f"replica_{replica}.log", "a") as log:
            log.write(f"==== spawn generation {self.generation} rejoin={rejoin} resume={resume} at {time.time():.3f}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[replica] = proc
        self.dead.pop(replica, None)
        self.events.write(event="spawn", replica=replica, pid=proc.pid, generation=self.generation, rejoin=rejoin,
                          resume=resume)

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
            elif code == RESTART_EXIT_CODE or self.cfg.resolved_policy.restart:
                self._restart_job(f"replica {replica} exited with {code}")
                return
            else:
                self.dead[replica] = self.tail.done
                self.restarts[replica] += 1
                if self.restarts[replica] > self.cfg.max_restarts:
                    raise RunAborted(f"replica {replica} died {self.restarts[replica]} times (exit {code}); last log "
                                     f"lines:\n{_log_tail(self.run_dir / 'logs' / f'replica_{replica}.log')}")

    def _wake_hung(self) -> None:
        directory = injections_dir(self.run_dir)
        if not directory.is_dir():
            return
        for request in directory.glob("wake-*.json"):
            wake = json.loads(request.read_text())
            if time.time() >= wake["resume_at"]:
                try:
                    os.kill(wake["pid"], signal.SIGCONT)
                except ProcessLookupError:
                    pass
                request.rename(request.with_suffix(".done"))
                self.events.write(event="sigcont", pid=wake["pid"])

    def _rejoin_dead(self) -> None:
        if self.finished:  # the job is over; nobody rejoins a finished run
            return
        if not self.procs and self.dead:  # everyone is gone: only a checkpoint can continue the job
            self._restart_job("every replica is dead")
            return
        after = self.cfg.restart_after
        for replica, died_at in list(self.dead.items()):
            if after is not None and self.tail.done >= died_at + after:
                self._spawn(replica, rejoin=True, resume=False)

    def run(self) -> int:
        from tqdm import tqdm

        cfg = self.cfg
        deadline = time.monotonic() + cfg.max_wall_s
        bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, disable=not self.progress, mininterval=0.5,
                   desc=f"{cfg.resolved_policy.name} x{cfg.replicas}")
        try:
            self._launch_all(resume=cfg.resume)
            while self.procs or (self.dead and not self.finished):
                time.sleep(POLL_S)
                self.tail.poll()
                self._check_exits()
                self._wake_hung()
                self._rejoin_dead()
                if self.tail.done > bar.n:
                    last = self.tail.last
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                    live=f"{len(last['live'])}/{cfg.replicas}", refresh=False)
                    bar.update(self.tail.done - bar.n)
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- replica {r}\n{_log_tail(self.run_dir / 'logs' / f'replica_{r}.log')}"
                                      for r in range(cfg.replicas))
                    raise RunAborted(f"run exceeded max_wall_s={cfg.max_wall_s} s at {self.tail.done} committed "
                                     f"steps; last log lines:\n{tails}")
            self.tail.poll()
            bar.update(max(0, self.tail.done - bar.n))
            return 0 if self.finished else 1
        finally:
            bar.close()
            self._kill_all()
            self.lighthouse.shutdown()
            self.events.close()


def prepare_run_dir(cfg: TrainConfig) -> None:
    run_dir = cfg.run_path
    if (run_dir / METRICS_DIR).is_dir() and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another "
                              "--run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    for spec in cfg.inject:  # fail now, not in every replica
        parse_injection(spec, cfg.replicas)
    load_schedule(cfg.failures, replicas=cfg.replicas, steps=cfg.steps, hours=cfg.schedule_hours, seed=cfg.seed)
    cfg.save(run_dir / "config.json")
    corpus = prepare_corpus(cfg.data, cache_dir=cfg.cache_dir, val_percent=cfg.val_percent, data_dtype=cfg.data_dtype)
    (run_dir / CORPUS_FILE).write_text(json.dumps(corpus.as_dict(), indent=2) + "\n")


def launch(cfg: TrainConfig, *, progress: bool = False) -> RunResult:
    """Run the whole job (lighthouse, replicas, supervisor) and report on it."""
    prepare_run_dir(cfg)
    returncode = Supervisor(cfg, progress=progress).run()
    summary = summarize(cfg.run_path)
    (cfg.run_path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary)
    (cfg.run_path / "summary.txt").write_text(text + "\n")
    png = plot(cfg.run_path)
    return RunResult(cfg.run_path, summary, text, png, cfg.run_path / METRICS_DIR, returncode)


def _print_result(result: RunResult, started: float) -> None:
    print(result.summary_text)
    print(f"wall time     {time.time() - started:.1f} s")
    print(f"plot          {result.plot}")
    print(f"metrics       {result.metrics_dir}/replica_*.jsonl  (one JSON object per step)")
    print(f"summary       {result.run_dir / 'summary.json'}")
    print(f"checkpoints   {result.run_dir / 'checkpoints'}")
    print(f"replica logs  {result.run_dir / 'logs'}")


def _timestamped(prefix: str) -> str:
    return str(Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mecefo-train", description="Fault-tolerant data-parallel LLaMA training "
                                     "(Neighbor-Do-Both with MeCeFO) on torchft, CPU or GPU.")
    add_train_arguments(parser, TrainConfig(run_dir=""))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.run_dir:
        cfg = replace(cfg, run_dir=_timestamped(cfg.resolved_policy.name))
    return _run_and_print(cfg, progress=not args.no_progress)


def _run_and_print(cfg: TrainConfig, progress: bool) -> int:
    started = time.time()
    try:
        result = launch(cfg, progress=progress)
    except RunAborted as e:
        print(f"run aborted: {e}", file=sys.stderr)
        return 1
    _print_result(result, started)
    return result.returncode


DEMO = TrainConfig(run_dir="", preset="tiny", replicas=4, steps=300, seq_len=128, micro_batch=4, lr=3e-3, warmup=20,
                   policy="mecefo", inject=["kill@100:2"], restart_after=80, checkpoint_every=50, eval_every=50)


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mecefo-demo", description="MeCeFO demo: a lighthouse and 4 CPU replicas train a tiny LLaMA on the "
        "Python standard library's sources; replica 2 is SIGKILLed at step 100 and restarted 80 steps later, "
        "while its neighbour covers its shard.")
    add_train_arguments(parser, DEMO)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.run_dir:
        cfg = replace(cfg, run_dir=_timestamped("demo"))
    print(f"mecefo-demo: {cfg.replicas} replicas, preset {cfg.preset}, policy {cfg.resolved_policy.name}, {cfg.steps} steps, "
          f"injected: {', '.join(cfg.inject) or 'nothing'}; output in {cfg.run_dir}", flush=True)
    return _run_and_print(cfg, progress=not args.no_progress)
