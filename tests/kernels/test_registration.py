"""Every registered op passes torch.library.opcheck, and the public functions compile with fullgraph."""

import pytest
import torch
from numerics import live_implementations

import mecefo_kernels as mk


def registered_rmsnorm_ops():
    impls = live_implementations("rmsnorm", "cpu")
    ops = []
    if "cpu" in impls:
        ops.append(("mecefo", torch.ops.mecefo))
    if "triton" in impls:
        ops.append(("mecefo_triton", torch.ops.mecefo_triton))
    return ops


@pytest.mark.parametrize("namespace", [n for n, _ in registered_rmsnorm_ops()])
def test_opcheck_rmsnorm(namespace):
    ns = dict(registered_rmsnorm_ops())[namespace]
    x = torch.randn(9, 24)
    w = torch.randn(24)
    y, rstd = ns.rmsnorm_fwd(x, w, 1e-6)
    torch.library.opcheck(ns.rmsnorm_fwd.default, (x, w, 1e-6))
    torch.library.opcheck(ns.rmsnorm_bwd.default, (torch.randn_like(y), x, w, rstd))


@pytest.mark.slow
def test_compile_fullgraph_rms_norm():
    impl = "cpu" if "cpu" in live_implementations("rmsnorm", "cpu") else "torch"
    x = torch.randn(2, 5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)

    def f(x, w):
        return mk.rms_norm(x, w, 1e-6, backend=impl).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, w)
    out.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = f(x, w)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
