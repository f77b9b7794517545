"""bench/fidelity.py's training runs: the experiment's sizes (profiles), one run's configuration, and
training (or reusing) a run and reading what it did.

A run whose directory holds a finished run with the same configuration is reused, not retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from statistics import fmean, stdev

import mecefo_kernels.nn.decoder as kernel_defaults
from mecefo.config import TrainConfig
from mecefo.failures import load_schedule
from mecefo.launch import launch
from mecefo.report import read_metrics, step_series

SCHEDULES = ("low", "mid", "high")
SCHEDULE_HOURS = 24.0  # the paper's clock hours one run spans (the trainer's default)
DEFAULT_RANK = kernel_defaults.DEFAULT_RANK
DEFAULT_TAU = kernel_defaults.DEFAULT_REFRESH_EVERY


@dataclass(frozen=True)
class Profile:
    """One experiment's sizes. Probe steps and bases ages must be multiples of checkpoint_every."""

    name: str
    preset: str  # the model: a preset name or a local Hugging Face model directory (the trainer's --model)
    device: str
    replicas: int
    steps: int
    seq_len: int
    micro_batch: int
    lr: float
    warmup: int
    eval_every: int
    eval_batches: int
    checkpoint_every: int  # of the no-failure run: the weights the probe reads
    probe_every: int
    ranks: tuple[float, ...]  # probed and trained (1.0: full rank, only the attention skip remains)
    taus: tuple[int, ...]  # trained; probed as bases ages
    threads: int = 1  # torch threads per replica process
    tokenizer: str | None = None  # a local tokenizer directory (the trainer's --tokenizer; None: byte-level)
    data: tuple[str, ...] = ("stdlib",)  # the trainer's --data sources


# profile fields added after results JSONs were stored: a stored profile without them had these values
PROFILE_ADDED = {"tokenizer": None, "data": ["stdlib"]}


PROFILES = {
    # 8 replicas (one failure leaves |N| = 6 of 8 for attention; the paper has ~30 of 32): 8 processes
    # of one thread share the 2 cores. tiny (0.9M parameters) at 2 x 128 tokens per shard, 300 steps:
    # 80-160 s per run on 2 shared cores: quality (10 runs) ~16 min, sweep (7 more) ~16 min, probe ~15-20 min.
    "cpu": Profile("cpu", preset="tiny", device="cpu", replicas=8, steps=300, seq_len=128, micro_batch=2, lr=3e-3,
                   warmup=20, eval_every=25, eval_batches=64, checkpoint_every=10, probe_every=50,
                   ranks=(1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0), taus=(10, 50, 200)),
    # Not run yet (no GPU lent so far): LLaMA-60M shapes on one or more GPUs (replica i on GPU i mod
    # count), 8192 tokens per step. Checkpoints (~0.7 GB each with AdamW state) every 100 steps.
    "gpu": Profile("gpu", preset="llama-60m", device="cuda", replicas=4, steps=1000, seq_len=256, micro_batch=8,
                   lr=1e-3, warmup=100, eval_every=100, eval_batches=64, checkpoint_every=100, probe_every=250,
                   ranks=(1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0), taus=(100, 200, 500), threads=2),
}


def parse_variant(text: str) -> tuple[str, str]:
    """"spread-orphan:momentum" -> ("spread-orphan", "momentum"); "mecefo" -> ("mecefo", "weight")."""
    from mecefo.policy import BASES, check_policy

    policy, _, basis = text.partition(":")
    check_policy(policy)
    basis = basis or "weight"
    if basis not in BASES:
        raise ValueError(f"{text!r}: basis must be one of {', '.join(BASES)}")
    return policy, basis


def variant_arg(text: str) -> str:
    try:
        parse_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def run_name(variant: str) -> str:
    return variant.replace(":", "-")


def rank_label(rank: float) -> str:
    if rank == 1.0:
        return "full"
    f = Fraction(rank).limit_denominator(1024)
    return f"{f.numerator}/{f.denominator}"


def parse_rank(text: str) -> float:
    value = float(Fraction(text))
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"rank {text!r} must be a fraction of in_features in (0, 1]")
    return value


# ---- training runs ---------------------------------------------------------------------------------

def train_config(profile: Profile, run_dir: Path, *, cache_dir: str | None, failures: str | None = None,
                 policy: str = "mecefo", rank: float | None = None, tau: int | None = None,
                 checkpoint_every: int = 0, seed: int = 0, steps: int | None = None) -> TrainConfig:
    """``seed`` draws the initial weights, the data order and the failure schedule; ``policy`` may carry a
    basis (``spread-orphan:momentum``); ``steps`` overrides the profile's (the no-failure ladder)."""
    policy, basis = parse_variant(policy)
    steps = steps or profile.steps
    return TrainConfig(
        run_dir=str(run_dir), model=profile.preset, device=profile.device, seed=seed, seq_len=profile.seq_len,
        micro_batch=profile.micro_batch, replicas=profile.replicas, steps=steps, policy=policy, basis=basis,
        rank=rank, tau=tau, lr=profile.lr, warmup=profile.warmup, failures=failures, schedule_hours=SCHEDULE_HOURS,
        checkpoint_every=checkpoint_every, keep_checkpoints=steps // max(checkpoint_every, 1) + 1,
        eval_every=profile.eval_every, eval_batches=profile.eval_batches, hash_state=False,
        threads=profile.threads, cache_dir=cache_dir, data=list(profile.data), tokenizer=profile.tokenizer,
        # nobody dies here (scheduled failures sit out): generous timeouts, so that a replica starved of
        # CPU by its 7 siblings is never dropped from the quorum (which would be an unscheduled failure)
        heartbeat_timeout_s=30.0, timeout_s=120.0, max_wall_s=4 * 3600.0)


