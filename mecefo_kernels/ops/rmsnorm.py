"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight over the last dimension.

Primitives (all backends): ``rmsnorm_fwd(x[T,d], w[d], eps) -> (y[T,d], rstd[T])`` and
``rmsnorm_bwd(dy, x, w, rstd) -> (dx, dweight)``. The autograd Function saves x and one
float per token; the backward is one fused pass.
"""

from __future__ import annotations

import torch

from .. import backend as _backend
from ..reference import rmsnorm as _ref
from ..validation import as_rows, check_like, check_ndim, check_tensor
from .compiled import register_fake

FAMILY = _backend.register_family(_backend.OpFamily("rmsnorm", ("triton", "cuda", "cpu", "torch")))


@register_fake("mecefo::rmsnorm_fwd")
def _fake_fwd(x, weight, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=acc)


@register_fake("mecefo::rmsnorm_bwd")
def _fake_bwd(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def rmsnorm_fwd(impl: str, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """[T, d] rows -> (y [T, d], rstd [T]) with the named implementation."""
    if impl == "triton":
        return torch.ops.mecefo_triton.rmsnorm_fwd(x, weight, eps)
    if impl in ("cuda", "cpu"):
        return torch.ops.mecefo.rmsnorm_fwd(x, weight, eps)
    return _ref.rmsnorm_fwd(x, weight, eps)


def rmsnorm_bwd(impl: str, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """-> (dx [T, d], dweight [d]) with the named implementation."""
    if impl == "triton":
        return torch.ops.mecefo_triton.rmsnorm_bwd(dy, x, weight, rstd)
    if impl in ("cuda", "cpu"):
        return torch.ops.mecefo.rmsnorm_bwd(dy, x, weight, rstd)
    return _ref.rmsnorm_bwd(dy, x, weight, rstd)


class RMSNormFunction(torch.autograd.Function):
    """Saves x and rstd (one float per token); recomputes xhat in the fused backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str) -> torch.Tensor:
        rows = as_rows(x)
        y, rstd = rmsnorm_fwd(impl, rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.impl = impl
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        dx, dweight = rmsnorm_bwd(ctx.impl, as_rows(dy), rows, weight, rstd)
        return dx.view(dy.shape), dweight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension.

    Args:
        x: [..., d] floating tensor, any strides.
        weight: [d], same dtype and device as x.
        eps: added to the mean square.
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch"; None reads $MECEFO_BACKEND.

    Returns:
        [..., d] tensor of x's dtype.
    """
    check_tensor("x", x)
    check_ndim("weight", check_tensor("weight", weight), 1)
    check_like("weight", weight, "x", x, shape=(x.shape[-1],), why="the last dimension of x")
    impl = _backend.resolve(FAMILY.name, x.device.type, backend)
    return RMSNormFunction.apply(x, weight, float(eps), impl)
