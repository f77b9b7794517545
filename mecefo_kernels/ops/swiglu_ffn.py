"""The LLaMA FFN block with MeCeFO's neighbour-mode options (techniques ii and iii).

    z = x                               (norm_weight is None)
    z = RMSNorm(x) * norm_weight        (otherwise; LLaMA's post_attention_layernorm)
    a = z Wg^T,  u = z Wu^T,  p = silu(a) * u,  y = p Wd^T

Primitives (per backend): rmsnorm_fwd/bwd (ops/rmsnorm.py), ``swiglu_fwd(a, u) -> p``,
``swiglu_bwd(dp, a, u) -> (da, du, p)``, the low-rank chain (ops/lowrank.py), and on the
triton backend GEMMs with SwiGLU epilogues that never write a and u
(mecefo_kernels/triton/swiglu.py).

Saved for backward, besides the weights (and bases):
  recompute=False: x, a, u   (z, rstd and p are recomputed: elementwise, cheap)
  recompute=True : x         (z, a, u, p recomputed in backward: two extra GEMMs, fused into
                              the backward's SwiGLU kernel on the triton backend)

The whole block is the registered op ``torch.ops.mecefo_api.swiglu_ffn`` with an autograd
formula whose backward is ``mecefo_api::swiglu_ffn_backward``. Being one opaque node matters:
traced as plain PyTorch, torch.compile's partitioner would see the backward recompute a and
u and save them from the forward instead, undoing recompute=True.
"""

from __future__ import annotations

import torch

from .. import backend as _backend
from ..reference import swiglu as _ref
from ..validation import as_rows, check_like, check_ndim, check_tensor
from .compiled import register_fake
from .lowrank import check_basis, empty_grad, weight_grad
from .rmsnorm import rmsnorm_bwd, rmsnorm_fwd

FAMILY = _backend.register_family(_backend.OpFamily("swiglu_ffn", ("triton", "cuda", "cpu", "torch")))


@register_fake("mecefo::swiglu_fwd")
def _fake_swiglu_fwd(a, u):
    return a.new_empty(a.shape)


@register_fake("mecefo::swiglu_bwd")
def _fake_swiglu_bwd(dp, a, u):
    return a.new_empty(a.shape), a.new_empty(a.shape), a.new_empty(a.shape)


