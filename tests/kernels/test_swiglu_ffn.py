"""swiglu_ffn: every live backend against float64 math written from the formulas, forward and
every gradient, exact and low-rank, with and without recompute; saved activations; errors."""

import pytest
import torch
from numerics import DTYPES, assert_close, devices, live_implementations, non_contiguous

import mecefo_kernels as mk
from mecefo_kernels.memory import SavedTensors

EPS = 1e-6


def silu(a):
    return a * torch.sigmoid(a)


def low_rank(g, inp, basis):
    """dW = g^T inp, or MeCeFO's g^T (inp V) V^T."""
    return g.t() @ inp if basis is None else (g.t() @ (inp @ basis)) @ basis.t()


def ffn_f64(x, w_gate, w_up, w_down, norm_weight, bases, dy):
    """The oracle, in float64 from the formulas: -> (y, dx, dw_gate, dw_up, dw_down, dnorm_weight)."""
    x, w_gate, w_up, w_down, dy = (t.double().reshape(-1, t.shape[-1]) for t in (x, w_gate, w_up, w_down, dy))
    v_gate, v_up, v_down = (None,) * 3 if bases is None else (v.double() for v in bases)
    x.requires_grad_()
    if norm_weight is None:
        z = x
    else:
        norm_weight = norm_weight.double().requires_grad_()
        z = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * norm_weight
    a, u = z @ w_gate.t(), z @ w_up.t()
    p = silu(a) * u
    y = p @ w_down.t()
    dp = dy @ w_down
    s = torch.sigmoid(a)
    da, du = dp * u * s * (1 + a * (1 - s)), dp * silu(a)
    dz = da @ w_gate + du @ w_up
    if norm_weight is None:
        dx, dnorm = dz, None
    else:  # RMSNorm's own backward: autograd of the float64 formula above
        dx, dnorm = torch.autograd.grad(z, (x, norm_weight), dz)
    z = z.detach()
    return (y, dx, low_rank(da, z, v_gate), low_rank(du, z, v_up), low_rank(dy, p, v_down), dnorm)


