"""residual_skip: forward x + branch(x), branch recorded nowhere, backward dL/dx = dL/dout."""

import pytest
import torch
import torch.nn.functional as F
from numerics import DTYPES, devices
from torch import nn

import mecefo_kernels as mk
from mecefo_kernels.memory import SavedTensors


class CausalAttention(nn.Module):
    """Pre-norm single-layer attention through SDPA: the kind of branch MeCeFO skips."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x, scale=1.0):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return scale * self.out(o.transpose(1, 2).reshape(b, s, d))


def saved_tensor_count(fn):
    with SavedTensors() as saved:
        out = fn()
    return out, len(saved.tensors)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_the_sum_and_backward_skips_the_branch(device, dtype):
    branch = CausalAttention(48, 4).to(device=device, dtype=dtype)
    x = torch.randn(2, 37, 48, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    out, saved = saved_tensor_count(lambda: mk.residual_skip(x, branch, scale=0.5))
    with torch.no_grad():
        expected = x + branch(x, 0.5)
    assert torch.equal(out, expected)
    assert saved == 0
    assert out.dtype == dtype and out.requires_grad
    out.backward(dy)
    assert torch.equal(x.grad, dy)
    assert all(p.grad is None for p in branch.parameters())


def test_branch_parameters_keep_their_accumulated_gradient():
    """An earlier (normal) micro-batch's gradient on the branch is neither cleared nor changed."""
    branch = CausalAttention(16, 2)
    x = torch.randn(1, 5, 16, requires_grad=True)
    (x + branch(x)).sum().backward()
    before = [p.grad.clone() for p in branch.parameters()]
    mk.residual_skip(x, branch).sum().backward()
    assert all(torch.equal(p.grad, b) for p, b in zip(branch.parameters(), before))


def test_output_takes_the_residual_dtype():
    """A bf16 branch output (autocast) on an fp32 residual stream: the sum is fp32, as transformers' add promotes."""
    x = torch.randn(3, 8, requires_grad=True)
    out = mk.residual_skip(x, lambda t: t.to(torch.bfloat16) * 2)
    assert out.dtype == torch.float32
    assert torch.equal(out, x + (x.to(torch.bfloat16) * 2).float())


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"branch returned shape \(1, 3, 8\) but x has shape \(2, 3, 8\)"):
        mk.residual_skip(x, lambda t: t[:1])
    with pytest.raises(TypeError, match="branch must return a tensor, got tuple"):
        mk.residual_skip(x, lambda t: (t, None))
    with pytest.raises(TypeError, match="branch must be callable"):
        mk.residual_skip(x, 3)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mk.residual_skip(torch.ones(2, 3, dtype=torch.int64), lambda t: t)
    with pytest.raises(TypeError, match="branch output must be a floating-point tensor"):
        mk.residual_skip(x, lambda t: t.long())


def test_torch_compile_fullgraph():
    """Traced without a graph break; the compiled backward still skips the branch."""
    branch = CausalAttention(32, 4)
    x = torch.randn(2, 9, 32, requires_grad=True)
    dy = torch.randn_like(x)
    compiled = torch.compile(lambda t: mk.residual_skip(t, branch), backend="aot_eager", fullgraph=True)
    out = compiled(x)
    with torch.no_grad():
        assert torch.equal(out, x + branch(x))
    out.backward(dy)
    assert torch.equal(x.grad, dy)
    assert all(p.grad is None for p in branch.parameters())
