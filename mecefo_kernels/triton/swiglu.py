"""SwiGLU as Triton kernels: elementwise forward/backward, and GEMMs with SwiGLU epilogues.

Registered ops (``torch.ops.mecefo_triton.*``), same contracts as the reference
(mecefo_kernels/reference/swiglu.py) with z [T, d], w_gate/w_up [h, d], w_down [d_out, h]:

* ``swiglu_fwd(a, u) -> p`` and ``swiglu_bwd(dp, a, u) -> (da, du, p)``: one elementwise
  pass each, any shape.
* ``gate_up_swiglu(z, w_gate, w_up, store_preact) -> (p, a, u)``: the gate and up GEMMs in
  one kernel (two fp32 accumulators over the same z tiles) with the SwiGLU in the epilogue,
  so only p is written; a and u too when ``store_preact`` (the non-recompute forward saves
  them), else they come back as empty [0, h] tensors.
* ``gate_up_swiglu_bwd(z, w_gate, w_up, dy, w_down) -> (da, du, p)``: the recompute
  backward. Each [tokens, h] tile computes a = z Wg^T, u = z Wu^T and dp = dy Wd in fp32
  accumulators and applies the SwiGLU backward in the epilogue: a, u and dp never reach
  memory. p is written because the down projection's weight gradient needs it (exact, or
  projected onto V_down).

a, u and dp are rounded to the activation dtype before the epilogue, exactly as when they
are materialised (the non-recompute path and the other backends), so every mode rounds at the
same points: under the interpreter the results differ only by the GEMMs' summation order; on a
GPU also by up to one ulp of the activation dtype in rare elements, because there tl.exp and
the division lower to approximate instructions (ex2.approx.f32, div.full.f32) where torch uses
IEEE-rounded expf and division (README, "GPU numerics").

fp16 and bf16 GEMMs run on tensor cores. fp32 GEMMs run here only as TF32, when torch allows
TF32 for fp32 matmuls; exact fp32 runs as cuBLAS GEMMs followed by the elementwise kernels
(launch.triton_gemm says why).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (autotune_configs, block_k_for_operand_size, check_dtype, device_guard, dot_mode,
                     elementwise_block, grouped_tile, mma, size_bucket, tile_dot, tile_grid, triton_gemm)


@triton.jit
def swiglu_math(a, u):
    """p = silu(a) * u in fp32 (same expressions as csrc/swiglu_math.h)."""
    return a * (1.0 / (1.0 + tl.exp(-a))) * u


@triton.jit
def swiglu_grads_math(dp, a, u):
    """(da, du, p) in fp32: da = dp u silu'(a), du = dp silu(a), p = silu(a) u."""
    s = 1.0 / (1.0 + tl.exp(-a))
    silu = a * s
    return dp * u * (s * (1.0 + a * (1.0 - s))), dp * silu, silu * u


# ------------------------------------------------------------------ elementwise


