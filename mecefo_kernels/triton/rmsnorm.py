"""RMSNorm forward/backward as Triton kernels, registered as ``mecefo_triton::rmsnorm_{fwd,bwd}``.

Same contract as the reference (mecefo_kernels/reference/rmsnorm.py): x [T, d] with a
contiguous last dimension (any row stride), weight [d]; rstd [T] float32.

A program holds a whole row in registers; its warps grow with the row (launch.row_launch), so
the backward's four row-sized values per thread (x, dy, w, the dweight accumulator) fit in
registers without spilling at every LLaMA width (d <= 8192).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import check_dtype, device_guard, persistent_programs, row_launch


@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, D, eps, BLOCK_D: tl.constexpr):
    # One program per row: the whole row sits in registers, read once, written once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    # Round xhat to the activation dtype before the weight multiply (HF LlamaRMSNorm order).
    xhat = (x * rstd).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * xhat).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, D,
                        BLOCK_D: tl.constexpr):
    # Grid-stride over rows; each program accumulates its own dweight partial row in
    # registers and writes it once, so no atomics and a deterministic sum afterwards.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Advance pointers rather than multiplying row * stride: pointer arithmetic is 64-bit,
    # so huge T*d cannot overflow a 32-bit row offset.
    x_ptr = X + pid * stride_x
    dy_ptr = DY + pid * stride_dy
    dx_ptr = DX + pid * stride_dx
    for row in range(pid, n_rows, programs):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        gw = g * w
        mean = tl.sum(gw * xhat, axis=0) / D
        tl.store(dx_ptr + cols, (rstd * (gw - xhat * mean)).to(DX.dtype.element_ty), mask=mask)
        dw += g * xhat
        x_ptr += programs * stride_x
        dy_ptr += programs * stride_dy
        dx_ptr += programs * stride_dx
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)


def _rows_view(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [tokens, hidden], got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


@torch.library.custom_op("mecefo_triton::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_dtype("rmsnorm_fwd", x)
    x = _rows_view("x", x)
    weight = weight.contiguous()
    rows, d = x.shape
    y = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    launch = row_launch(d)
    if rows:
        with device_guard(x):
            _rmsnorm_fwd_kernel[(rows,)](x, weight, y, rstd, x.stride(0), y.stride(0), d, eps, BLOCK_D=launch.block,
                                         num_warps=launch.num_warps)
    return y, rstd


@rmsnorm_fwd.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("mecefo_triton::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_dtype("rmsnorm_bwd", x)
    x, dy = _rows_view("x", x), _rows_view("dy", dy.to(x.dtype))
    rstd = rstd.contiguous()
    weight = weight.contiguous()
    rows, d = x.shape
    dx = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    launch = row_launch(d)
    # about 32 resident warps per SM whatever the row width
    programs = persistent_programs(x.device, rows, per_sm=max(1, 32 // launch.num_warps))
    partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    if rows:
        with device_guard(x):
            _rmsnorm_bwd_kernel[(programs,)](dy, x, weight, rstd, dx, partial, dy.stride(0), x.stride(0),
                                             dx.stride(0), rows, d, BLOCK_D=launch.block, num_warps=launch.num_warps)
    else:
        partial.zero_()
    return dx, partial.sum(0).to(weight.dtype)


@rmsnorm_bwd.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)
