"""RMSNorm primitives in plain PyTorch.

Shapes: x [T, d], weight [d], rstd [T] in the accumulation dtype (float32, or float64
for float64 inputs).
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y = weight * (x * rstd), rstd = 1/sqrt(mean(x^2) + eps), HF LlamaRMSNorm's rounding order."""
    xf = x.to(accumulation_dtype(x.dtype))
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    y = weight * (xf * rstd[:, None]).to(x.dtype)
    return y, rstd


def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), dweight = sum_tokens(dy * xhat)."""
    acc = rstd.dtype
    xhat = x.to(acc) * rstd[:, None]
    g = dy.to(acc)
    gw = g * weight.to(acc)
    mean = (gw * xhat).mean(-1, keepdim=True)
    dx = rstd[:, None] * (gw - xhat * mean)
    dweight = (g * xhat).sum(0)
    return dx.to(x.dtype), dweight.to(weight.dtype)