@triton.jit
def _swiglu_fwd_kernel(A, U, P, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(P + offs, swiglu_math(a, u).to(P.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DP, A, U, DA, DU, P, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    da, du, p = swiglu_grads_math(g, a, u)
    tl.store(DA + offs, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)


def _check_operands(op: str, a: torch.Tensor, **others: torch.Tensor) -> None:
    check_dtype(op, a)
    for name, t in others.items():
        if t.shape != a.shape or t.dtype != a.dtype or t.device != a.device:
            raise ValueError(f"{op}: {name} must match a (shape {tuple(a.shape)}, {a.dtype}, {a.device}), got "
                             f"shape {tuple(t.shape)}, {t.dtype}, {t.device}")


@torch.library.custom_op("mecefo_triton::swiglu_fwd", mutates_args=())
def swiglu_fwd(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    _check_operands("swiglu_fwd", a, u=u)
    a, u = a.contiguous(), u.contiguous()
    p = torch.empty_like(a)
    n = a.numel()
    if n:
        block = elementwise_block()
        with device_guard(a):
            _swiglu_fwd_kernel[(triton.cdiv(n, block),)](a, u, p, n, BLOCK=block)
    return p


@swiglu_fwd.register_fake
def _(a, u):
    return a.new_empty(a.shape)


@torch.library.custom_op("mecefo_triton::swiglu_bwd", mutates_args=())
def swiglu_bwd(dp: torch.Tensor, a: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_operands("swiglu_bwd", a, u=u, dp=dp)
    dp, a, u = dp.contiguous(), a.contiguous(), u.contiguous()
    da, du, p = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    n = a.numel()
    if n:
        block = elementwise_block()
        with device_guard(a):
            _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dp, a, u, da, du, p, n, BLOCK=block)
    return da, du, p


@swiglu_bwd.register_fake
def _(dp, a, u):
    return a.new_empty(a.shape), a.new_empty(a.shape), a.new_empty(a.shape)


# ------------------------------------------------------------------ GEMMs with SwiGLU epilogues

_INTERPRETER_TILE = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4)


def _tile(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# Two [BLOCK_M, BLOCK_N] fp32 accumulators per program (gate and up): H100-sized tiles (the
# largest is the 128x256 output tile of Triton's own H100 matmul configs, split in two).
_FWD_CONFIGS = autotune_configs([
    _tile(128, 128, 64, 8, 3), _tile(128, 64, 64, 4, 4), _tile(64, 128, 64, 4, 4),
    _tile(128, 64, 32, 4, 5), _tile(64, 64, 64, 4, 4),
], _INTERPRETER_TILE)
# Three accumulators (gate, up, dp): at most 96 fp32 accumulator registers per thread.
_BWD_CONFIGS = autotune_configs([
    _tile(128, 64, 64, 8, 3), _tile(64, 128, 64, 8, 3), _tile(64, 64, 64, 4, 4), _tile(64, 64, 32, 4, 5),
], _INTERPRETER_TILE)


@triton.jit
def _dual_dot(Z, WG, WU, offs_m, offs_n, M, N, K, stride_zm, stride_zk, stride_wn, stride_wk,
              DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(z Wg^T, z Wu^T) for one [BLOCK_M, BLOCK_N] tile, fp32: each z tile is loaded once for both."""
    offs_k = tl.arange(0, BLOCK_K)
    z_ptrs = Z + offs_m[:, None] * stride_zm + offs_k[None, :] * stride_zk
    w_offs = offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] = W^T tile
    wg_ptrs = WG + w_offs
    wu_ptrs = WU + w_offs
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[None, :] < N
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        z = tl.load(z_ptrs, mask=m_mask & (offs_k[None, :] < k_left), other=0.0)
        w_mask = (offs_k[:, None] < k_left) & n_mask
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        acc_a = mma(z, wg, acc_a, DOT_MODE)
        acc_u = mma(z, wu, acc_u, DOT_MODE)
        z_ptrs += BLOCK_K * stride_zk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    return acc_a, acc_u


# Autotune keys: the token count M as its power-of-two bucket M_BUCKET (launch.size_bucket), and
# whether a and u are stored (two more [M, N] writes change the best tile). M_BUCKET is not read
# by the kernels; it is an argument only so that the autotuner can key on it.
@triton.autotune(configs=_FWD_CONFIGS, key=["M_BUCKET", "N", "K", "STORE_PREACT"],
                 prune_configs_by={"early_config_prune": block_k_for_operand_size})
@triton.jit
def _gate_up_swiglu_fwd_kernel(Z, WG, WU, P, A, U, M, N, K, stride_zm, stride_zk, stride_wn, stride_wk, M_BUCKET,
                               STORE_PREACT: tl.constexpr, DOT_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_a, acc_u = _dual_dot(Z, WG, WU, offs_m, offs_n, M, N, K, stride_zm, stride_zk, stride_wn, stride_wk,
                             DOT_MODE, BLOCK_M, BLOCK_N, BLOCK_K)
    out_ty = P.dtype.element_ty
    a = acc_a.to(out_ty)
    u = acc_u.to(out_ty)
    p = swiglu_math(a.to(tl.float32), u.to(tl.float32))
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(P + offs, p.to(out_ty), mask=mask)
    if STORE_PREACT:
        tl.store(A + offs, a, mask=mask)
        tl.store(U + offs, u, mask=mask)


@triton.autotune(configs=_BWD_CONFIGS, key=["M_BUCKET", "N", "K", "K_OUT"],
                 prune_configs_by={"early_config_prune": block_k_for_operand_size})
@triton.jit
def _gate_up_swiglu_bwd_kernel(Z, WG, WU, DY, WD, DA, DU, P, M, N, K, K_OUT, stride_zm, stride_zk, stride_wn,
                               stride_wk, stride_dym, stride_dyk, stride_wdk, stride_wdn, M_BUCKET,
                               DOT_MODE: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_a, acc_u = _dual_dot(Z, WG, WU, offs_m, offs_n, M, N, K, stride_zm, stride_zk, stride_wn, stride_wk,
                             DOT_MODE, BLOCK_M, BLOCK_N, BLOCK_K)
    # dp = dy Wd over the output features: Wd is [K_OUT, N], so its [BLOCK_K, BLOCK_N] tiles
    # are read along contiguous rows.
    acc_dp = tile_dot(DY, WD, offs_m, offs_n, M, N, K_OUT, stride_dym, stride_dyk, stride_wdk, stride_wdn, DOT_MODE,
                      BLOCK_M, BLOCK_N, BLOCK_K)
    out_ty = P.dtype.element_ty
    da, du, p = swiglu_grads_math(acc_dp.to(out_ty).to(tl.float32), acc_a.to(out_ty).to(tl.float32),
                                  acc_u.to(out_ty).to(tl.float32))
    offs = offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(DA + offs, da.to(out_ty), mask=mask)
    tl.store(DU + offs, du.to(out_ty), mask=mask)
    tl.store(P + offs, p.to(out_ty), mask=mask)


def _check_gate_up(op: str, z: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> None:
    check_dtype(op, z)
    if z.dim() != 2 or w_gate.dim() != 2 or w_gate.shape[1] != z.shape[1] or w_up.shape != w_gate.shape:
        raise ValueError(f"{op}: expected z [T, d], w_gate and w_up [h, d]; got z {tuple(z.shape)}, "
                         f"w_gate {tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up)):
        if w.dtype != z.dtype or w.device != z.device:
            raise ValueError(f"{op}: {name} must have z's dtype and device ({z.dtype}, {z.device}), got "
                             f"{w.dtype}, {w.device}")


@torch.library.custom_op("mecefo_triton::gate_up_swiglu", mutates_args=())
def gate_up_swiglu(z: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   store_preact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_gate_up("gate_up_swiglu", z, w_gate, w_up)
    (m, k), n = z.shape, w_gate.shape[0]
    if not triton_gemm(z.dtype):  # exact fp32: cuBLAS GEMMs, then the elementwise SwiGLU
        a, u = z @ w_gate.t(), z @ w_up.t()
        p = swiglu_fwd(a, u)
        if not store_preact:
            a, u = z.new_empty((0, n)), z.new_empty((0, n))
        return p, a, u
    w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    p = torch.empty((m, n), dtype=z.dtype, device=z.device)
    rows = m if store_preact else 0
    a = torch.empty((rows, n), dtype=z.dtype, device=z.device)
    u = torch.empty((rows, n), dtype=z.dtype, device=z.device)
    if m and n:
        with device_guard(z):
            _gate_up_swiglu_fwd_kernel[tile_grid(m, n)](
                z, w_gate, w_up, p, a, u, m, n, k, z.stride(0), z.stride(1), w_gate.stride(0), w_gate.stride(1),
                size_bucket(m), STORE_PREACT=store_preact, DOT_MODE=dot_mode(z.dtype))
    return p, a, u


@gate_up_swiglu.register_fake
def _(z, w_gate, w_up, store_preact):
    m, n = z.shape[0], w_gate.shape[0]
    rows = m if store_preact else 0
    return z.new_empty((m, n)), z.new_empty((rows, n)), z.new_empty((rows, n))


@torch.library.custom_op("mecefo_triton::gate_up_swiglu_bwd", mutates_args=())
def gate_up_swiglu_bwd(z: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, dy: torch.Tensor,
                       w_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_gate_up("gate_up_swiglu_bwd", z, w_gate, w_up)
    (m, k), n = z.shape, w_gate.shape[0]
    if w_down.dim() != 2 or w_down.shape[1] != n or dy.shape != (m, w_down.shape[0]):
        raise ValueError(f"gate_up_swiglu_bwd: expected w_down [d_out, h={n}] and dy [T={m}, d_out]; got "
                         f"w_down {tuple(w_down.shape)}, dy {tuple(dy.shape)}")
    if dy.dtype != z.dtype or w_down.dtype != z.dtype:
        raise ValueError(f"gate_up_swiglu_bwd: dy and w_down must have z's dtype {z.dtype}, got {dy.dtype}, "
                         f"{w_down.dtype}")
    if not triton_gemm(z.dtype):  # exact fp32: cuBLAS GEMMs, then the elementwise SwiGLU backward
        return swiglu_bwd(dy @ w_down, z @ w_gate.t(), z @ w_up.t())
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
    da = torch.empty((m, n), dtype=z.dtype, device=z.device)
    du, p = torch.empty_like(da), torch.empty_like(da)
    if m and n:
        with device_guard(z):
            _gate_up_swiglu_bwd_kernel[tile_grid(m, n)](
                z, w_gate, w_up, dy, w_down, da, du, p, m, n, k, w_down.shape[0], z.stride(0), z.stride(1),
                w_gate.stride(0), w_gate.stride(1), dy.stride(0), dy.stride(1), w_down.stride(0), w_down.stride(1),
                size_bucket(m), DOT_MODE=dot_mode(z.dtype))
    return da, du, p


@gate_up_swiglu_bwd.register_fake
def _(z, w_gate, w_up, dy, w_down):
    shape = (z.shape[0], w_gate.shape[0])
    return z.new_empty(shape), z.new_empty(shape), z.new_empty(shape)