def ffn_eager(x, w_gate, w_up, w_down, norm_weight, bases, dy):
    """The low-precision baseline: the transformers LLaMA MLP (and LlamaRMSNorm) run in x's dtype
    with autograd; low-rank weight gradients from its own intermediates, in x's dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_gate, w_up, w_down)]
    x, w_gate, w_up, w_down = leaves
    rows = x.reshape(-1, x.shape[-1])
    if norm_weight is None:
        z = rows
    else:
        norm_weight = norm_weight.detach().clone().requires_grad_()
        h = rows.float()
        z = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(rows.dtype)
    a, u = z @ w_gate.t(), z @ w_up.t()
    a.retain_grad()
    u.retain_grad()
    p = torch.nn.functional.silu(a) * u
    y = p @ w_down.t()
    dy = dy.reshape(y.shape)
    y.backward(dy)
    grads = [w_gate.grad, w_up.grad, w_down.grad]
    if bases is not None:
        v_gate, v_up, v_down = (v.to(x.dtype) for v in bases)
        grads = [low_rank(a.grad, z.detach(), v_gate), low_rank(u.grad, z.detach(), v_up),
                 low_rank(dy, p.detach(), v_down)]
    return (y.detach(), x.grad.reshape(-1, x.shape[-1]), *grads, None if norm_weight is None else norm_weight.grad)


def ffn_mecefo(x, w_gate, w_up, w_down, norm_weight, bases, dy, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_gate, w_up, w_down)]
    x, w_gate, w_up, w_down = leaves
    if norm_weight is not None:
        norm_weight = norm_weight.detach().clone().requires_grad_()
    y = mk.swiglu_ffn(x, w_gate, w_up, w_down, norm_weight=norm_weight, eps=EPS, bases=bases, **kwargs)
    y.backward(dy)
    return (y.detach().reshape(-1, y.shape[-1]), x.grad.reshape(-1, x.shape[-1]), w_gate.grad, w_up.grad,
            w_down.grad, None if norm_weight is None else norm_weight.grad)


def make_problem(shape, h, d_out, norm, ranks, dtype, device="cpu"):
    """-> (x, w_gate, w_up, w_down, norm_weight or None, bases or None, dy) in dtype, O(1) activations.
    bases come from lowrank_basis (float32) for the given ranks."""
    d = shape[-1]
    x = torch.randn(shape, device=device) * 2
    w_gate = torch.randn(h, d, device=device) / d**0.5
    w_up = torch.randn(h, d, device=device) / d**0.5
    w_down = torch.randn(d_out, h, device=device) / h**0.5
    norm_weight = (1 + 0.3 * torch.randn(d, device=device)) if norm else None
    dy = torch.randn(*shape[:-1], d_out, device=device)
    x, w_gate, w_up, w_down, dy = (t.to(dtype) for t in (x, w_gate, w_up, w_down, dy))
    norm_weight = None if norm_weight is None else norm_weight.to(dtype)
    bases = None if ranks is None else tuple(mk.lowrank_basis(w, r) for w, r in zip((w_gate, w_up, w_down), ranks))
    return x, w_gate, w_up, w_down, norm_weight, bases, dy


NAMES = ("y", "dx", "dw_gate", "dw_up", "dw_down", "dnorm_weight")
# (x shape, h, d_out, RMSNorm in front, recompute, ranks of (V_gate, V_up, V_down) or None, strided x)
CASES = [
    pytest.param((37, 48), 80, 48, True, False, None, False, id="T37-exact"),
    pytest.param((37, 48), 80, 48, True, True, None, False, id="T37-recompute"),
    pytest.param((37, 48), 80, 48, True, False, (8, 8, 16), False, id="T37-lowrank"),
    pytest.param((3, 5, 48), 80, 40, False, True, (8, 12, 16), False, id="3d-nonorm-recompute-lowrank"),
    pytest.param((2, 7, 48), 80, 48, True, True, (12, 8, 16), True, id="strided-recompute-lowrank"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,h,d_out,norm,recompute,ranks,strided", CASES)
def test_matches_float64(device, dtype, shape, h, d_out, norm, recompute, ranks, strided):
    x, w_gate, w_up, w_down, norm_weight, bases, dy = make_problem(shape, h, d_out, norm, ranks, dtype, device)
    if strided:
        x, dy = non_contiguous(x), non_contiguous(dy)
    args = (x, w_gate, w_up, w_down, norm_weight, bases, dy)
    exact = ffn_f64(*args)
    baseline = ffn_eager(*args)
    impls = live_implementations("swiglu_ffn", device)
    assert "torch" in impls
    for impl in impls:
        got = ffn_mecefo(*args, recompute=recompute, backend=impl)
        for name, g, e, b in zip(NAMES, got, exact, baseline):
            if e is None:
                assert g is None, f"{impl}/{name}: gradient for an absent norm weight"
                continue
            assert g.dtype == dtype, f"{impl}/{name}: dtype {g.dtype}"
            assert_close(f"{impl}/{name}", g, e, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_float64_is_exact(device, recompute):
    """In float64 every backend but triton (fp16/bf16/fp32 only) is the formula to rounding, and
    full-rank bases (rank = in_features) give the exact weight gradients."""
    x, w_gate, w_up, w_down, norm_weight, _, dy = make_problem((37, 48), 80, 48, True, None, torch.float64, device)
    full = (torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64, device=device))[0],
            mk.lowrank_basis(w_up, 48), mk.lowrank_basis(w_down, 80))
    for bases in (None, full):
        exact = ffn_f64(x, w_gate, w_up, w_down, norm_weight, None, dy)
        for impl in live_implementations("swiglu_ffn", device):
            if impl == "triton":
                continue
            got = ffn_mecefo(x, w_gate, w_up, w_down, norm_weight, bases, dy, recompute=recompute, backend=impl)
            for name, g, e in zip(NAMES, got, exact):
                torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"{impl}/{name}: {m}")


@pytest.mark.parametrize("device", devices())
def test_recompute_changes_nothing(device):
    """recompute=True repeats the forward's arithmetic: bitwise the same gradients on the
    backends that recompute with the same kernels (triton fuses the recompute into its
    backward GEMM, so there the agreement is to rounding, covered by test_matches_float64)."""
    x, w_gate, w_up, w_down, norm_weight, bases, dy = make_problem((37, 48), 80, 48, True, (8, 8, 16),
                                                                    torch.float32, device)
    for impl in live_implementations("swiglu_ffn", device):
        if impl == "triton":
            continue
        saved = ffn_mecefo(x, w_gate, w_up, w_down, norm_weight, bases, dy, recompute=False, backend=impl)
        recomputed = ffn_mecefo(x, w_gate, w_up, w_down, norm_weight, bases, dy, recompute=True, backend=impl)
        for name, s, r in zip(NAMES, saved, recomputed):
            assert torch.equal(s, r), f"{impl}/{name} differs with recompute=True"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "nonorm"])
def test_recompute_saves_only_x(device, norm):
    """recompute=True: non-parameter bytes saved <= x's bytes + one float per token; without it,
    a and u are saved too (so the measurement sees what it should)."""
    t, d, h = 2 * 9, 48, 80
    x, w_gate, w_up, w_down, norm_weight, bases, _ = make_problem((2, 9, d), h, d, norm, (8, 8, 16),
                                                                   torch.bfloat16, device)
    params = [w.requires_grad_() for w in (w_gate, w_up, w_down)] + ([norm_weight.requires_grad_()] if norm else [])
    x.requires_grad_()
    x_bytes = x.numel() * x.element_size()
    for impl in live_implementations("swiglu_ffn", device):
        for bases_arg in (None, bases):
            def run(recompute):
                with SavedTensors(exclude=params + list(bases)) as saved:
                    y = mk.swiglu_ffn(x, w_gate, w_up, w_down, norm_weight=norm_weight, recompute=recompute,
                                      bases=bases_arg, backend=impl)
                return saved.bytes, y
            saved, y = run(True)
            assert saved <= x_bytes + 4 * t, f"{impl}: recompute=True saved {saved} bytes, x has {x_bytes}"
            y.sum().backward()  # the saved set suffices
            not_recomputed, _ = run(False)
            assert not_recomputed >= x_bytes + 2 * t * h * x.element_size(), f"{impl}: a and u not seen"


@pytest.mark.parametrize("device", devices())
def test_bases_and_inputs_without_grad(device):
    """Bases get no gradient; only the tensors that require grad get one; no_grad saves nothing."""
    x, w_gate, w_up, w_down, norm_weight, bases, _ = make_problem((5, 48), 80, 48, True, (8, 8, 16),
                                                                   torch.float32, device)
    bases = tuple(v.requires_grad_() for v in bases)
    w_up.requires_grad_()
    for impl in live_implementations("swiglu_ffn", device):
        y = mk.swiglu_ffn(x, w_gate, w_up, w_down, norm_weight=norm_weight, recompute=True, bases=bases, backend=impl)
        y.sum().backward()
        assert w_up.grad is not None and w_up.grad.shape == w_up.shape
        assert all(t.grad is None for t in (x, w_gate, w_down, norm_weight, *bases))
        w_up.grad = None
        with torch.no_grad():
            assert not mk.swiglu_ffn(x, w_gate, w_up, w_down, backend=impl).requires_grad


def test_bad_inputs_name_the_argument():
    d, h = 8, 12
    x = torch.randn(4, d)
    wg, wu, wd = torch.randn(h, d), torch.randn(h, d), torch.randn(d, h)
    with pytest.raises(ValueError, match=r"w_gate must have shape \(12, 8\)"):
        mk.swiglu_ffn(x, torch.randn(h, d + 1), wu, wd)
    with pytest.raises(ValueError, match=r"w_up must have shape \(12, 8\)"):
        mk.swiglu_ffn(x, wg, torch.randn(h + 1, d), wd)
    with pytest.raises(ValueError, match=r"w_down must have shape \(8, 12\) \(\[d_out, h\] with h=12"):
        mk.swiglu_ffn(x, wg, wu, torch.randn(d, h + 1))
    with pytest.raises(ValueError, match="w_down must be 2-D"):
        mk.swiglu_ffn(x, wg, wu, torch.randn(h))
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(8,\)"):
        mk.swiglu_ffn(x, wg, wu, wd, norm_weight=torch.ones(d, 1))
    with pytest.raises(TypeError, match="w_up has dtype torch.bfloat16 but x has dtype torch.float32"):
        mk.swiglu_ffn(x, wg, wu.bfloat16(), wd)
    with pytest.raises(TypeError, match="norm_weight has dtype torch.float64"):
        mk.swiglu_ffn(x, wg, wu, wd, norm_weight=torch.ones(d, dtype=torch.float64))
    with pytest.raises(ValueError, match="w_gate is on meta but x is on cpu"):
        mk.swiglu_ffn(x, wg.to("meta"), wu, wd)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mk.swiglu_ffn(torch.ones(4, d, dtype=torch.int32), wg, wu, wd)
    with pytest.raises(TypeError, match="w_down must be a torch.Tensor"):
        mk.swiglu_ffn(x, wg, wu, wd.tolist())
    with pytest.raises(TypeError, match="bases must be a tuple .* of length 2"):
        mk.swiglu_ffn(x, wg, wu, wd, bases=(torch.eye(d), torch.eye(d)))
    v = torch.eye(d)[:, :4]
    with pytest.raises(ValueError, match=r"bases\[2\] \(V_down\) must have shape \[in_features=12, rank\]"):
        mk.swiglu_ffn(x, wg, wu, wd, bases=(v, v, v))
    with pytest.raises(ValueError, match=r"bases\[0\] \(V_gate\).shape\[1\] \(rank\)=0 is out of range"):
        mk.swiglu_ffn(x, wg, wu, wd, bases=(v[:, :0], v, torch.eye(h)))
    with pytest.raises(TypeError, match=r"bases\[1\] \(V_up\) must be a floating-point tensor"):
        mk.swiglu_ffn(x, wg, wu, wd, bases=(v, v.long(), torch.eye(h)))
    with pytest.raises(ValueError, match=r"bases\[0\] \(V_gate\) is on meta but x is on cpu"):
        mk.swiglu_ffn(x, wg, wu, wd, bases=(v.to("meta"), v, torch.eye(h)))
    with pytest.raises(ValueError, match="backend='gpu' is not a backend"):
        mk.swiglu_ffn(x, wg, wu, wd, backend="gpu")
    if "triton" in live_implementations("swiglu_ffn", "cpu"):
        with pytest.raises(TypeError, match="triton backend supports"):
            mk.swiglu_ffn(x.double(), wg.double(), wu.double(), wd.double(), backend="triton")


def test_compiled_ops_check_their_arguments():
    """The C++ and Triton primitives validate their own arguments too (callable directly)."""
    a = torch.randn(4, 8)
    namespaces = []
    if "cpu" in live_implementations("swiglu_ffn", "cpu"):
        namespaces.append((torch.ops.mecefo, RuntimeError))
    if "triton" in live_implementations("swiglu_ffn", "cpu"):
        namespaces.append((torch.ops.mecefo_triton, ValueError))
    if not namespaces:
        pytest.skip("neither mecefo_kernels._C nor triton is live")
    for ns, error in namespaces:
        with pytest.raises(error, match="u .*shape"):
            ns.swiglu_fwd(a, torch.randn(4, 7))
        with pytest.raises(error, match="dp .*(dtype|float64)"):
            ns.swiglu_bwd(a.double(), a, a)


@pytest.mark.skipif("triton" not in live_implementations("swiglu_ffn", "cpu"), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("tf32", [False, True], ids=["exact", "tf32"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_fp32_gemms_run_in_triton_only_with_tf32(tf32, recompute, allow_tf32):
    """fp32 on the triton backend: the GEMM-with-SwiGLU-epilogue kernels when TF32 is allowed,
    cuBLAS GEMMs plus the elementwise SwiGLU kernels otherwise; float64 agreement either way
    (the interpreter multiplies exactly; on a GPU the eager baseline uses the same TF32 setting)."""
    from triton_op_cases import recorded_launches

    allow_tf32(tf32)
    args = make_problem((37, 48), 80, 48, True, (8, 8, 16), torch.float32)
    exact, baseline = ffn_f64(*args), ffn_eager(*args)
    with recorded_launches() as launches:
        got = ffn_mecefo(*args, recompute=recompute, backend="triton")
    for name, g, e, b in zip(NAMES, got, exact, baseline):
        assert_close(f"triton/{name}", g, e, b)
    fused = {"swiglu._gate_up_swiglu_fwd_kernel", "swiglu._gate_up_swiglu_bwd_kernel"} & set(launches)
    elementwise = {"swiglu._swiglu_fwd_kernel", "swiglu._swiglu_bwd_kernel"} & set(launches)
    if tf32:
        assert fused == ({"swiglu._gate_up_swiglu_fwd_kernel", "swiglu._gate_up_swiglu_bwd_kernel"} if recompute
                         else {"swiglu._gate_up_swiglu_fwd_kernel"}), launches
        assert "lowrank._matmul_kernel" in launches
    else:
        assert not fused and "lowrank._matmul_kernel" not in launches, launches
        assert elementwise == {"swiglu._swiglu_fwd_kernel", "swiglu._swiglu_bwd_kernel"}, launches
