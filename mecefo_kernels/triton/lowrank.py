"""MeCeFO's low-rank weight gradient as a chain of skinny Triton GEMMs.

Registered ops (``torch.ops.mecefo_triton.*``), same contracts as the reference
(mecefo_kernels/reference/lowrank.py):

* ``lowrank_project(x [T, in], basis [in, r]) -> x V [T, r]`` in x's dtype;
* ``lowrank_weight_grad(dy [T, out], xv [T, r], basis [in, r], out_dtype) -> dW [out, in]``
  as g = dy^T xv [out, r], then dW = g V^T: dy^T x [out, in] is never formed, so the cost is
  2 T r (in + out) + 2 r out in FLOPs instead of 2 T out in.

One GEMM kernel serves all three products through strides (dy^T is a transposed view). The
basis (float32 from lowrank_basis) is rounded to the activation dtype once per call, products
accumulate in fp32 and each result is rounded once on store: the math of the reference.
g = dy^T xv reduces over the tokens with few output tiles (out x r), so it is split over K
when that leaves SMs idle (launch.split_k). Exact fp32 products go to cuBLAS (launch.triton_gemm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (autotune_configs, check_dtype, device_guard, dot_mode, gemm_programs, grouped_tile, size_bucket,
                     split_k, tile_dot, tile_grid, triton_gemm)


def _tile(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# Skinny shapes: one side is the rank (tens to hundreds), the reduction is either the
# features (projection) or the tokens (dy^T xv, long K), or the rank (g V^T, short K).
_CONFIGS = autotune_configs([
    _tile(128, 128, 64, 8, 3), _tile(128, 64, 64, 4, 4), _tile(64, 128, 64, 4, 4), _tile(64, 64, 64, 4, 4),
    _tile(128, 32, 64, 4, 4), _tile(64, 32, 128, 4, 4), _tile(32, 64, 128, 4, 4),
], triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4))


# Autotune key: each size as its power-of-two bucket (the token count is M of x V and the
# reduction of dy^T xv, so keying on exact sizes re-tuned for every new batch shape); K_BUCKET
# is the reduction one program does (one split's). The buckets are not read by the kernel:
# they are arguments only so that the autotuner can key on them.
@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N_BUCKET", "K_BUCKET"])
@triton.jit
def _matmul_kernel(A, B, C, M, N, K, K_PER_SPLIT, stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm,
                   stride_cn, M_BUCKET, N_BUCKET, K_BUCKET, DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[s] [M, N] = A [M, K_s] @ B [K_s, N] over split s's K range (grid axis 1; one split: all of
    K), any strides, A and B of the same dtype, fp32 accumulation."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    k_first = split * K_PER_SPLIT
    acc = tile_dot(A + k_first * stride_ak, B + k_first * stride_bk, offs_m, offs_n, M, N,
                   tl.minimum(K - k_first, K_PER_SPLIT), stride_am, stride_ak, stride_bk, stride_bn, DOT_MODE,
                   BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(C + split * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, programs: int | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] (same dtype, any strides), accumulated in fp32, rounded once to out_dtype.
    `programs`: how many programs to aim for (default: enough to fill the device), which decides
    the split over K."""
    if not triton_gemm(a.dtype):  # exact fp32: cuBLAS
        return torch.mm(a, b).to(out_dtype)
    (m, k), n = a.shape, b.shape[1]
    splits, k_per_split = split_k(m, n, k, gemm_programs(a.device) if programs is None else programs)
    if splits == 1:
        c = out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    else:  # one fp32 partial per split, summed below in a fixed order
        c = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
    if m and n:
        with device_guard(a):
            _matmul_kernel[tile_grid(m, n, splits)](
                a, b, c, m, n, k, k_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                c.stride(0) if splits > 1 else 0, c.stride(-2), c.stride(-1), size_bucket(m), size_bucket(n),
                size_bucket(min(k, k_per_split)), DOT_MODE=dot_mode(a.dtype))
    if splits > 1:
        out = c.sum(0).to(out_dtype)
    return out


def _check_basis(op: str, basis: torch.Tensor, in_features: int, ref_name: str, ref: torch.Tensor) -> None:
    if basis.dim() != 2 or basis.shape[0] != in_features:
        raise ValueError(f"{op}: basis must have shape [{in_features}, rank], got {tuple(basis.shape)}")
    if basis.device != ref.device:
        raise ValueError(f"{op}: basis is on {basis.device} but {ref_name} is on {ref.device}")


@torch.library.custom_op("mecefo_triton::lowrank_project", mutates_args=())
def lowrank_project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    check_dtype("lowrank_project", x)
    if x.dim() != 2:
        raise ValueError(f"lowrank_project: x must be 2-D [tokens, in_features], got shape {tuple(x.shape)}")
    _check_basis("lowrank_project", basis, x.shape[1], "x", x)
    return _matmul(x, basis.to(x.dtype), x.dtype)  # the basis rounded once, as the reference does


@lowrank_project.register_fake
def _(x, basis):
    return x.new_empty((x.shape[0], basis.shape[1]))


@torch.library.custom_op("mecefo_triton::lowrank_weight_grad", mutates_args=())
def lowrank_weight_grad(dy: torch.Tensor, xv: torch.Tensor, basis: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    check_dtype("lowrank_weight_grad", dy)
    if dy.dim() != 2 or basis.dim() != 2 or xv.shape != (dy.shape[0], basis.shape[1]) or xv.dtype != dy.dtype:
        raise ValueError(f"lowrank_weight_grad: expected dy [T, out], basis [in, r] and xv [T, r] in dy's dtype; "
                         f"got dy {tuple(dy.shape)}, xv {tuple(xv.shape)} {xv.dtype}, basis {tuple(basis.shape)}")
    _check_basis("lowrank_weight_grad", basis, basis.shape[0], "dy", dy)
    g = _matmul(dy.t(), xv, dy.dtype)  # [out, r], reduced over the tokens: split over them when it helps
    # V^T [r, in] rounded and laid out row-major in one small copy: B's rows are then contiguous,
    # as in x V, so both products share one compiled variant
    return _matmul(g, basis.t().to(dy.dtype).contiguous(), out_dtype)  # [out, in]


@lowrank_weight_grad.register_fake
def _(dy, xv, basis, out_dtype):
    return dy.new_empty((dy.shape[1], basis.shape[0]), dtype=out_dtype)
