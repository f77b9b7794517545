"""The model every replica trains: a transformers LlamaForCausalLM from a preset, and its loss.

Every replica builds its initial weights from the same seed, so they start identical without
any communication. The loss is the mean next-token cross-entropy over one shard's tokens;
shards have equal token counts, so the mean of the shard losses is the full-batch loss.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .presets import get_preset

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The preset's model with seeded initial weights (built on the CPU, so every device gets the same)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(get_preset(cfg.preset).to_llama_config())
    return model.to(device=device, dtype=TORCH_DTYPES[cfg.dtype])


def replica_device(cfg: TrainConfig, replica: int) -> torch.device:
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA device")
    return torch.device("cuda", replica % torch.cuda.device_count())


def shard_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction; inputs, targets: [batch, seq] int64."""
    logits = model(input_ids=inputs, use_cache=False).logits
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def run_work(model: torch.nn.Module, path, batches, step: int, items, device: torch.device | str) -> tuple[float, float]:
    """Forward + backward of each work item (:class:`mecefo.membership.WorkItem`) as its own
    micro-batch, gradients accumulated into ``.grad``; returns (sum of the weighted losses, shards run).

    An item in neighbour mode runs its forward inside ``path.context`` (its backward follows the
    mode of its forward). An item of ``s`` of a shard's ``m`` sequences weighs ``s / m``, so the
    replicas' gradient sums divided by the plan's normalisers (counted in shards) are means over
    sequences; a whole shard weighs 1 and is not multiplied at all (failure-free training stays
    bit-identical to plain data parallelism).
    """
    m = batches.micro_batch
    loss_sum = shards = 0.0
    for item in items:
        inputs, targets = batches.batch(step, item.shard, item.start, item.stop)
        with path.context(model, item.mode == "neighbour"):
            loss = shard_loss(model, inputs.to(device), targets.to(device))
        weight = item.sequences / m
        (loss if item.sequences == m else loss * weight).backward()
        loss_sum += loss.item() * weight
        shards += weight
    return loss_sum, shards


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, count: int) -> float:
    """Mean validation loss over ``count`` fixed validation micro-batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for i in range(count):
        inputs, targets = batches.val_batch(i)
        total += shard_loss(model, inputs.to(device), targets.to(device)).item()
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
