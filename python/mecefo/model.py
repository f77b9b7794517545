"""What a replica computes with its model: the loss of a micro-batch, forward + backward of its work
items, evaluation, and hashes of the training state. (Where the model comes from: :mod:`mecefo.models`.)

The loss is the mean next-token cross-entropy over a micro-batch's tokens; every sequence has the
same number of tokens, so a shard's loss is the mean of its micro-batches' losses weighted by their
sequences, and the mean of the shard losses is the full-batch loss.

Precision: the weights and the optimizer state are the master dtype (:func:`mecefo.models.master_dtype`);
with ``--dtype bfloat16`` the forward runs under ``torch.autocast`` in bf16 (on CPU and CUDA), and the
gradients land in the master dtype.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.nn.functional as F

from .config import TrainConfig


def replica_device(cfg: TrainConfig, replica: int) -> torch.device:
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA device")
    return torch.device("cuda", replica % torch.cuda.device_count())


def compute_context(cfg: TrainConfig, device: torch.device | str):
    """A context manager factory for the forward passes: bf16 autocast for --dtype bfloat16, else nothing."""
    if cfg.dtype != "bfloat16":
        return contextlib.nullcontext
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16)


def logits_of(output) -> torch.Tensor:
    """A model's logits: transformers' output object, or a factory model's tensor / ``.logits``."""
    return output if isinstance(output, torch.Tensor) else output.logits


def shard_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction; inputs, targets: [batch, seq] int64."""
    config = getattr(model, "config", None)
    kwargs = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
    logits = logits_of(model(input_ids=inputs, **kwargs))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def micro_batches(item, size: int):
    """``(start, stop)`` of each micro-batch of at most ``size`` sequences that a work item runs as."""
    for start in range(item.start, item.stop, size):
        yield start, min(start + size, item.stop)


def run_work(model: torch.nn.Module, path, batches, step: int, items, device: torch.device | str, *,
             micro_batch: int | None = None, compute=contextlib.nullcontext) -> tuple[float, float]:
    """Forward + backward of each work item (:class:`mecefo.membership.WorkItem`) in micro-batches of at most
    ``micro_batch`` sequences (None: each item whole), gradients accumulated into ``.grad``; returns (sum of
    the weighted losses, shards run).

    An item in neighbour mode runs its forward inside ``path.context`` (its backward follows the
    mode of its forward). A micro-batch of ``s`` of a shard's ``m`` sequences weighs ``s / m``, so the
    replicas' gradient sums divided by the plan's normalisers (counted in shards) are means over
    sequences; a whole shard in one micro-batch weighs 1 and is not multiplied at all (failure-free
    training without accumulation stays bit-identical to plain data parallelism).
    """
    m = batches.micro_batch
    loss_sum = shards = 0.0
    for item in items:
        for start, stop in micro_batches(item, micro_batch or item.sequences):
            inputs, targets = batches.batch(step, item.shard, start, stop)
            with path.context(model, item.mode == "neighbour"), compute():
                loss = shard_loss(model, inputs.to(device), targets.to(device))
            weight = (stop - start) / m
            (loss if stop - start == m else loss * weight).backward()
            loss_sum += loss.item() * weight
            shards += weight
    return loss_sum, shards


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, count: int, *, micro_batch: int | None = None,
             compute=contextlib.nullcontext) -> float:
    """Mean validation loss over ``count`` fixed validation batches, each run in micro-batches of at most
    ``micro_batch`` sequences."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for i in range(count):
        inputs, targets = batches.val_batch(i)
        rows = inputs.shape[0]
        size = micro_batch or rows
        for start in range(0, rows, size):
            with compute():
                loss = shard_loss(model, inputs[start:start + size].to(device), targets[start:start + size].to(device))
            total += loss.item() * min(size, rows - start) / rows
    model.train(was_training)
    return total / count


def _tensor_bytes(t: torch.Tensor) -> bytes:
    from .sync import local_shard

    t = local_shard(t)  # a sharded model (--shard fsdp) hashes this rank's shards
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def parameter_hash(model: torch.nn.Module) -> str:
    """Hash of the model's state_dict (names and bytes): equal hashes, bit-identical models (sharded: equal
    hashes on the same rank of two groups, bit-identical shards)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def optimizer_hash(optimizer: torch.optim.Optimizer) -> str:
    """Hash of every parameter's optimizer state (in parameter order) and the hyperparameters."""
    h = hashlib.sha256()
    for group in optimizer.param_groups:
        h.update(repr(sorted((k, v) for k, v in group.items() if k != "params")).encode())
        for p in group["params"]:
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                h.update(key.encode())
                h.update(_tensor_bytes(value) if isinstance(value, torch.Tensor) else repr(value).encode())
    return h.hexdigest()[:16]
