"""The patch API: ranks, bases and their refresh, what it refuses, other families, checkpointing, torch.compile."""

import copy
import warnings

import llama_math as lm
import pytest
import torch
from torch import nn

import mecefo_kernels as mk
from mecefo_kernels.nn import NeighborDecoderMixin

transformers = pytest.importorskip("transformers")


def neighbor_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with mk.neighbor_mode(model):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def normal_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("rank,expected", [(5, (5, 5, 5)), (48, (48, 48, 48)), (0.25, (12, 12, 20)),
                                           (1 / 32, (2, 2, 2)), (1.0, (48, 48, 80))])
def test_rank_is_an_int_or_a_fraction_of_in_features(rank, expected):
    model = mk.apply_mecefo(lm.tiny_model(), rank=rank)
    for layer in model.model.layers:
        shapes = (layer.mecefo_basis_gate.shape, layer.mecefo_basis_up.shape, layer.mecefo_basis_down.shape)
        assert [s[1] for s in shapes] == list(expected)
        assert [s[0] for s in shapes] == [48, 48, 80]


@pytest.mark.parametrize("rank,error,match", [
    (49, ValueError, r"rank=49 is out of range for a weight with in_features=48"),
    (0, ValueError, r"rank=0 is out of range"),
    (1.5, ValueError, r"rank=1.5 as a fraction of in_features must be in \(0, 1\]"),
    (True, TypeError, "rank must be an int or a float fraction"),
    ("8", TypeError, "rank must be an int or a float fraction"),
])
def test_bad_rank_is_refused(rank, error, match):
    with pytest.raises(error, match=match):
        mk.apply_mecefo(lm.tiny_model(), rank=rank)


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_bases_are_the_weights_top_right_singular_vectors(method):
    model = mk.apply_mecefo(lm.tiny_model(), rank=6, basis_method=method)
    layer = model.model.layers[1]
    for basis, lin in ((layer.mecefo_basis_gate, layer.mlp.gate_proj), (layer.mecefo_basis_up, layer.mlp.up_proj),
                       (layer.mecefo_basis_down, layer.mlp.down_proj)):
        assert basis.dtype == torch.float32 and not basis.requires_grad
        assert torch.equal(basis, mk.lowrank_basis(lin.weight, 6, method=method))
    assert not any("mecefo" in k for k in model.state_dict())
    model.to(torch.float64)  # buffers follow the model
    assert layer.mecefo_basis_gate.dtype == torch.float64


def test_refresh_bases_every_refresh_every_steps():
    model = mk.apply_mecefo(lm.tiny_model(), rank=4, refresh_every=4, basis_method="svd")
    layer = model.model.layers[0]
    old = layer.mecefo_basis_up.clone()
    with torch.no_grad():
        layer.mlp.up_proj.weight.mul_(torch.linspace(0.1, 3, 48))  # a different spectrum
    new = mk.lowrank_basis(layer.mlp.up_proj.weight, 4)
    assert not torch.allclose(new, old)
    assert mk.refresh_bases(model, step=3) is False
    assert torch.equal(layer.mecefo_basis_up, old)
    assert mk.refresh_bases(model, step=8) is True
    assert torch.equal(layer.mecefo_basis_up, new)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        mk.refresh_bases(model, step=-1)
    assert mk.refresh_bases(model) is True


def test_reapplying_reconfigures():
    model = mk.apply_mecefo(lm.tiny_model(), rank=4)
    mk.apply_mecefo(model, rank=8, refresh_every=10)
    layer = model.model.layers[0]
    assert layer.mecefo_basis_gate.shape == (48, 8) and layer.refresh_every == 10
    assert type(layer).__mro__.count(NeighborDecoderMixin) == 1
    with pytest.raises(ValueError, match="refresh_every must be a positive int"):
        mk.apply_mecefo(model, refresh_every=0)


