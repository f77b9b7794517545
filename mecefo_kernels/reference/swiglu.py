"""SwiGLU elementwise primitives in plain PyTorch.

Shapes: a (gate pre-activation) and u (up projection) [T, h], same dtype; silu and its
derivative are evaluated in float32 (float64 for float64 inputs) and rounded once.
"""

from __future__ import annotations

import torch

from .rmsnorm import accumulation_dtype


def swiglu_fwd(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p = silu(a) * u."""
    acc = accumulation_dtype(a.dtype)
    af = a.to(acc)
    return (af * torch.sigmoid(af) * u.to(acc)).to(a.dtype)


def swiglu_bwd(dp: torch.Tensor, a: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (da, du, p): da = dp * u * silu'(a), du = dp * silu(a), and p = silu(a) * u recomputed
    (the down projection's weight gradient needs it and a, u are already loaded)."""
    acc = accumulation_dtype(a.dtype)
    af, uf, g = a.to(acc), u.to(acc), dp.to(acc)
    sig = torch.sigmoid(af)
    silu = af * sig
    dsilu = sig * (1 + af * (1 - sig))
    return (g * uf * dsilu).to(a.dtype), (g * silu).to(a.dtype), (silu * uf).to(a.dtype)
