"""apply_mecefo / neighbor_mode on transformers' LlamaForCausalLM: the semantics of issue 4.

* normal mode is the unpatched model, bit for bit (logits and every gradient);
* neighbour mode gives exactly MeCeFO's gradients of the residual-only graph, checked against
  an independent float64 implementation (tests/nn/llama_math.py), with per-dtype tolerances
  from the same graph run the ordinary way in that dtype;
* micro-batches of both modes accumulate into one step;
* a neighbour-mode forward saves at most one hidden state and one float per token per layer
  beyond what the embedding, final norm, LM head and loss save.
"""

import contextlib
import copy

import llama_math as lm
import pytest
import torch
from numerics import assert_close, devices

import mecefo_kernels as mk
from mecefo_kernels.memory import SavedTensors

pytest.importorskip("transformers")

LOW_PRECISION = [torch.float32, torch.bfloat16]


def run(model, ids, neighbor=False):
    """One micro-batch: forward (in neighbour mode if asked) and backward of the causal-LM loss."""
    with mk.neighbor_mode(model) if neighbor else contextlib.nullcontext():
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach()


def grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float64])
def test_normal_mode_is_the_unpatched_model(device, dtype):
    model = lm.tiny_model(dtype=dtype, device=device)
    ref = copy.deepcopy(model)
    ids = lm.batch(model.config, device=device)
    before = {k: v for k, v in model.state_dict().items()}
    assert mk.apply_mecefo(model, rank=3) is model
    after = model.state_dict()
    assert list(after) == list(before)  # no new keys: the bases are non-persistent
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)

    # a neighbour micro-batch first: leaving neighbour mode must restore the original model exactly
    run(model, ids, neighbor=True)
    model.zero_grad(set_to_none=True)
    logits = run(model, ids)
    ref_logits = run(ref, ids)
    assert torch.equal(logits, ref_logits)
    got, want = grads(model), grads(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert want[name] is not None and torch.equal(got[name], want[name]), name


def test_skipped_parameters_get_no_gradient():
    model = mk.apply_mecefo(lm.tiny_model(), rank=4)
    expected = [f"model.layers.{i}.{n}" for i in range(model.config.num_hidden_layers) for n in lm.SKIPPED]
    assert mk.neighbor_skipped_parameters(model) == expected
    run(model, lm.batch(model.config), neighbor=True)
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is None, f"{name} has a gradient in neighbour mode"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} has no gradient"


def test_oracle_is_llama():
    """The hand-written float64 model reproduces transformers' LlamaForCausalLM (validates the oracle)."""
    model = lm.tiny_model(dtype=torch.float64)
    ids = lm.batch(model.config)
    logits, _, _ = lm.forward(dict(model.named_parameters()), ids, model.config)
    # transformers' LlamaRMSNorm computes in float32 even in a float64 model (differences ~1e-7 here);
    # a structural mistake (RoPE, head grouping, masking) would be O(1)
    torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


NEIGHBOR_CASES = [(d, t, False) for d in devices() for t in LOW_PRECISION] + [("cpu", torch.float32, True)]


@pytest.mark.parametrize("device,dtype,autocast", NEIGHBOR_CASES,
                         ids=[f"{d}-{str(t)[6:]}{'-autocast-bf16' if a else ''}" for d, t, a in NEIGHBOR_CASES])
def test_neighbor_gradients_match_mecefo_formula(device, dtype, autocast):
    """Every gradient of a neighbour-mode micro-batch against float64 math of MeCeFO's definition.

    With autocast the parameters are float32 and the matmuls run in bf16: the baseline is then
    the residual-only graph run entirely in bf16."""
    model = mk.apply_mecefo(lm.tiny_model(dtype=dtype, device=device), rank=1 / 4, basis_method="svd")
    config, ids = model.config, lm.batch(model.config, device=device)
    layers = model.model.layers
    bases = [(l.mecefo_basis_gate, l.mecefo_basis_up, l.mecefo_basis_down) for l in layers]
    assert [tuple(b.shape) for b in bases[0]] == [(48, 12), (48, 12), (80, 20)]

    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        logits = run(model, ids, neighbor=True)
    got = grads(model)

    def oracle(dtype):
        params = lm.leaf_params(model, dtype, ffn_requires_grad=False)
        logits, loss, ffn_grads = lm.forward(params, ids, config, [[v.to(dtype) for v in b] for b in bases])
        loss.backward()
        return logits, {**{n: p.grad for n, p in params.items()}, **ffn_grads()}

    exact_logits, exact = oracle(torch.float64)
    base_logits, baseline = oracle(torch.bfloat16 if autocast else dtype)
    assert_close("logits", logits, exact_logits, base_logits)
    for name, g in got.items():
        if exact[name] is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        assert_close(name, g, exact[name], baseline[name])