def test_state_dict_round_trips_with_the_unpatched_model():
    plain = lm.tiny_model(seed=3)
    patched = mk.apply_mecefo(lm.tiny_model(seed=4), rank=4)
    patched.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(patched.state_dict(), strict=True)
    ids = lm.batch(plain.config)
    assert torch.equal(patched(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("overrides,match", [
    (dict(mlp_bias=True), "mlp.gate_proj has a bias"),
    (dict(hidden_act="gelu"), "act_fn .* is not SiLU"),
])
def test_unsupported_layers_are_refused_before_anything_changes(overrides, match):
    model = lm.tiny_model(lm.tiny_config(**overrides))
    with pytest.raises(ValueError, match=match):
        mk.apply_mecefo(model)
    assert not any(isinstance(m, NeighborDecoderMixin) for m in model.modules())


def test_gemma_norm_is_refused():
    """Gemma's RMSNorm scales by (1 + weight): fusing it as LLaMA's would be silently wrong."""
    config = transformers.GemmaConfig(vocab_size=67, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, hidden_act="silu")
    with pytest.raises(ValueError, match="post_attention_layernorm .*does not compute"):
        mk.apply_mecefo(transformers.GemmaForCausalLM(config))


def test_granite_residual_multiplier_is_refused():
    """Granite scales each residual branch (h = x + attn(.) * m): the neighbour path's h = x + attn(.) would
    be silently wrong."""
    config = transformers.GraniteConfig(vocab_size=67, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                        num_attention_heads=4, residual_multiplier=0.22)
    with pytest.raises(ValueError, match="residual_multiplier=0.22"):
        mk.apply_mecefo(transformers.GraniteForCausalLM(config))


@pytest.mark.parametrize("overrides,match", [
    (dict(), None),
    (dict(mlp_bias=True), "mlp.gate_proj has a bias"),
    (dict(hidden_act="gelu"), "act_fn .* is not SiLU"),
])
def test_layers_on_the_meta_device_are_checked_too(overrides, match):
    """A model built on the meta device (checked before it is built for real, as the trainer does): the
    activation and the norm are probed on CPU copies."""
    from mecefo_kernels.nn.decoder import check_decoder_layer

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(lm.tiny_config(**overrides))
    layer = model.model.layers[0]
    if match is None:
        check_decoder_layer(layer)
        return
    with pytest.raises(ValueError, match=match):
        check_decoder_layer(layer)


def test_gemma_norm_is_refused_on_the_meta_device():
    config = transformers.GemmaConfig(vocab_size=67, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, hidden_act="silu")
    from mecefo_kernels.nn.decoder import check_decoder_layer

    with torch.device("meta"):
        model = transformers.GemmaForCausalLM(config)
    with pytest.raises(ValueError, match="post_attention_layernorm .*does not compute"):
        check_decoder_layer(model.model.layers[0])


def test_models_without_decoder_layers_are_refused():
    with pytest.raises(ValueError, match="Linear has no decoder layers"):
        mk.apply_mecefo(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="LlamaForCausalLM has no MeCeFO neighbour-capable modules"):
        with mk.neighbor_mode(lm.tiny_model()):
            pass
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        mk.apply_mecefo("llama")


def test_qwen3_family_with_qk_norms():
    """Another family: q_norm/k_norm live inside self_attn and are skipped with it."""
    config = transformers.Qwen3Config(vocab_size=67, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    ref = copy.deepcopy(model)
    mk.apply_mecefo(model, rank=4)
    ids = lm.batch(config)
    logits, got = normal_grads(model, ids)
    ref_logits, want = normal_grads(ref, ids)
    assert torch.equal(logits, ref_logits) and all(torch.equal(got[n], want[n]) for n in want)
    skipped = mk.neighbor_skipped_parameters(model)
    assert "model.layers.1.self_attn.q_norm.weight" in skipped
    grads = neighbor_grads(model, ids)
    assert all((g is None) == (n in skipped) for n, g in grads.items())


def test_neighbor_llama_decoder_layer_is_usable_directly():
    config = lm.tiny_config()
    layer = mk.nn.NeighborLlamaDecoderLayer(config, 0, rank=4)
    plain = transformers.models.llama.modeling_llama.LlamaDecoderLayer(config, 0)
    assert isinstance(layer, type(plain))
    assert list(layer.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(layer.state_dict())
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.randn(2, 7, 48, requires_grad=True)
    pos = rotary(x, torch.arange(7)[None])
    assert torch.equal(layer(x, position_embeddings=pos), plain(x, position_embeddings=pos))
    with mk.neighbor_mode(layer):
        y = layer(x, position_embeddings=pos)
    y.sum().backward()
    assert layer.self_attn.q_proj.weight.grad is None and layer.mlp.down_proj.weight.grad is not None
    with pytest.raises(TypeError, match="keyword arguments only"):
        with mk.neighbor_mode(layer):
            layer(x, None)


def test_gradient_checkpointing():
    """Normal mode checkpoints like the unpatched model; neighbour mode suspends it (and restores it)."""
    model = mk.apply_mecefo(lm.tiny_model(), rank=4)
    ref = copy.deepcopy(model)
    ids = lm.batch(model.config)
    plain_neighbor = neighbor_grads(ref, ids)
    unpatched = lm.tiny_model()
    for m in (model, unpatched):
        m.activation_checkpointing_enable()
        m.train()
    logits, got = normal_grads(model, ids)
    ref_logits, want = normal_grads(unpatched, ids)
    assert torch.equal(logits, ref_logits) and all(torch.equal(got[n], want[n]) for n in want)
    grads = neighbor_grads(model, ids)
    assert all(model.model.layers[i].gradient_checkpointing for i in range(2))
    for n, g in grads.items():
        assert (g is None and plain_neighbor[n] is None) or torch.equal(g, plain_neighbor[n]), n


@pytest.mark.slow
def test_torch_compile_normal_and_neighbor_modes():
    """One compiled model (inductor, fullgraph) serves both modes: dynamo guards on the mode flag."""
    model = mk.apply_mecefo(lm.tiny_model(), rank=4)
    ref = copy.deepcopy(model)
    ids = lm.batch(model.config)
    compiled = torch.compile(model, fullgraph=True)
    for neighbor in (False, True, False):
        for m in (compiled, ref):
            m.zero_grad(set_to_none=True)
            with mk.neighbor_mode(model if m is compiled else ref, enabled=neighbor):
                out = m(input_ids=ids, labels=ids)
            out.loss.backward()
            if m is ref:
                torch.testing.assert_close(logits, out.logits)
            logits = out.logits
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad)


def test_transformers_4_is_refused(monkeypatch):
    """Decoder layers of transformers 4.x return tuples: the neighbour path's tensor would be misread."""
    monkeypatch.setattr(mk.hf, "transformers_version", lambda: "4.57.1")
    with pytest.raises(RuntimeError, match="needs transformers >= 5"):
        mk.apply_mecefo(lm.tiny_model())


def test_a_transformers_release_outside_the_allowed_range_warns(monkeypatch):
    """A release pip would not install with this package (the next minor past pyproject.toml's bound) is
    not used silently; one inside the range gives no warning."""
    (_, _), (major, minor) = mk.hf.TRANSFORMERS_RANGE
    monkeypatch.setattr(mk.hf, "transformers_version", lambda: f"{major}.{minor}.0")
    with pytest.warns(UserWarning, match=rf"transformers {major}\.{minor}\.0 is outside the range .*"
                                         rf"transformers>=5\.\d+,<{major}\.{minor}") as caught:
        mk.apply_mecefo(lm.tiny_model())
    assert len(caught) == 1 and caught[0].filename == __file__  # once per call, pointing at the caller
    monkeypatch.setattr(mk.hf, "transformers_version", lambda: f"{major}.{minor - 1}.3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mk.apply_mecefo(lm.tiny_model())
    assert not [w for w in caught if "outside the range" in str(w.message)]


def top_energy(matrix: torch.Tensor, rank: int) -> float:
    """sum of the top-`rank` squared singular values (float64): the most any rank-`rank` basis can capture."""
    return (torch.linalg.svdvals(matrix.double())[:rank] ** 2).sum().item()


def trained_with_adamw(basis="momentum", method="svd", steps=3):
    model = mk.apply_mecefo(lm.tiny_model(), rank=6, basis_method=method, basis=basis)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize("method,share", [("svd", 1 - 1e-5), ("randomized", 0.95)])
def test_momentum_bases_are_the_first_moments_top_right_singular_vectors(method, share):
    """Against a float64 SVD of each FFN weight's AdamW first moment: the basis captures the moment's top-r
    energy (all of it for the exact SVD; >= 95% for the randomized one, as for weights), and it is a
    different subspace from the weight's own (the point of a gradient-aware basis)."""
    model, optimizer = trained_with_adamw(method=method)
    assert mk.refresh_bases(model, optimizer=optimizer) is True
    for layer in model.model.layers:
        assert layer.mecefo_bases_from == ("momentum",) * 3
        for basis, lin in ((layer.mecefo_basis_gate, layer.mlp.gate_proj), (layer.mecefo_basis_up, layer.mlp.up_proj),
                           (layer.mecefo_basis_down, layer.mlp.down_proj)):
            moment = optimizer.state[lin.weight]["exp_avg"].double()
            v = basis.double()
            assert torch.allclose(v.T @ v, torch.eye(6, dtype=torch.float64), atol=1e-5), "orthonormal columns"
            captured = (moment @ v).square().sum().item()
            assert captured >= share * top_energy(moment, 6)
            weight_captured = (moment @ mk.lowrank_basis(lin.weight, 6).double()).square().sum().item()
            assert weight_captured < 0.9 * captured, "W's basis is not the moment's"


def test_momentum_bases_fall_back_to_the_weights():
    model, optimizer = trained_with_adamw(steps=0)
    layer = model.model.layers[0]
    weight_basis = mk.lowrank_basis(layer.mlp.up_proj.weight, 6)
    mk.refresh_bases(model)  # no optimizer given
    assert layer.mecefo_bases_from == ("weight",) * 3 and torch.equal(layer.mecefo_basis_up, weight_basis)
    mk.refresh_bases(model, optimizer=optimizer)  # an optimizer without state yet (no update so far)
    assert layer.mecefo_bases_from == ("weight",) * 3 and torch.equal(layer.mecefo_basis_up, weight_basis)
    model, optimizer = trained_with_adamw(steps=1)
    optimizer.state[model.model.layers[0].mlp.gate_proj.weight]["exp_avg"].zero_()  # nothing learnt there
    mk.refresh_bases(model, optimizer=optimizer)
    assert model.model.layers[0].mecefo_bases_from == ("weight", "momentum", "momentum")
    weight_model, weight_optimizer = trained_with_adamw(basis="weight", steps=1)
    mk.refresh_bases(weight_model, optimizer=weight_optimizer)  # basis "weight" ignores the optimizer
    assert weight_model.model.layers[0].mecefo_bases_from == ("weight",) * 3
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        mk.refresh_bases(model, optimizer={"exp_avg": 1})
    with pytest.raises(ValueError, match="basis must be one of weight, momentum"):
        mk.apply_mecefo(lm.tiny_model(), basis="gradient")


def test_bases_state_round_trips():
    model, optimizer = trained_with_adamw(steps=2)
    mk.refresh_bases(model, optimizer=optimizer)
    state = {k: v.clone() for k, v in mk.bases_state_dict(model).items()}
    assert len(state) == 3 * len(model.model.layers) and all("mecefo_basis" in k for k in state)
    other = mk.apply_mecefo(copy.deepcopy(model), basis="momentum", rank=6)  # fresh bases from the weights
    assert not all(torch.equal(state[k], v) for k, v in mk.bases_state_dict(other).items())
    mk.load_bases_state_dict(other, state)
    assert all(torch.equal(state[k], v) for k, v in mk.bases_state_dict(other).items())
    with pytest.raises(ValueError, match="bases state does not match the model"):
        mk.load_bases_state_dict(other, {k: v for k, v in list(state.items())[1:]})
    with pytest.raises(ValueError, match="shape .* in the state"):
        mk.load_bases_state_dict(mk.apply_mecefo(copy.deepcopy(model), rank=3), state)


def test_refresh_bases_computes_each_basis_with_the_given_function():
    """basis_fn (a trainer's, for sharded weights) computes every basis: it gets each FFN weight (or its first
    moment), the rank, the method and the dtype, and what it returns is installed."""
    model, optimizer = trained_with_adamw(steps=1)
    calls = []

    def basis_fn(matrix, rank, *, method, dtype):
        calls.append((matrix, rank, method, dtype))
        return -mk.lowrank_basis(matrix, rank, method=method, dtype=dtype)

    assert mk.refresh_bases(model, optimizer=optimizer, basis_fn=basis_fn) is True
    layer = model.model.layers[0]
    moment = optimizer.state[layer.mlp.down_proj.weight]["exp_avg"]
    assert len(calls) == 3 * len(model.model.layers)
    matrix, rank, method, dtype = calls[2]
    assert matrix is moment and rank == 6 and method == "svd" and dtype == torch.float32
    assert torch.equal(layer.mecefo_basis_down, -mk.lowrank_basis(moment, 6))
