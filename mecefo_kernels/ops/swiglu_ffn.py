"""The LLaMA FFN block with MeCeFO's neighbour-mode options (techniques ii and iii).

    z = x                               (norm_weight is None)
    z = RMSNorm(x) * norm_weight        (otherwise; LLaMA's post_attention_layernorm)
    a = z Wg^T,  u = z Wu^T,  p = silu(a) * u,  y = p Wd^T

Primitives (per backend): rmsnorm_fwd/bwd (ops/rmsnorm.py), ``swiglu_fwd(a, u) -> p``,
``swiglu_bwd(dp, a, u) -> (da, du, p)``, and the low-rank chain (ops/lowrank.py).

Saved for backward, besides the weights:
  recompute=False: x, rstd, a, u   (z and p are recomputed: elementwise, cheap)
  recompute=True : x, rstd         (z, a, u, p recomputed in backward: two extra GEMMs)
"""

from __future__ import annotations

import torch

from .. import backend as _backend
from ..reference import lowrank as _ref_lowrank
from ..reference import swiglu as _ref
from ..validation import as_rows, check_like, check_ndim, check_tensor
from .lowrank import check_basis, lowrank_project, lowrank_weight_grad
from .rmsnorm import rmsnorm_bwd, rmsnorm_fwd

FAMILY = _backend.register_family(_backend.OpFamily("swiglu_ffn", ("torch",)))


def swiglu_fwd(impl: str, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _ref.swiglu_fwd(a, u)


def swiglu_bwd(impl: str, dp: torch.Tensor, a: torch.Tensor, u: torch.Tensor):
    return _ref.swiglu_bwd(dp, a, u)


def _weight_grad(impl: str, dy: torch.Tensor, x: torch.Tensor, basis: torch.Tensor | None,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """dy [T, out], x [T, in] -> dW [out, in]: exact when basis is None, else MeCeFO's low-rank."""
    if basis is None:
        return _ref_lowrank.exact_weight_grad(dy, x, out_dtype)
    return lowrank_weight_grad(impl, dy, lowrank_project(impl, x, basis), basis, out_dtype)


def _normed(impl, rows, norm_weight, eps):
    """-> (z, rstd); z is rows itself and rstd None without a norm."""
    if norm_weight is None:
        return rows, None
    return rmsnorm_fwd(impl, rows, norm_weight, eps)


class SwiGLUFFNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down, eps, recompute, impl):
        rows = as_rows(x)
        z, rstd = _normed(impl, rows, norm_weight, eps)
        a = z @ w_gate.t()
        u = z @ w_up.t()
        y = swiglu_fwd(impl, a, u) @ w_down.t()
        if recompute:
            ctx.save_for_backward(rows, rstd, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down)
        else:
            ctx.save_for_backward(rows, rstd, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down, a, u)
        ctx.eps, ctx.recompute, ctx.impl = eps, recompute, impl
        return y.view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        rows, rstd, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down = saved[:9]
        impl = ctx.impl
        need = ctx.needs_input_grad
        z = rows if norm_weight is None else rmsnorm_fwd(impl, rows, norm_weight, ctx.eps)[0]
        if ctx.recompute:
            a, u = z @ w_gate.t(), z @ w_up.t()
        else:
            a, u = saved[9:]
        dy_rows = as_rows(dy)
        dp = dy_rows @ w_down
        da, du, p = swiglu_bwd(impl, dp, a, u)
        dw_down = _weight_grad(impl, dy_rows, p, v_down, w_down.dtype) if need[3] else None
        dw_gate = _weight_grad(impl, da, z, v_gate, w_gate.dtype) if need[1] else None
        dw_up = _weight_grad(impl, du, z, v_up, w_up.dtype) if need[2] else None
        dx = dnorm = None
        if need[0] or need[4]:
            dz = da @ w_gate + du @ w_up
            if norm_weight is None:
                dx = dz
            else:
                dx, dnorm = rmsnorm_bwd(impl, dz, rows, norm_weight, rstd)
            dx = dx.view(*dy.shape[:-1], rows.shape[1])
        return dx, dw_gate, dw_up, dw_down, dnorm, None, None, None, None, None, None


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
        recompute: save only x (and one float per token for the norm) and recompute z, a, u, p
            in backward. Gradients are unchanged.
        bases: optional (V_gate [d, r1], V_up [d, r2], V_down [h, r3]): weight gradients become
            dW ~= dG^T (X V) V^T with X the weight's own input (z for gate/up, p for down).
            None: exact weight gradients. Input and norm_weight gradients are always exact.
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
    return SwiGLUFFNFunction.apply(x, w_gate, w_up, w_down, norm_weight, v_gate, v_up, v_down, float(eps),
                                   bool(recompute), impl)
