"""Low-rank weight gradients (MeCeFO technique iii): bases, primitives and `lowrank_linear`.

Primitives (all backends, math in mecefo_kernels/reference/lowrank.py):
``lowrank_project(x[T,in], V[in,r]) -> xV [T,r]`` in x's dtype and
``lowrank_weight_grad(dy[T,out], xV, V, out_dtype) -> dW [out,in] = (dy^T xV) V^T``,
both with float32 accumulation.

`lowrank_linear` is the registered op ``torch.ops.mecefo_api.lowrank_linear`` with an
autograd formula (and ``mecefo_api::lowrank_linear_backward``), so torch.compile treats it
as one opaque node and cannot change what it saves for backward.
"""

from __future__ import annotations

import torch

from .. import backend as _backend
from ..reference import lowrank as _ref
from ..reference.rmsnorm import accumulation_dtype
from ..validation import as_rows, check_like, check_ndim, check_same_device, check_tensor
from .compiled import register_fake

FAMILY = _backend.register_family(_backend.OpFamily("lowrank", ("triton", "cuda", "cpu", "torch")))

METHODS = ("svd", "randomized")


@register_fake("mecefo::lowrank_project")
def _fake_project(x, basis):
    return x.new_empty((x.shape[0], basis.shape[1]))


@register_fake("mecefo::lowrank_weight_grad")
def _fake_weight_grad(dy, xv, basis, out_dtype):
    return dy.new_empty((dy.shape[1], basis.shape[0]), dtype=out_dtype)