def test_gradient_accumulation_mixes_modes():
    """A neighbour doing its own shard and a failed rank's shard in one step, next to normal micro-batches:
    the accumulated gradient is the sum of each micro-batch's own gradient, in the order run."""
    model = mk.apply_mecefo(lm.tiny_model(), rank=5)
    shards = [lm.batch(model.config, seed=s) for s in (1, 2, 3)]
    modes = [True, False, True]
    single = []
    for ids, neighbor in zip(shards, modes):
        model.zero_grad(set_to_none=True)
        run(model, ids, neighbor)
        single.append(grads(model))
    model.zero_grad(set_to_none=True)
    for ids, neighbor in zip(shards, modes):
        run(model, ids, neighbor)
    for name, p in model.named_parameters():
        parts = [g[name] for g in single if g[name] is not None]
        expected = parts[0]
        for part in parts[1:]:
            expected = expected + part
        assert torch.equal(p.grad, expected), name
        if name in mk.neighbor_skipped_parameters(model):
            assert len(parts) == 1  # only the normal micro-batch contributed


def test_backward_follows_the_mode_of_the_forward():
    """Forward in neighbour mode, backward after leaving it (and vice versa) still use the forward's mode."""
    model = mk.apply_mecefo(lm.tiny_model(), rank=4)
    ids = lm.batch(model.config)
    run(model, ids, neighbor=True)
    inside = grads(model)
    model.zero_grad(set_to_none=True)
    with mk.neighbor_mode(model):
        out = model(input_ids=ids, labels=ids)
        with mk.neighbor_mode(model, enabled=False):  # nesting
            normal = model(input_ids=ids, labels=ids)
        assert all(l.mecefo_neighbor for l in model.model.layers)
    assert not any(l.mecefo_neighbor for l in model.model.layers)
    out.loss.backward()
    assert all(torch.equal(p.grad, inside[n]) if inside[n] is not None else p.grad is None
               for n, p in model.named_parameters())
    model.zero_grad(set_to_none=True)
    normal.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def saved_activation_bytes(model, ids, mode):
    """Bytes of distinct tensor storages saved for backward by a forward + loss run under the context
    manager `mode`, the model's parameters and buffers excluded."""
    with mode, SavedTensors(exclude=(*model.parameters(), *model.buffers())) as saved:
        model(input_ids=ids, labels=ids).loss.backward()
    return saved.bytes


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_neighbor_forward_saves_one_hidden_state_per_layer(dtype):
    config = lm.tiny_config(layers=3)
    ids = lm.batch(config, batch_size=2, seq=16)
    tokens = ids.numel()
    model = mk.apply_mecefo(lm.tiny_model(config, dtype=dtype), rank=4)
    # what the embedding, final norm, LM head and loss save: the same model without decoder layers
    head = saved_activation_bytes(lm.tiny_model(lm.tiny_config(layers=0), dtype=dtype), ids, contextlib.nullcontext())
    hidden = tokens * config.hidden_size * dtype.itemsize
    per_layer = hidden + tokens * 4  # h, and the FFN norm's rstd in float32
    neighbor = saved_activation_bytes(model, ids, mk.neighbor_mode(model))
    normal = saved_activation_bytes(model, ids, mk.neighbor_mode(model, enabled=False))
    assert neighbor <= head + config.num_hidden_layers * per_layer, (neighbor, head, per_layer)
    assert neighbor >= head + config.num_hidden_layers * hidden  # the FFN input is kept, nothing less
    assert normal - head > 4 * (neighbor - head)  # and the hooks do see the normal path's activations
