"""Gradient synchronisation with the MeCeFO normalisers.

Not torchft's DDP wrapper: that averages over the replicas that are live, which is right for
``shrink`` but wrong for NDB, where a neighbour's gradient already holds two shards and the
attention parameters must be averaged over a different set. Here every replica puts the SUM of
its shards' gradients (zeros where it has none) into flat buckets, the buckets are all-reduced
with SUM, and each parameter is divided by its own normaliser (:func:`mecefo.membership.normalisers`).

Bucket layout: parameters in ``model.named_parameters()`` order, concatenated flat into buckets
of at most ``bucket_bytes`` (a parameter never spans two buckets). With no failures this is
exactly ordinary data-parallel training: one SUM all-reduce of the concatenated gradients and a
division by n.

Sharded parameters (``--shard fsdp``: DTensors, FSDP2 has already summed each gradient over the
group's ranks and left each rank its shard): the buckets hold this rank's shards only, so rank ``r``
of every group all-reduces the same shards with rank ``r`` of the others, and the normalisers,
elementwise, apply to the shards as they would to the whole tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor

from .membership import Normalisers

AllReduceSum = Callable[[torch.Tensor], bool]  # in-place SUM across replicas; False if it failed


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: its local shard if ``t`` is a DTensor, else ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _set_grad(p: torch.Tensor, local: torch.Tensor) -> None:
    """``p.grad`` = ``local`` (this rank's shard of it when ``p`` is sharded)."""
    if isinstance(p, DTensor):
        p.grad = DTensor.from_local(local.view(p.to_local().shape), p.device_mesh, p.placements, run_check=False,
                                    shape=p.shape, stride=p.stride())
    else:
        p.grad = local.view_as(p)


class GradientSync:
    """Sums gradients across replicas and applies the per-parameter normalisers.

    Args:
        model: the replica's model (parameters with requires_grad are synchronised).
        skipped: names of the parameters the neighbour path leaves without a gradient
            (attention and input_layernorm under MeCeFO); they use ``Normalisers.attention``.
        bucket_bytes: the largest all-reduce message.
        wire_dtype: the dtype the buckets are all-reduced in (None: the gradients' own); the sums are
            cast back to the gradients' dtype (bf16 halves the traffic and rounds each sum to bf16).
    """

    def __init__(self, model: torch.nn.Module, skipped: Iterable[str] = (), bucket_bytes: int = 64 << 20,
                 wire_dtype: torch.dtype | None = None):
        self.wire_dtype = wire_dtype
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        names = {name for name, _ in self.params}
        skipped = set(skipped)
        unknown = sorted(skipped - names)
        if unknown:
            raise ValueError(f"skipped parameters not found in the model: {unknown[:5]}")
        self.skipped = [name in skipped for name, _ in self.params]
        self.buckets: list[list[int]] = []
        size = 0
        for i, (_, p) in enumerate(self.params):
            nbytes = local_shard(p).numel() * p.element_size()
            if not self.buckets or size + nbytes > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += nbytes

    def reduce(self, allreduce: AllReduceSum, contributes: bool = True) -> bool:
        """Replace every gradient by its sum over replicas; False (gradients unusable) if a bucket failed.

        ``contributes=False`` (a replica sitting out) sends zeros but still takes part, so the
        others' collective completes and everyone ends with the same sums.
        """
        for bucket in self.buckets:
            parts = []
            for i in bucket:
                p = self.params[i][1]
                grad = local_shard(p.grad) if contributes and p.grad is not None else torch.zeros_like(local_shard(p))
                parts.append(grad.reshape(-1))
            flat = torch.cat(parts)
            if self.wire_dtype is not None and self.wire_dtype != flat.dtype:
                wire = flat.to(self.wire_dtype)
                if not allreduce(wire):
                    return False
                flat = wire.to(flat.dtype)
            elif not allreduce(flat):
                return False
            offset = 0
            for i in bucket:
                p = self.params[i][1]
                n = local_shard(p).numel()
                _set_grad(p, flat[offset:offset + n])
                offset += n
        return True

    def normalise(self, norms: Normalisers) -> None:
        """Divide the sums: skipped params by ``norms.attention`` (None: no gradient), the rest by ``norms.rest``."""
        for (_, p), skipped in zip(self.params, self.skipped):
            divisor = norms.attention if skipped else norms.rest
            if divisor is None:
                p.grad = None  # nobody computed this gradient this step: no update (AdamW skips None)
            else:
                p.grad.div_(divisor)
