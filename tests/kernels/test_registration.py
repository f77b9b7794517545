"""Every registered op passes torch.library.opcheck, and the public functions compile with fullgraph."""

import pytest
import torch
from numerics import live_implementations

import mecefo_kernels as mk
from mecefo_kernels.memory import SavedTensors


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


# --------------------------------------------------------------------------- SwiGLU FFN and low-rank


def primitive_ops():
    """(namespace, op name, args) for every registered FFN/low-rank primitive live here."""
    t, d, h, r = 9, 24, 40, 5
    a, u, dp = torch.randn(t, h), torch.randn(t, h), torch.randn(t, h)
    x, basis = torch.randn(t, d), torch.linalg.qr(torch.randn(d, r))[0]
    dy, xv = torch.randn(t, h), torch.randn(t, r)
    shared = [("swiglu_fwd", (a, u)), ("swiglu_bwd", (dp, a, u)), ("lowrank_project", (x, basis)),
              ("lowrank_weight_grad", (dy, xv, basis, torch.float32))]
    z, wg, wu, wd = torch.randn(t, d), torch.randn(h, d), torch.randn(h, d), torch.randn(d - 4, h)
    triton_only = [("gate_up_swiglu", (z, wg, wu, True)), ("gate_up_swiglu", (z, wg, wu, False)),
                   ("gate_up_swiglu_bwd", (z, wg, wu, torch.randn(t, d - 4), wd))]
    cases = []
    if "cpu" in live_implementations("swiglu_ffn", "cpu"):
        cases += [("mecefo", name, args) for name, args in shared]
    if "triton" in live_implementations("swiglu_ffn", "cpu"):
        cases += [("mecefo_triton", name, args) for name, args in shared + triton_only]
    return cases


@pytest.mark.parametrize("namespace,name,args", [pytest.param(*c, id=f"{c[0]}.{c[1]}-{i}")
                                                 for i, c in enumerate(primitive_ops())])
def test_opcheck_ffn_primitives(namespace, name, args):
    torch.library.opcheck(getattr(getattr(torch.ops, namespace), name).default, args)


def ffn_args(impl, norm, recompute, ranks):
    t, d, h, d_out = 7, 24, 40, 16
    x = torch.randn(t, d, requires_grad=True)
    weights = [torch.randn(h, d) / 5, torch.randn(h, d) / 5, torch.randn(d_out, h) / 6]
    weights = [w.requires_grad_() for w in weights]
    norm_weight = torch.randn(d, requires_grad=True) if norm else None
    bases = [None] * 3 if ranks is None else [mk.lowrank_basis(w, r) for w, r in zip(weights, ranks)]
    return (x, *weights, norm_weight, *bases, 1e-6, recompute, impl)


# The public functions are registered ops (mecefo_api::*) with autograd formulas, so opcheck
# runs on them too: schema, fake tensors, autograd registration and AOT dispatch.
@pytest.mark.parametrize("impl", live_implementations("swiglu_ffn", "cpu"))
@pytest.mark.parametrize("norm,recompute,ranks", [(True, True, (4, 6, 8)), (False, False, None)],
                         ids=["neighbour", "plain"])
def test_opcheck_swiglu_ffn(impl, norm, recompute, ranks):
    args = ffn_args(impl, norm, recompute, ranks)
    torch.library.opcheck(torch.ops.mecefo_api.swiglu_ffn.default, args)
    x, wg, wu, wd, nw, vg, vu, vd, eps, _, _ = args
    _, a, u = torch.ops.mecefo_api.swiglu_ffn(*args)
    saved = (None, None) if recompute else (a.detach(), u.detach())
    dy = torch.randn(x.shape[0], wd.shape[0])
    detached = [None if t is None else t.detach() for t in (x, wg, wu, wd, nw)]
    for needs in ([True] * 5, [False, True, False, True, norm]):
        torch.library.opcheck(torch.ops.mecefo_api.swiglu_ffn_backward.default,
                              (dy, detached[0], *saved, *detached[1:], vg, vu, vd, eps, impl, needs))


@pytest.mark.parametrize("impl", live_implementations("lowrank", "cpu"))
def test_opcheck_lowrank_linear(impl):
    x, weight, bias = torch.randn(7, 24, requires_grad=True), torch.randn(16, 24, requires_grad=True), torch.randn(16)
    basis = mk.lowrank_basis(weight, 5)
    torch.library.opcheck(torch.ops.mecefo_api.lowrank_linear.default, (x, weight, basis, bias, True, impl))
    frozen = weight.detach()  # project=False: the weight needs no gradient, x V is not computed
    torch.library.opcheck(torch.ops.mecefo_api.lowrank_linear.default, (x, frozen, basis, None, False, impl))
    xv = torch.ops.mecefo_api.lowrank_linear(x, weight, basis, bias, True, impl)[1].detach()
    torch.library.opcheck(torch.ops.mecefo_api.lowrank_linear_backward.default,
                          (torch.randn(7, 16), weight.detach(), basis, xv, impl, [True, True, True]))


def compiled_impl(family):
    return "cpu" if "cpu" in live_implementations(family, "cpu") else "torch"


@pytest.mark.slow
def test_compile_fullgraph_swiglu_ffn_keeps_recompute():
    """torch.compile(fullgraph=True) of the neighbour-mode FFN gives eager's values and
    gradients, and still saves only x: the block is one opaque op, so the partitioner cannot
    trade the recompute for saved a and u (it does when the same math is traced as PyTorch)."""
    impl = compiled_impl("swiglu_ffn")
    t, d, h = 10, 24, 40
    x = torch.randn(2, t // 2, d, requires_grad=True)
    wg, wu = torch.randn(h, d, requires_grad=True), torch.randn(h, d, requires_grad=True)
    wd, nw = torch.randn(d, h, requires_grad=True), torch.randn(d, requires_grad=True)
    bases = tuple(mk.lowrank_basis(w, 6) for w in (wg, wu, wd))
    params = (wg, wu, wd, nw)

    def f(x):
        return mk.swiglu_ffn(x, wg, wu, wd, norm_weight=nw, recompute=True, bases=bases, backend=impl)

    with SavedTensors(exclude=params + bases) as saved:
        out = torch.compile(f, fullgraph=True)(x)
    assert saved.bytes <= x.numel() * x.element_size() + 4 * t
    out.square().sum().backward()
    got = [out.detach()] + [p.grad.clone() for p in (x, *params)]
    for p in (x, *params):
        p.grad = None
    ref = f(x)
    ref.square().sum().backward()
    for g, e in zip(got, [ref.detach()] + [p.grad for p in (x, *params)]):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
def test_compile_fullgraph_lowrank_linear():
    impl = compiled_impl("lowrank")
    x = torch.randn(3, 5, 24, requires_grad=True)
    weight, bias = torch.randn(16, 24, requires_grad=True), torch.randn(16, requires_grad=True)
    basis = mk.lowrank_basis(weight, 6)

    def f(x):
        return mk.lowrank_linear(x, weight, basis, bias, backend=impl).square().sum()

    out = torch.compile(f, fullgraph=True)(x)
    out.backward()
    got = [out.detach()] + [p.grad.clone() for p in (x, weight, bias)]
    x.grad = weight.grad = bias.grad = None
    f(x).backward()
    for g, e in zip(got, [f(x).detach(), x.grad, weight.grad, bias.grad]):
        torch.testing.assert_close(g, e)