def swiglu_fwd(impl: str, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p = silu(a) * u, elementwise, with the named implementation."""
    if impl == "triton":
        return torch.ops.mecefo_triton.swiglu_fwd(a, u)
    if impl in ("cuda", "cpu"):
        return torch.ops.mecefo.swiglu_fwd(a, u)
    return _ref.swiglu_fwd(a, u)


def swiglu_bwd(impl: str, dp: torch.Tensor, a: torch.Tensor, u: torch.Tensor):
    """-> (da, du, p), elementwise, with the named implementation."""
    if impl == "triton":
        return torch.ops.mecefo_triton.swiglu_bwd(dp, a, u)
    if impl in ("cuda", "cpu"):
        return torch.ops.mecefo.swiglu_bwd(dp, a, u)
    return _ref.swiglu_bwd(dp, a, u)


def gate_up_swiglu(impl: str, z: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, keep_preact: bool):
    """z [T, d] -> (p, a, u) [T, h]; a and u are None unless keep_preact. Triton: one fused GEMM."""
    if impl == "triton":
        p, a, u = torch.ops.mecefo_triton.gate_up_swiglu(z, w_gate, w_up, keep_preact)
        return (p, a, u) if keep_preact else (p, None, None)
    a, u = z @ w_gate.t(), z @ w_up.t()
    return swiglu_fwd(impl, a, u), a, u


def recompute_swiglu_bwd(impl: str, z: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, dy: torch.Tensor,
                         w_down: torch.Tensor):
    """Recompute a, u from z and apply the SwiGLU backward to dp = dy Wd -> (da, du, p).
    Triton: one fused GEMM kernel, a, u and dp stay in registers."""
    if impl == "triton":
        return torch.ops.mecefo_triton.gate_up_swiglu_bwd(z, w_gate, w_up, dy, w_down)
    return swiglu_bwd(impl, dy @ w_down, z @ w_gate.t(), z @ w_up.t())


def _normed(impl: str, rows: torch.Tensor, norm_weight: torch.Tensor | None, eps: float):
    """-> (z, rstd): rows itself and None without a norm."""
    if norm_weight is None:
        return rows, None
    return rmsnorm_fwd(impl, rows, norm_weight, eps)


# ------------------------------------------------------------------ the block as a registered op


@torch.library.custom_op("mecefo_api::swiglu_ffn", mutates_args=())
def _swiglu_ffn_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   norm_weight: torch.Tensor | None, v_gate: torch.Tensor | None, v_up: torch.Tensor | None,
                   v_down: torch.Tensor | None, eps: float, recompute: bool,
                   impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, d] -> (y [T, d_out], a, u); a and u are [T, h] to save for backward, or [0, h]
    with recompute. The bases are inputs only so that the autograd formula receives them."""
    z, _ = _normed(impl, x, norm_weight, eps)
    p, a, u = gate_up_swiglu(impl, z, w_gate, w_up, keep_preact=not recompute)
    y = p @ w_down.t()
    if recompute:
        a, u = x.new_empty((0, w_gate.shape[0])), x.new_empty((0, w_gate.shape[0]))  # outputs may not alias
    return y, a, u


@_swiglu_ffn_op.register_fake
def _(x, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down, eps, recompute, impl):
    saved = (0 if recompute else x.shape[0], w_gate.shape[0])
    return x.new_empty((x.shape[0], w_down.shape[0])), x.new_empty(saved), x.new_empty(saved)


@torch.library.custom_op("mecefo_api::swiglu_ffn_backward", mutates_args=())
def _swiglu_ffn_backward_op(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor | None, u: torch.Tensor | None,
                            w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                            norm_weight: torch.Tensor | None, v_gate: torch.Tensor | None,
                            v_up: torch.Tensor | None, v_down: torch.Tensor | None, eps: float, impl: str,
                            needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """-> (dx, dw_gate, dw_up, dw_down, dnorm_weight), each empty where `needs` says so (or no norm).
    a and u are the saved pre-activations, None to recompute them."""
    # The norm is recomputed (rstd included: saving it would cost a float per token for
    # nothing, the recomputation is bitwise the forward's).
    z, rstd = _normed(impl, x, norm_weight, eps)
    if a is None:
        da, du, p = recompute_swiglu_bwd(impl, z, w_gate, w_up, dy, w_down)
    else:
        da, du, p = swiglu_bwd(impl, dy @ w_down, a, u)
    dw_gate = weight_grad(impl, da, z, v_gate, w_gate.dtype) if needs[1] else empty_grad(w_gate)
    dw_up = weight_grad(impl, du, z, v_up, w_up.dtype) if needs[2] else empty_grad(w_up)
    dw_down = weight_grad(impl, dy, p, v_down, w_down.dtype) if needs[3] else empty_grad(w_down)
    dx, dnorm = empty_grad(x), empty_grad(x)  # outputs may not alias
    with_norm_grad = needs[4] and norm_weight is not None
    if needs[0] or with_norm_grad:
        dz = torch.addmm(da @ w_gate, du, w_up)  # one pass over dz: the second GEMM accumulates into it
        if norm_weight is None:
            dx = dz
        else:
            dx_norm, dnorm_weight = rmsnorm_bwd(impl, dz, x, norm_weight, rstd)
            dx = dx_norm if needs[0] else dx
            dnorm = dnorm_weight if with_norm_grad else dnorm
    return dx, dw_gate, dw_up, dw_down, dnorm


@_swiglu_ffn_backward_op.register_fake
def _(dy, x, a, u, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down, eps, impl, needs):
    def grad(like, needed):
        return like.new_empty(like.shape if needed else (0,))

    with_norm_grad = needs[4] and norm_weight is not None
    return (grad(x, needs[0]), grad(w_gate, needs[1]), grad(w_up, needs[2]), grad(w_down, needs[3]),
            grad(norm_weight, True) if with_norm_grad else x.new_empty((0,)))


def _swiglu_ffn_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down, eps, recompute, impl = inputs
    _, a, u = output
    ctx.mark_non_differentiable(a, u)
    saved = (None, None) if recompute else (a, u)
    ctx.save_for_backward(x, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down, *saved)
    ctx.eps, ctx.impl = eps, impl


def _swiglu_ffn_backward(ctx, dy, _da, _du):
    x, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down, a, u = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.mecefo_api.swiglu_ffn_backward(dy, x, a, u, w_gate, w_up, w_down, norm_weight, v_gate, v_up,
                                                     v_down, ctx.eps, ctx.impl, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None, None)


_swiglu_ffn_op.register_autograd(_swiglu_ffn_backward, setup_context=_swiglu_ffn_setup)


def swiglu_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-6, recompute: bool = False,
               bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               backend: str | None = None) -> torch.Tensor:
    """SwiGLU FFN (optionally with the RMSNorm in front), MeCeFO neighbour options built in.

    Args:
        x: [..., d], any strides.
        w_gate, w_up: [h, d]; w_down: [d_out, h] (nn.Linear layout), x's dtype and device.
        norm_weight: optional [d]: z = RMSNorm(x) * norm_weight (LLaMA post_attention_layernorm).
        eps: RMSNorm epsilon.
        recompute: save only x for backward and recompute z, a, u, p there. Gradients are
            unchanged: bitwise on the torch/cpu/cuda backends (the recomputation repeats the
            forward's arithmetic), to rounding on triton (whose backward GEMM fuses the
            recompute and may tile the sums differently).
        bases: optional (V_gate [d, r1], V_up [d, r2], V_down [h, r3]), any float dtype (see
            lowrank_basis): weight gradients become dW ~= dG^T (X V) V^T with X the weight's own
            input (z for gate/up, p for down). None: exact weight gradients. Input and
            norm_weight gradients are always exact. Bases get no gradient.
        backend: "auto" | "triton" | "cuda" | "cpu" | "torch"; None reads $MECEFO_BACKEND.

    Returns:
        y: [..., d_out] in x's dtype.
    """
    check_tensor("x", x)
    d = x.shape[-1]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_ndim(name, check_tensor(name, w), 2)
    h = w_gate.shape[0]
    check_like("w_gate", w_gate, "x", x, shape=(h, d), why=f"[h, d] with d={d} from x")
    check_like("w_up", w_up, "x", x, shape=(h, d), why=f"same as w_gate, [h={h}, d={d}]")
    check_like("w_down", w_down, "x", x, shape=(w_down.shape[0], h), why=f"[d_out, h] with h={h} from w_gate")
    if norm_weight is not None:
        check_like("norm_weight", norm_weight, "x", x, shape=(d,), why="the last dimension of x")
    v_gate = v_up = v_down = None
    if bases is not None:
        if not isinstance(bases, (tuple, list)) or len(bases) != 3:
            raise TypeError("bases must be a tuple (V_gate [d, r], V_up [d, r], V_down [h, r]) or None, got "
                            f"{type(bases).__name__}" + (f" of length {len(bases)}" if hasattr(bases, '__len__') else ""))
        v_gate = check_basis("bases[0] (V_gate)", bases[0], d, "x", x).detach()
        v_up = check_basis("bases[1] (V_up)", bases[1], d, "x", x).detach()
        v_down = check_basis("bases[2] (V_down)", bases[2], h, "x", x).detach()
    impl = _backend.resolve(FAMILY.name, x.device.type, backend)
    y, _, _ = torch.ops.mecefo_api.swiglu_ffn(as_rows(x), w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down,
                                              float(eps), bool(recompute), impl)
    return y.view(*x.shape[:-1], w_down.shape[0])
