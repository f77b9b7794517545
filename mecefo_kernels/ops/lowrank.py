"""Low-rank weight gradients (MeCeFO technique iii): bases, primitives and `lowrank_linear`.

Primitives: ``lowrank_project(x[T,in], V[in,r]) -> xV [T,r]`` (float32 accumulation) and
``lowrank_weight_grad(dy[T,out], xV, V) -> dW [out,in] = (dy^T xV) V^T``.
"""

from __future__ import annotations

import torch

from .. import backend as _backend
from ..reference import lowrank as _ref
from ..reference.rmsnorm import accumulation_dtype
from ..validation import as_rows, check_like, check_ndim, check_same_device, check_shape, check_tensor

FAMILY = _backend.register_family(_backend.OpFamily("lowrank", ("torch",)))

METHODS = ("svd", "randomized")


def lowrank_project(impl: str, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return _ref.lowrank_project(x, basis)


def lowrank_weight_grad(impl: str, dy: torch.Tensor, xv: torch.Tensor, basis: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    return _ref.lowrank_weight_grad(dy, xv, basis, out_dtype)


def check_rank(name: str, rank, in_features: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= in_features:
        raise ValueError(f"{name}={rank} is out of range: must be in [1, in_features={in_features}]")
    return rank


def check_basis(name: str, basis, in_features: int, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """A [in_features, r] floating basis on ref's device (any float dtype: kernels cast it)."""
    check_tensor(name, basis)
    check_ndim(name, basis, 2)
    if basis.shape[0] != in_features:
        raise ValueError(f"{name} must have shape [in_features={in_features}, rank], got {tuple(basis.shape)}")
    check_rank(f"{name}.shape[1] (rank)", basis.shape[1], in_features)
    check_same_device(name, basis, ref_name, ref)
    return basis


@torch.no_grad()
def lowrank_basis(weight: torch.Tensor, rank: int, *, method: str = "svd", dtype: torch.dtype | None = None,
                  oversample: int = 8, power_iters: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orthonormal basis of the top-`rank` right singular vectors of a linear weight.

    Args:
        weight: [out_features, in_features] (nn.Linear layout).
        rank: 1 <= rank <= in_features. Past min(out, in) the basis is completed with
            null-space directions (rank == in_features makes the low-rank gradient exact).
        method: "svd" (exact, torch.linalg.svd) or "randomized" (randomized SVD with
            `oversample` extra columns and `power_iters` power iterations; costs
            O(out*in*(rank+oversample)) per iteration instead of a full SVD. With the defaults
            its subspace matches the SVD's closely for matrices with decaying spectra: the
            tests check the projection error of W stays within 1% of the SVD's optimum).
        dtype: dtype of the result; default float32 (float64 for float64 weights). The SVD
            always runs in float32 or better.
        generator: RNG for "randomized" (default: a fixed seed, so the global RNG is untouched).

    Returns:
        V: [in_features, rank] with orthonormal columns, on weight's device.
    """
    check_tensor("weight", weight)
    check_ndim("weight", weight, 2)
    rank = check_rank("rank", rank, weight.shape[1])
    compute = accumulation_dtype(weight.dtype)
    if method == "svd":
        basis = _ref.svd_basis(weight, rank, compute)
    elif method == "randomized":
        basis = _ref.randomized_basis(weight, rank, compute, oversample=oversample, power_iters=power_iters,
                                      generator=generator)
    else:
        raise ValueError(f"method={method!r} is not supported; expected one of {METHODS}")
    return basis.to(dtype or compute)


class LowRankLinearFunction(torch.autograd.Function):
    """y = x W^T + b; dx and db exact; dW = dy^T (x V) V^T.

    Saves x V [T, r] rather than x: the weight gradient needs nothing else, so the saved
    activation shrinks from in_features to rank floats per token."""

    @staticmethod
    def forward(ctx, x, weight, basis, bias, impl):
        rows = as_rows(x)
        y = torch.nn.functional.linear(rows, weight, bias)
        xv = lowrank_project(impl, rows, basis) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(weight, basis, xv)
        ctx.impl = impl
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        weight, basis, xv = ctx.saved_tensors
        dy_rows = as_rows(dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy_rows @ weight).view(*dy.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            dw = lowrank_weight_grad(ctx.impl, dy_rows, xv, basis, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy_rows.sum(0, dtype=accumulation_dtype(dy.dtype)).to(weight.dtype)
        return dx, dw, None, db, None


def lowrank_linear(x: torch.Tensor, weight: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None = None,
                   *, backend: str | None = None) -> torch.Tensor:
    """A linear layer whose weight gradient is MeCeFO's low-rank approximation.

    Args:
        x: [..., in_features], any strides.
        weight: [out_features, in_features], x's dtype and device.
        basis: [in_features, r] (e.g. from lowrank_basis(weight, r)); gets no gradient.
        bias: optional [out_features].

    Returns:
        y = x W^T + b, [..., out_features]. Backward: dx = dy W and db = sum dy exactly,
        dW = dy^T (x V) V^T with leading dims of x and dy flattened into tokens.
    """
    check_tensor("x", x)
    check_ndim("weight", check_tensor("weight", weight), 2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight {tuple(weight.shape)} "
                         f"expects in_features={weight.shape[1]}")
    check_like("weight", weight, "x", x)
    check_basis("basis", basis, weight.shape[1], "x", x)
    if bias is not None:
        check_like("bias", bias, "x", x, shape=(weight.shape[0],), why="out_features of weight")
    impl = _backend.resolve(FAMILY.name, x.device.type, backend)
    return LowRankLinearFunction.apply(x, weight, basis.detach(), bias, impl)
