"""lowrank_linear and lowrank_basis: every live backend against float64 math from the formulas,
the low-rank gradient's limits (exact at full rank, error falling with rank), the bases'
orthonormality and subspace, what is saved, and errors."""

import pytest
import torch
from numerics import DTYPES, assert_close, devices, live_implementations, non_contiguous

import mecefo_kernels as mk
from mecefo_kernels.memory import SavedTensors


def lowrank_f64(x, weight, basis, bias, dy):
    """-> (y, dx, dW, db) in float64: y = x W^T + b, dx = dy W, dW = dy^T (x V) V^T, db = sum dy."""
    x, weight, basis, dy = (t.double().reshape(-1, t.shape[-1]) for t in (x, weight, basis, dy))
    y = x @ weight.t() + (0 if bias is None else bias.double())
    return y, dy @ weight, (dy.t() @ (x @ basis)) @ basis.t(), None if bias is None else dy.sum(0)


def lowrank_eager(x, weight, basis, bias, dy):
    """The low-precision baseline: nn.functional.linear with autograd in x's dtype, and the
    low-rank formula evaluated in x's dtype (the basis rounded to it)."""
    x = x.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = torch.nn.functional.linear(x, weight, bias)
    y.backward(dy)
    rows, g, v = x.detach().reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), basis.to(x.dtype)
    return (y.detach().reshape(-1, y.shape[-1]), x.grad.reshape(rows.shape), (g.t() @ (rows @ v)) @ v.t(),
            None if bias is None else bias.grad)


def lowrank_mecefo(x, weight, basis, bias, dy, backend):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = mk.lowrank_linear(x, weight, basis, bias, backend=backend)
    y.backward(dy)
    return (y.detach().reshape(-1, y.shape[-1]), x.grad.reshape(-1, x.shape[-1]), weight.grad,
            None if bias is None else bias.grad)


