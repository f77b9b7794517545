"""RMSNorm module (same parameters and state_dict as transformers' LlamaRMSNorm)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.rmsnorm import rms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension.

    Shapes: input [..., hidden_size] -> output of the same shape and dtype.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