def schedule_spec(schedule: str) -> str | None:
    return None if schedule == "none" else f"schedule:{schedule}"


def schedule_label(schedule: str) -> str:
    """low / mid / high, or a schedule file's name."""
    return Path(schedule).name


def _finished(cfg: TrainConfig) -> bool:
    run_dir = cfg.run_path
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.json").is_file():
        return False
    return TrainConfig.load(run_dir / "config.json") == cfg


def train(cfg: TrainConfig, label: str) -> dict:
    """Run (or reuse) one training job; its validation curve, training loss and failure windows."""
    t0 = time.time()
    reused = _finished(cfg)
    if not reused:
        if cfg.run_path.exists():
            shutil.rmtree(cfg.run_path)
        result = launch(cfg)
        if result.returncode != 0:
            raise RuntimeError(f"{label}: training failed (exit {result.returncode}); see {cfg.run_dir}/logs")
    records = read_metrics(cfg.run_path)
    series = step_series(records)
    if [r["step"] for r in series] != list(range(cfg.steps)):
        raise RuntimeError(f"{label}: {cfg.run_dir} does not hold all {cfg.steps} committed steps")
    everyone = list(range(cfg.replicas))
    dropped = [r["step"] for r in series if sorted(r["members"]) != everyone]
    if dropped:
        raise RuntimeError(f"{label}: replicas left the quorum without a scheduled failure at steps {dropped[:10]} "
                           "(a starved process missed its heartbeats?); the comparison would not be like for like")
    evals = sorted((r for r in records if r.get("event") == "eval"), key=lambda r: r["step"])
    schedule = load_schedule(cfg.failures, replicas=cfg.replicas, steps=cfg.steps, hours=cfg.schedule_hours,
                             seed=cfg.seed)
    run = {
        "label": label, "run_dir": cfg.run_dir, "policy": cfg.policy, "basis": cfg.basis, "rank": cfg.rank,
        "tau": cfg.tau, **work_fractions(series, cfg),
        "val_loss": evals[-1]["val_loss"], "val_ppl": math.exp(evals[-1]["val_loss"]),
        "val_curve": [[e["step"], e["val_loss"]] for e in evals],
        "train_loss": [r["loss"] for r in series],
        "failure_windows": [[w.replica, w.start, w.end] for w in schedule.windows],
        "failed_fraction": schedule.failed_fraction(cfg.steps),
        "steps_under_failure": sum(1 for r in series if r["scheduled_failed"]),
        "max_dead": max((len(r["scheduled_failed"]) for r in series), default=0),
        "neighbour_steps": sum(1 for r in series if r["neighbours"]),
        "wall_s": time.time() - t0, "reused": reused,
        # the trainer's own clock, so a reused run still says what it cost to train
        "train_s": json.loads((cfg.run_path / "summary.json").read_text())["train_seconds"],
    }
    took = "reused" if reused else f"{run['wall_s']:.0f} s"
    print(f"  {label:<28} val loss {run['val_loss']:.4f}  ppl {run['val_ppl']:.4f}  ({took})", flush=True)
    return run


def work_fractions(series: list[dict], cfg: TrainConfig) -> dict:
    """Shares of the run's sequences (all steps) run in neighbour mode and dropped, from the plans the
    trainer recorded (every replica's work items at every step)."""
    total = cfg.steps * cfg.replicas * cfg.micro_batch
    dropped = sum(r.get("dropped_sequences", len(r["dropped"]) * cfg.micro_batch) for r in series)
    return {"approximated_fraction": approximated_sequences(cfg.run_path) / total, "dropped_fraction": dropped / total}


def approximated_sequences(run_dir: Path) -> int:
    """Sequences run in neighbour mode, summed over the committed steps of every replica."""
    seen, count = set(), 0
    for r in read_metrics(run_dir):
        if "event" in r or (r["step"], r["replica"]) in seen:
            continue
        seen.add((r["step"], r["replica"]))
        count += sum(b - a for _, a, b, mode in r.get("work", []) if mode == "neighbour")
    return count


def with_change(run: dict, reference: dict) -> dict:
    run["ppl_change_pct"] = 100.0 * (run["val_ppl"] / reference["val_ppl"] - 1.0)
    return run


def reference_config(profile: Profile, work: Path, cache_dir: str | None) -> TrainConfig:
    """No failures; checkpoints every checkpoint_every steps, all kept, for the probe."""
    return train_config(profile, work / "none", cache_dir=cache_dir, checkpoint_every=profile.checkpoint_every)


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    return fmean(values), stdev(values) if len(values) > 1 else 0.0