def lowrank_project(impl: str, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x [T, in], basis [in, r] -> x V [T, r] in x's dtype, with the named implementation."""
    if impl == "triton":
        return torch.ops.mecefo_triton.lowrank_project(x, basis)
    if impl in ("cuda", "cpu"):
        return torch.ops.mecefo.lowrank_project(x, basis)
    return _ref.lowrank_project(x, basis)


def lowrank_weight_grad(impl: str, dy: torch.Tensor, xv: torch.Tensor, basis: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """dy [T, out], xv [T, r], basis [in, r] -> (dy^T xv) V^T [out, in], with the named implementation."""
    if impl == "triton":
        return torch.ops.mecefo_triton.lowrank_weight_grad(dy, xv, basis, out_dtype)
    if impl in ("cuda", "cpu"):
        return torch.ops.mecefo.lowrank_weight_grad(dy, xv, basis, out_dtype)
    return _ref.lowrank_weight_grad(dy, xv, basis, out_dtype)


def weight_grad(impl: str, dy: torch.Tensor, x: torch.Tensor, basis: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    """dy [T, out], x [T, in] -> dW [out, in]: exact dy^T x when basis is None, else MeCeFO's low-rank."""
    if basis is None:
        return _ref.exact_weight_grad(dy, x, out_dtype)
    return lowrank_weight_grad(impl, dy, lowrank_project(impl, x, basis), basis, out_dtype)


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
                  oversample: int = 8, power_iters: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Orthonormal basis of the top-`rank` right singular vectors of a linear weight.

    Args:
        weight: [out_features, in_features] (nn.Linear layout).
        rank: 1 <= rank <= in_features. Past min(out, in) the basis is completed with
            null-space directions (rank == in_features makes the low-rank gradient exact).
        method: "svd" (exact, torch.linalg.svd) or "randomized" (randomized SVD with
            `oversample` extra columns and `power_iters` power iterations: about
            4 * (power_iters + 1) * out * in * (rank + oversample) FLOPs in GEMMs plus QRs of
            [features, rank + oversample], instead of a full SVD's O(out * in * min(out, in))).
            How close it gets, as the share of the exact basis's captured energy
            ||W V||_F^2 it keeps (measured, and tested at small shapes): with a decaying
            spectrum (power law k^-1/2) >= 99% with the defaults; with a flat spectrum (an
            i.i.d. Gaussian weight, i.e. freshly initialised) >= 95% with the defaults
            (power_iters=2: ~90%; power_iters=8: >= 98.5%).
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


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """Placeholder for a gradient a registered backward op was told not to compute (ops
    cannot return None); the autograd formula turns it back into None."""
    return like.new_empty((0,))


@torch.library.custom_op("mecefo_api::lowrank_linear", mutates_args=())
def _lowrank_linear_op(x: torch.Tensor, weight: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None,
                       project: bool, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, in] -> (y = x W^T + b [T, out], x V [T, r] when `project`, else [0, r]).
    `project` must be True when weight will need a gradient (the only use of x V)."""
    y = torch.nn.functional.linear(x, weight, bias)
    xv = lowrank_project(impl, x, basis) if project else x.new_empty((0, basis.shape[1]))
    return y, xv


@_lowrank_linear_op.register_fake
def _(x, weight, basis, bias, project, impl):
    rows = x.shape[0] if project else 0
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((rows, basis.shape[1]))


@torch.library.custom_op("mecefo_api::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(dy: torch.Tensor, weight: torch.Tensor, basis: torch.Tensor, xv: torch.Tensor,
                                impl: str, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx = dy W [T, in], dW = (dy^T xv) V^T, db = sum_tokens dy); empty where needs[i] is False."""
    dx = dy @ weight if needs[0] else empty_grad(dy)
    dw = lowrank_weight_grad(impl, dy, xv, basis, weight.dtype) if needs[1] else empty_grad(weight)
    db = dy.sum(0, dtype=accumulation_dtype(dy.dtype)).to(weight.dtype) if needs[2] else empty_grad(weight)
    return dx, dw, db


@_lowrank_linear_backward_op.register_fake
def _(dy, weight, basis, xv, impl, needs):
    return (dy.new_empty((dy.shape[0], weight.shape[1]) if needs[0] else (0,)),
            weight.new_empty(weight.shape if needs[1] else (0,)),
            weight.new_empty((weight.shape[0],) if needs[2] else (0,)))


def _lowrank_linear_setup(ctx, inputs, output):
    x, weight, basis, bias, project, impl = inputs
    ctx.save_for_backward(weight, basis, output[1])
    ctx.impl = impl
    ctx.mark_non_differentiable(output[1])


def _lowrank_linear_backward(ctx, dy, _dxv):
    weight, basis, xv = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]]
    if needs[1] and xv.shape[0] != dy.shape[0]:
        raise RuntimeError("mecefo_api::lowrank_linear was called with project=False, but weight needs a gradient")
    dx, dw, db = torch.ops.mecefo_api.lowrank_linear_backward(dy, weight, basis, xv, ctx.impl, needs)
    return (dx if needs[0] else None, dw if needs[1] else None, None, db if needs[2] else None, None, None)


_lowrank_linear_op.register_autograd(_lowrank_linear_backward, setup_context=_lowrank_linear_setup)


def lowrank_linear(x: torch.Tensor, weight: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None = None,
                   *, backend: str | None = None) -> torch.Tensor:
    """A linear layer whose weight gradient is MeCeFO's low-rank approximation.

    Args:
        x: [..., in_features], any strides.
        weight: [out_features, in_features], x's dtype and device.
        basis: [in_features, r] (e.g. from lowrank_basis(weight, r)), any float dtype (it is
            rounded to x's dtype inside the products); gets no gradient.
        bias: optional [out_features].
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch"; None reads $MECEFO_BACKEND.

    Returns:
        y = x W^T + b, [..., out_features]. Backward: dx = dy W and db = sum dy exactly,
        dW = dy^T (x V) V^T with leading dims of x and dy flattened into tokens. Saved for
        backward: x V [T, r] in x's dtype (not x), when weight needs a gradient.
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
    project = torch.is_grad_enabled() and weight.requires_grad
    y, _ = torch.ops.mecefo_api.lowrank_linear(as_rows(x), weight, basis.detach(), bias, project, impl)
    return y.view(*x.shape[:-1], weight.shape[0])
