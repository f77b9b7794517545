"""Running the real trainer in tests, and the references its results are checked against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mecefo.checkpoint import list_checkpoints, read_checkpoint
from mecefo.config import TrainConfig
from mecefo.data import Batches, CorpusFiles
from mecefo.launch import RunResult, launch
from mecefo.membership import plan_step
from mecefo.model import shard_loss
from mecefo.models import build_model
from mecefo.optim import build_optimizer, lr_at, set_lr
from mecefo.report import committed_steps, read_metrics, step_series

# Small and fast on 2 shared cores: the tiny preset, 16-token sequences, 2 per shard, float64 so
# that "equal to the reference" can mean 1e-12; failures detected within a second. lr 1e-3:
# at 3e-3 this tiny model goes through a loss spike near step 25 that amplifies a one-ulp
# perturbation of the full-batch run itself to 1e-8, so no exact comparison could survive it.
FAST = dict(model="tiny", dtype="float64", seq_len=16, micro_batch=2, warmup=5, lr=1e-3, replicas=4,
            checkpoint_every=0, eval_batches=2, heartbeat_timeout_s=1.5, timeout_s=4.0, quorum_timeout_s=60.0,
            restart_after=0, max_wall_s=150.0, threads=1)


def make_config(run_dir: Path, cache_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), cache_dir=str(cache_dir), **{**FAST, **overrides})


def run(cfg: TrainConfig) -> RunResult:
    result = launch(cfg)
    assert result.returncode == 0, f"run failed; see {cfg.run_dir}/logs"
    return result


def final_model(run_dir: Path) -> dict:
    step, path = list_checkpoints(Path(run_dir) / "checkpoints")[0]
    return read_checkpoint(path)["model"]


@dataclass
class Reference:
    state: dict  # final state dict
    losses: list[float]  # full-batch loss per step


def full_batch_reference(run_dir: Path, live_at=None) -> Reference:
    """A single process trains on each step's whole global batch (all shards concatenated).

    ``live_at(step)`` gives the live replicas at a step when some are failed on a schedule; the
    batch then holds the shards the NDB plan processes (all of them unless more than half are
    gone).
    """
    run_dir = Path(run_dir)
    cfg = TrainConfig.load(run_dir / "config.json")
    corpus = CorpusFiles(**json.loads((run_dir / "corpus.json").read_text()))
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    batches = Batches(corpus, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=cfg.seed,
                      vocab_size=model.config.vocab_size)
    losses = []
    for step in range(cfg.steps):
        live = live_at(step) if live_at else range(cfg.replicas)
        dropped = plan_step(cfg.replicas, live, "ndb-exact").dropped
        xs, ys = zip(*(batches.batch(step, s) for s in range(cfg.replicas) if s not in dropped))
        optimizer.zero_grad(set_to_none=True)
        loss = shard_loss(model, torch.cat(xs), torch.cat(ys))
        loss.backward()
        losses.append(loss.item())
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip, foreach=False)
        set_lr(optimizer, lr_at(step, cfg))
        optimizer.step()
    return Reference(model.state_dict(), losses)


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors of two state dicts (float64 math).

    Global, not per element: two correct float64 runs that only sum the shards' gradients in a
    different order differ by ~1e-14 globally but up to ~1e-11 in single elements (gradients
    that nearly cancel, amplified by Adam's 1/(sqrt(v) + eps)); a lost or doubled step is ~7e-3.
    """
    assert a.keys() == b.keys()
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b).sqrt()
    den = sum((b[k].double() ** 2).sum() for k in b).sqrt()
    return (num / den).item()


def check_replicas_agree(run_dir: Path, steps: int) -> list[dict]:
    """Every step committed, by every replica at most once, with identical state on all of them.

    Returns the per-step series. Fails if a step is missing (lost), a replica committed a step
    twice (applied twice), or two replicas disagree on parameters, optimizer state or LR.
    """
    records = read_metrics(run_dir)
    discarded = {(r["replica"], r["step"]) for r in records if r.get("event") == "discarded"}
    by_step = committed_steps(records)
    assert list(by_step) == list(range(steps)), "every step committed exactly in order, none lost"
    for step, rs in by_step.items():
        replicas = [r["replica"] for r in rs]
        assert len(replicas) == len(set(replicas)), f"step {step} applied twice by a replica: {replicas}"
        # a quorum member that did not commit this step saw it fail (it heals from the others next)
        missing = set(rs[0]["members"]) - set(replicas)
        assert all((m, step) in discarded for m in missing), f"step {step}: {missing} neither committed nor failed"
        states = {(r["param_hash"], r["optim_hash"], r["lr"]) for r in rs}
        assert len(states) == 1, f"step {step}: replicas disagree: {[(r['replica'], r['param_hash']) for r in rs]}"
    return step_series(records)
