"""Low-rank weight gradients (MeCeFO technique iii) and their bases, in plain PyTorch.

For y = x W^T with W [out, in], x [T, in], dy [T, out], the exact gradient is dW = dy^T x.
MeCeFO uses dW ~= dy^T (x V) V^T with V [in, r] the top-r right singular vectors of W.
It is computed as a chain of skinny products, never forming dy^T x:

    xv = x V          [T, r]     (lowrank_project)
    g  = dy^T xv      [out, r]
    dW = g V^T        [out, in]  (lowrank_weight_grad)

Every product takes its operands in the activation dtype (V rounded to it, as a bf16
nn.Linear would hold it), accumulates in float32 (float64 for float64) and rounds its
result once: the precision of an ordinary bf16 weight gradient, and the math every
backend implements (csrc/lowrank.h, mecefo_kernels/triton/lowrank.py).
"""

from __future__ import annotations

import torch

from .rmsnorm import accumulation_dtype


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b (same dtype) accumulated in the accumulation dtype, rounded to out_dtype."""
    acc = accumulation_dtype(a.dtype)
    return (a.to(acc) @ b.to(acc)).to(out_dtype)


def lowrank_project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x [T, in], basis [in, r] -> x V [T, r] in x's dtype."""
    return _mm(x, basis.to(x.dtype), x.dtype)


def lowrank_weight_grad(dy: torch.Tensor, xv: torch.Tensor, basis: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """dy [T, out], xv = x V [T, r] (dy's dtype), basis [in, r] -> (dy^T xv) V^T [out, in] in out_dtype."""
    g = _mm(dy.t(), xv, dy.dtype)
    return _mm(g, basis.to(dy.dtype).t(), out_dtype)


def exact_weight_grad(dy: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """dy [T, out], x [T, in] -> dy^T x [out, in]."""
    return (dy.t() @ x).to(out_dtype)


def svd_basis(weight: torch.Tensor, rank: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """Top-`rank` right singular vectors of weight [out, in] as columns [in, rank]."""
    w = weight.detach().to(compute_dtype)
    full = rank > min(w.shape)  # past min(out, in) the basis is completed by the null space
    _, _, vh = torch.linalg.svd(w, full_matrices=full)
    return vh[:rank].t().contiguous()


def randomized_basis(weight: torch.Tensor, rank: int, compute_dtype: torch.dtype, *, oversample: int = 8,
                     power_iters: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomized SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1) for the top right singular
    vectors: a range finder on W^T with `power_iters` re-orthonormalised power iterations, then an
    exact SVD of the small projected matrix. Uses its own generator so it never consumes the
    global RNG (training runs stay reproducible whatever the refresh period)."""
    w = weight.detach().to(compute_dtype)
    out_f, in_f = w.shape
    if rank >= min(out_f, in_f):  # nothing to gain from sketching
        return svd_basis(weight, rank, compute_dtype)
    k = min(rank + oversample, min(out_f, in_f))
    if generator is None:
        generator = torch.Generator(device=w.device).manual_seed(0x6D6563)
    omega = torch.randn(out_f, k, generator=generator, device=w.device, dtype=compute_dtype)
    q, _ = torch.linalg.qr(w.t() @ omega)  # [in, k], spans the dominant row space of W
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(w @ q)  # [out, k]
        q, _ = torch.linalg.qr(w.t() @ q)  # [in, k]
    _, _, vh_small = torch.linalg.svd(w @ q, full_matrices=False)  # (W Q) = U S Vh_small
    basis = (q @ vh_small[:rank].t()).contiguous()
    # A weight of numerical rank below `rank` (all zeros, say) leaves the sketch rank-deficient and
    # the QRs return zero columns; the exact SVD completes the basis with null-space directions.
    gram = basis.t() @ basis
    if (gram - torch.eye(rank, dtype=gram.dtype, device=gram.device)).abs().max() > 1e-3:
        return svd_basis(weight, rank, compute_dtype)
    return basis
