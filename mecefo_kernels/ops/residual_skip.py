"""Attention-skip backward (MeCeFO technique i): out = x + branch(x), gradient through x only.

On a neighbour rank the attention branch of a pre-norm block, h = x + MHA(RMSNorm1(x)), still
runs in forward but its backward is dropped: dL/dx = dL/dh, and the branch's parameters get
no gradient. Running the branch under ``torch.no_grad()`` gives exactly that with nothing to
write by hand:

* no graph is recorded inside the branch, so nothing is saved for backward (no q, k, v,
  softmax statistics or norm input) and its parameters' ``.grad`` stays untouched (None
  if it was None);
* the residual add is the only autograd node; it saves no tensors and passes dL/dout to x;
* attention inside the branch runs its forward-only variant: with grad disabled, SDPA
  neither keeps nor returns the softmax statistics that its backward would need, and on
  CUDA it picks the flash / memory-efficient kernels as usual.

torch.compile: ``no_grad`` regions are traced by dynamo without a graph break, and AOT
autograd then partitions nothing of the branch into the backward graph, so the compiled
form keeps both properties (tests/nn/test_residual_skip.py compiles it with fullgraph=True).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..validation import check_tensor


def residual_skip(x: torch.Tensor, branch: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """x + branch(x, *args, **kwargs), with the branch run forward-only.

    Args:
        x: [..., d] floating tensor (the residual stream).
        branch: callable returning a tensor of exactly x's shape (e.g. attention on
            RMSNorm(x)). It runs under ``torch.no_grad()``: it records no graph and saves
            nothing, and its parameters receive no gradient.
        *args, **kwargs: passed to branch after x (masks, position embeddings, ...).

    Returns:
        [..., d] in x's dtype (a branch output of another floating dtype, e.g. bf16 under
        autocast with an fp32 residual stream, is cast to x's dtype, as the residual add of
        transformers' LLaMA does by promotion). Backward: dL/dx = dL/dout.
    """
    check_tensor("x", x)
    if not callable(branch):
        raise TypeError(f"branch must be callable, got {type(branch).__name__}")
    with torch.no_grad():
        out = branch(x, *args, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"branch must return a tensor, got {type(out).__name__} "
                        "(for modules that return (output, extras) tuples, return output[0] from the branch)")
    if out.shape != x.shape:
        raise ValueError(f"branch returned shape {tuple(out.shape)} but x has shape {tuple(x.shape)}; "
                         "the residual add does not broadcast")
    check_tensor("branch output", out)
    if out.device != x.device:
        raise ValueError(f"branch returned a tensor on {out.device} but x is on {x.device}")
    return x + out.to(x.dtype)
