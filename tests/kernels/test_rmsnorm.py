"""RMSNorm: every live backend against float64 math, forward and both gradients."""

import pytest
import torch
from numerics import DTYPES, assert_close, devices, live_implementations, non_contiguous

import mecefo_kernels as mk


def rmsnorm_f64(x, w, eps):
    x, w = x.double(), w.double()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def rmsnorm_hf(x, w, eps):
    """transformers' LlamaRMSNorm, run in x's dtype: the low-precision baseline."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def run(fn, x, w, dy):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


CASES = [((37, 48), False), ((3, 5, 80), False), ((2, 7, 48), True), ((1, 130), False)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,strided", CASES)
def test_matches_float64(device, dtype, shape, strided):
    eps = 1e-6
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    if strided:
        x, dy = non_contiguous(x), non_contiguous(dy)
    exact = run(lambda a, b: rmsnorm_f64(a, b, eps), x.double(), w.double(), dy.double())
    baseline = run(lambda a, b: rmsnorm_hf(a, b, eps), x, w, dy)
    impls = live_implementations("rmsnorm", device)
    assert "torch" in impls
    for impl in impls:
        got = run(lambda a, b: mk.rms_norm(a, b, eps, backend=impl), x, w, dy)
        for name, g, e, b in zip(("y", "dx", "dweight"), got, exact, baseline):
            assert g.dtype == dtype
            assert_close(f"{impl}/{name}", g, e, b)


@pytest.mark.parametrize("device", devices())
def test_float64_is_exact(device):
    x = torch.randn(37, 48, device=device, dtype=torch.float64)
    w = torch.randn(48, device=device, dtype=torch.float64)
    dy = torch.randn_like(x)
    exact = run(lambda a, b: rmsnorm_f64(a, b, 1e-5), x, w, dy)
    for impl in live_implementations("rmsnorm", device):
        if impl == "triton":
            continue  # triton kernels take fp16/bf16/fp32 only (checked below)
        got = run(lambda a, b: mk.rms_norm(a, b, 1e-5, backend=impl), x, w, dy)
        for g, e in zip(got, exact):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\)"):
        mk.rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has dtype torch.float32"):
        mk.rms_norm(x, torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mk.rms_norm(torch.ones(4, 8, dtype=torch.int64), torch.ones(8))
    with pytest.raises(ValueError, match="weight must be 1-D"):
        mk.rms_norm(x, torch.ones(1, 8))
    if "triton" in live_implementations("rmsnorm", "cpu"):
        with pytest.raises(TypeError, match="triton backend supports"):
            mk.rms_norm(x.double(), torch.ones(8, dtype=torch.float64), backend="triton")


def test_compiled_op_checks_are_real():
    """The C++ op validates its own arguments too (it is callable directly as torch.ops.mecefo.*)."""
    if "cpu" not in live_implementations("rmsnorm", "cpu"):
        pytest.skip("mecefo_kernels._C not loaded")
    with pytest.raises(RuntimeError, match="weight must have shape \\[8\\]"):
        torch.ops.mecefo.rmsnorm_fwd(torch.randn(4, 8), torch.ones(5), 1e-6)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        torch.ops.mecefo.rmsnorm_fwd(torch.randn(4), torch.ones(4), 1e-6)