NAMES = ("y", "dx", "dweight", "dbias")
# (x shape, out_features, rank, bias, strided x)
CASES = [
    pytest.param((37, 48), 80, 12, True, False, id="T37-bias"),
    pytest.param((3, 5, 48), 40, 48, False, False, id="3d-fullrank"),
    pytest.param((2, 7, 48), 80, 5, True, True, id="strided"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,out_features,rank,with_bias,strided", CASES)
def test_lowrank_linear_matches_float64(device, dtype, shape, out_features, rank, with_bias, strided):
    x = (torch.randn(shape, device=device) * 2).to(dtype)
    weight = (torch.randn(out_features, shape[-1], device=device) / shape[-1] ** 0.5).to(dtype)
    bias = torch.randn(out_features, device=device).to(dtype) if with_bias else None
    dy = torch.randn(*shape[:-1], out_features, device=device).to(dtype)
    if strided:
        x, dy = non_contiguous(x), non_contiguous(dy)
    basis = mk.lowrank_basis(weight, rank)
    exact = lowrank_f64(x, weight, basis, bias, dy)
    baseline = lowrank_eager(x, weight, basis, bias, dy)
    impls = live_implementations("lowrank", device)
    assert "torch" in impls
    for impl in impls:
        got = lowrank_mecefo(x, weight, basis, bias, dy, impl)
        for name, g, e, b in zip(NAMES, got, exact, baseline):
            if e is None:
                assert g is None
                continue
            assert g.dtype == dtype, f"{impl}/{name}: dtype {g.dtype}"
            assert_close(f"{impl}/{name}", g, e, b)


def exact_and_lowrank_grads(impl, dtype, ranks, device="cpu"):
    """dy^T x and the low-rank dW for each rank, with SVD bases of one weight [80, 48]."""
    x = torch.randn(37, 48, device=device, dtype=dtype)
    weight = torch.randn(80, 48, device=device, dtype=dtype)
    dy = torch.randn(37, 80, device=device, dtype=dtype)
    grads = [lowrank_mecefo(x, weight, mk.lowrank_basis(weight, r), None, dy, impl)[2] for r in ranks]
    return (dy.t() @ x).double(), grads


@pytest.mark.parametrize("device", devices())
def test_full_rank_is_exact(device):
    """rank = in_features: V V^T = I, so dy^T (x V) V^T is dy^T x (float64: to rounding)."""
    for impl in live_implementations("lowrank", device):
        dtype = torch.float32 if impl == "triton" else torch.float64
        exact, (got,) = exact_and_lowrank_grads(impl, dtype, [48], device)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        err = (got.double() - exact).abs().max().item() / exact.abs().max().item()
        assert err <= tol, f"{impl}: full-rank gradient off by {err:.2e} (relative) in {dtype}"


@pytest.mark.parametrize("device", devices())
def test_error_falls_as_rank_grows(device):
    """Nested SVD subspaces: ||dW - dW_r||_F / ||dW||_F strictly decreases with r, to 0 at r = in."""
    ranks = [1, 4, 12, 24, 36, 48]
    for impl in live_implementations("lowrank", device):
        exact, grads = exact_and_lowrank_grads(impl, torch.float32, ranks, device)
        errors = [((g.double() - exact).norm() / exact.norm()).item() for g in grads]
        assert all(b < a for a, b in zip(errors, errors[1:])), f"{impl}: errors {errors} do not fall with rank"
        assert errors[0] > 0.5 and errors[-1] < 1e-5, f"{impl}: errors {errors}"


def subspace_distance(v, w):
    """Spectral norm of the difference of the orthogonal projectors onto span(v) and span(w)."""
    return torch.linalg.matrix_norm(v @ v.t() - w @ w.t(), ord=2).item()


def weight_with_spectrum(singular_values, out_features, in_features, dtype=torch.float32):
    u = torch.linalg.qr(torch.randn(out_features, out_features, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_features, in_features, dtype=torch.float64))[0]
    k = len(singular_values)
    return (u[:, :k] * torch.as_tensor(singular_values, dtype=torch.float64) @ v[:, :k].t()).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_svd_basis_is_orthonormal_and_spans_the_top_right_singular_vectors(dtype):
    weight = weight_with_spectrum(0.9 ** torch.arange(48.0), 80, 48, dtype)
    rank = 12
    v = mk.lowrank_basis(weight, rank)
    assert v.shape == (48, rank)
    assert v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(v.double().t() @ v.double(), torch.eye(rank, dtype=torch.float64), rtol=0, atol=tol)
    top = torch.linalg.svd(weight.double())[2][:rank].t()  # right singular vectors, as columns
    assert subspace_distance(v.double(), top) < 1e-3
    left = torch.linalg.svd(weight.double().t())[2][:rank].t()  # a wrong answer is far away
    assert subspace_distance(torch.linalg.qr(left[:48])[0], top) > 0.5


def test_basis_past_min_dimension_is_completed_orthonormally():
    weight = torch.randn(20, 48)  # rank 20 at most
    v = mk.lowrank_basis(weight, 30)
    torch.testing.assert_close(v.t() @ v, torch.eye(30), rtol=0, atol=1e-5)
    row_space = torch.linalg.svd(weight.double())[2][:20].t()
    assert subspace_distance(v[:, :20].double(), row_space) < 1e-4  # the 20 first span the row space
    full = mk.lowrank_basis(weight, 48)
    torch.testing.assert_close(full @ full.t(), torch.eye(48), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_basis_of_a_rank_deficient_weight_is_still_orthonormal(method):
    """A zero weight (or a first moment before anything was learnt) and one of rank 2 < the requested 5: the
    randomized sketch is rank-deficient there, and the basis must still be orthonormal (a zero column would
    silently zero that part of every low-rank gradient)."""
    for weight in (torch.zeros(24, 16), torch.randn(24, 2) @ torch.randn(2, 16)):
        v = mk.lowrank_basis(weight, 5, method=method)
        torch.testing.assert_close(v.t() @ v, torch.eye(5), rtol=0, atol=1e-5)
        if weight.any():
            row_space = torch.linalg.svd(weight.double())[2][:2].t()
            assert subspace_distance(v.double() @ (v.double().t() @ row_space), row_space) < 1e-4


def captured_fraction(weight, v):
    """||W V||_F^2 / ||W||_F^2: the share of W's energy the basis keeps."""
    w = weight.double()
    return ((w @ v.double()).norm() ** 2 / w.norm() ** 2).item()


def test_randomized_basis_decaying_spectrum_matches_svd():
    """With a decaying spectrum (0.8^k) the randomized basis is the SVD's subspace."""
    weight = weight_with_spectrum(0.8 ** torch.arange(96.0), 160, 96)
    v = mk.lowrank_basis(weight, 12, method="randomized")
    torch.testing.assert_close(v.t() @ v, torch.eye(12), rtol=0, atol=1e-5)
    assert subspace_distance(v.double(), mk.lowrank_basis(weight, 12).double()) < 1e-3


@pytest.mark.parametrize("spectrum,power_iters,share", [
    ("power-law", 4, 0.99), ("gaussian", 4, 0.95), ("gaussian", 8, 0.985)])
def test_randomized_basis_energy_close_to_svd(spectrum, power_iters, share):
    """How close the randomized basis gets (the numbers lowrank_basis documents): the energy
    ||W V||_F^2 it keeps, as a share of what the exact SVD basis keeps. A decaying spectrum
    (power law k^-1/2) is easy; an i.i.d. Gaussian weight (a flat spectrum, i.e. a freshly
    initialised layer) is the hard case, and more power iterations close the gap."""
    if spectrum == "gaussian":
        weight = torch.randn(256, 128)
    else:
        weight = weight_with_spectrum(torch.arange(1.0, 129.0) ** -0.5, 256, 128)
    for rank in (8, 16, 32):
        optimum = captured_fraction(weight, mk.lowrank_basis(weight, rank))
        got = captured_fraction(weight, mk.lowrank_basis(weight, rank, method="randomized", power_iters=power_iters))
        assert share * optimum <= got <= optimum + 1e-6, (
            f"rank {rank}: randomized keeps {got:.4f} of the energy vs SVD {optimum:.4f}")


def test_randomized_basis_is_reproducible_and_leaves_the_global_rng_alone():
    weight = torch.randn(64, 48)
    state = torch.get_rng_state()
    first = mk.lowrank_basis(weight, 8, method="randomized")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, mk.lowrank_basis(weight, 8, method="randomized"))
    other = mk.lowrank_basis(weight, 8, method="randomized", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(first, other)


def test_basis_dtype():
    weight = torch.randn(20, 16, dtype=torch.bfloat16)
    assert mk.lowrank_basis(weight, 4).dtype == torch.float32
    assert mk.lowrank_basis(weight, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert mk.lowrank_basis(weight.double(), 4).dtype == torch.float64


@pytest.mark.parametrize("device", devices())
def test_lowrank_linear_saves_xv_not_x(device):
    """The weight gradient needs x V only: r floats per token are saved, not in_features."""
    x = torch.randn(4, 9, 48, device=device, requires_grad=True)
    weight = torch.randn(80, 48, device=device, requires_grad=True)
    basis = mk.lowrank_basis(weight, 6)
    for impl in live_implementations("lowrank", device):
        with SavedTensors(exclude=(weight, basis)) as saved:
            y = mk.lowrank_linear(x, weight, basis, backend=impl)
        assert [tuple(t.shape) for t in saved.activations] == [(36, 6)], \
            f"{impl}: saved {[t.shape for t in saved.tensors]}"
        y.sum().backward()
        assert basis.grad is None and x.grad is not None and weight.grad is not None
        x.grad = weight.grad = None
        with SavedTensors() as saved:
            mk.lowrank_linear(x.detach(), weight.detach(), basis, backend=impl)
        assert saved.tensors == [], f"{impl}: saved tensors for a call that needs no gradient"


def test_bad_inputs_name_the_argument():
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    basis = mk.lowrank_basis(weight, 3)
    with pytest.raises(ValueError, match=r"x has 7 features .* expects in_features=8"):
        mk.lowrank_linear(torch.randn(4, 7), weight, basis)
    with pytest.raises(ValueError, match=r"basis must have shape \[in_features=8, rank\], got \(6, 3\)"):
        mk.lowrank_linear(x, weight, torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"basis.shape\[1\] \(rank\)=9 is out of range"):
        mk.lowrank_linear(x, weight, torch.randn(8, 9))
    with pytest.raises(ValueError, match="basis must be 2-D"):
        mk.lowrank_linear(x, weight, torch.randn(8))
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        mk.lowrank_linear(x, weight, basis, torch.randn(8))
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has dtype torch.float32"):
        mk.lowrank_linear(x, weight.half(), basis)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mk.lowrank_linear(x.long(), weight, basis)
    with pytest.raises(ValueError, match="basis is on meta but x is on cpu"):
        mk.lowrank_linear(x, weight, basis.to("meta"))
    with pytest.raises(ValueError, match=r"rank=0 is out of range: must be in \[1, in_features=8\]"):
        mk.lowrank_basis(weight, 0)
    with pytest.raises(ValueError, match="rank=9 is out of range"):
        mk.lowrank_basis(weight, 9)
    with pytest.raises(TypeError, match="rank must be an int, got float"):
        mk.lowrank_basis(weight, 2.0)
    with pytest.raises(ValueError, match="method='qr' is not supported"):
        mk.lowrank_basis(weight, 2, method="qr")
    with pytest.raises(ValueError, match="weight must be 2-D"):
        mk.lowrank_basis(torch.randn(8), 2)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        mk.lowrank_basis(torch.ones(6, 8, dtype=torch.int64), 2)


def test_compiled_ops_check_their_arguments():
    namespaces = []
    if "cpu" in live_implementations("lowrank", "cpu"):
        namespaces.append((torch.ops.mecefo, RuntimeError))
    if "triton" in live_implementations("lowrank", "cpu"):
        namespaces.append((torch.ops.mecefo_triton, ValueError))
    if not namespaces:
        pytest.skip("neither mecefo_kernels._C nor triton is live")
    x, basis = torch.randn(5, 8), torch.randn(8, 3)
    for ns, error in namespaces:
        with pytest.raises(error, match=r"basis must have shape \[8, rank\]"):
            ns.lowrank_project(x, torch.randn(7, 3))
        with pytest.raises(error, match="xv"):
            ns.lowrank_weight_grad(torch.randn(5, 6), torch.randn(4, 3), basis, torch.float32)


# --------------------------------------------------------------------------- Triton GEMM launches

triton_only = pytest.mark.skipif("triton" not in live_implementations("lowrank", "cpu"),
                                 reason="Triton kernels need TRITON_INTERPRET=1 on CPU")


@pytest.fixture
def matmul_launches(monkeypatch):
    """Records (A, B, C, grid) of every launch of the low-rank GEMM kernel, then runs it."""
    from mecefo_kernels.triton import lowrank as triton_lowrank

    kernel = triton_lowrank._matmul_kernel
    launches = []
    run = kernel.run

    def recording_run(*args, grid, **kwargs):
        launches.append((args[0], args[1], args[2], grid))
        return run(*args, grid=grid, **kwargs)

    monkeypatch.setattr(kernel, "run", recording_run)
    return launches


@triton_only
@pytest.mark.parametrize("tf32", [False, True], ids=["exact", "tf32"])
def test_fp32_gemms_run_in_triton_only_with_tf32(tf32, allow_tf32, matmul_launches):
    """fp32: Triton's GEMM kernel when TF32 is allowed, cuBLAS (torch.mm) otherwise; the result
    matches float64 either way (the interpreter multiplies exactly; on a GPU the eager baseline
    runs with the same TF32 setting, so the tolerance follows it)."""
    allow_tf32(tf32)
    x, weight, basis, bias, dy = (torch.randn(37, 48), torch.randn(80, 48) / 7, None, None, torch.randn(37, 80))
    basis = mk.lowrank_basis(weight, 12)
    exact = lowrank_f64(x, weight, basis, bias, dy)
    baseline = lowrank_eager(x, weight, basis, bias, dy)
    got = lowrank_mecefo(x, weight, basis, bias, dy, "triton")
    for name, g, e, b in zip(NAMES[:3], got, exact, baseline):
        assert_close(f"triton/{name}", g, e, b)
    assert len(matmul_launches) == (3 if tf32 else 0), "x V, dy^T xV and g V^T"


@triton_only
def test_basis_is_cast_once_not_per_tile(matmul_launches):
    """The float32 basis reaches the kernel already in the activation dtype (one small cast per
    call), so tiles of both operands share a dtype and nothing is converted inside the loop."""
    x, weight, dy = torch.randn(37, 48).bfloat16(), torch.randn(80, 48).bfloat16(), torch.randn(37, 80).bfloat16()
    lowrank_mecefo(x, weight, mk.lowrank_basis(weight, 12), None, dy, "triton")
    assert len(matmul_launches) == 3
    for a, b, _, _ in matmul_launches:
        assert a.dtype == b.dtype == torch.bfloat16, (a.dtype, b.dtype)


@triton_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-tf32"])
def test_split_k_matches_float64(dtype, allow_tf32, matmul_launches):
    """dy^T xV split over the tokens: fp32 partials per split, summed in a fixed order, rounded
    once; the same answer as one program per tile (a GPU splits when tiles are few)."""
    from mecefo_kernels.triton.lowrank import _matmul

    allow_tf32(True)
    dy, xv = torch.randn(1100, 80).to(dtype), torch.randn(1100, 12).to(dtype)
    exact = dy.double().t() @ xv.double()
    baseline = (dy.float().t() @ xv.float()).to(dtype)  # fp32 accumulation, one rounding
    split = _matmul(dy.t(), xv, dtype, programs=64)
    (_, _, c, grid), = matmul_launches
    assert c.shape == (2, 80, 12) and c.dtype == torch.float32, "two fp32 partials"
    assert grid({"BLOCK_M": 64, "BLOCK_N": 64})[1] == 2
    whole = _matmul(dy.t(), xv, dtype, programs=1)
    assert matmul_launches[1][3]({"BLOCK_M": 64, "BLOCK_N": 64})[1] == 1
    for name, got in (("split", split), ("whole", whole)):
        assert_close(name, got, exact, baseline)

