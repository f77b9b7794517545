"""The gradient-error probe against MECEFO.md's formulas, computed here from an unpatched model.

The independent oracle for a neighbour shard's gradient: the plain transformers model with every
attention output detached (the residual-only graph of technique (i): no attention or
input_layernorm gradient, dL/dx = dL/dh), and each FFN weight's gradient projected on its
layer's basis, dW V V^T (technique (iii)). The step gradients follow the averaging rules:
attention over |N|, everything else over the n shards.
"""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mecefo.membership import plan_step  # noqa: E402
from mecefo.model import shard_loss  # noqa: E402
from mecefo.neighbor import MeCeFOPath  # noqa: E402
from mecefo.probe import (compare, exact_gradients, neighbour_gradients, neighbour_run_shards,  # noqa: E402
                          parameter_groups, probe, single_failure_plan)

# Two float32 computations of one gradient (fused neighbour kernels vs transformers' modules) differ
# by rounding: a few float32 ulps per element, summed over a two-layer graph. The errors compared
# are O(0.1-1), so a wrong formula misses by orders of magnitude.
TOL = 64 * torch.finfo(torch.float32).eps


class RandomBatches:
    """batch(step, shard) -> (inputs, targets), a pure function of (step, shard) like mecefo.data.Batches."""

    def __init__(self, vocab=256, micro_batch=2, seq_len=12):
        self.vocab, self.micro_batch, self.seq_len = vocab, micro_batch, seq_len

    def batch(self, step, shard, start=0, stop=None):
        g = torch.Generator().manual_seed(1000 * step + shard)
        tokens = torch.randint(0, self.vocab, (self.micro_batch, self.seq_len + 1), generator=g)[start:stop]
        return tokens[:, :-1], tokens[:, 1:]


def tiny_llama(layers):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def patched(plain, rank):
    path = MeCeFOPath(rank=rank, tau=None)
    return path.prepare(copy.deepcopy(plain)), path


def plain_gradient(model, batches, step, shard, detach_attention=False):
    hooks = []
    if detach_attention:
        for layer in model.model.layers:
            hooks.append(layer.self_attn.register_forward_hook(
                lambda module, args, out: (out[0].detach(),) + tuple(out[1:])))
    model.zero_grad(set_to_none=True)
    shard_loss(model, *batches.batch(step, shard)).backward()
    for h in hooks:
        h.remove()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def oracle_neighbour_gradient(plain, mecefo_model, batches, step, shard):
    """Residual-only graph gradient, FFN weights projected on the patched layer's bases."""
    g = plain_gradient(plain, batches, step, shard, detach_attention=True)
    for i, layer in enumerate(mecefo_model.model.layers):
        for proj, basis in (("gate_proj", layer.mecefo_basis_gate), ("up_proj", layer.mecefo_basis_up),
                            ("down_proj", layer.mecefo_basis_down)):
            name = f"model.layers.{i}.mlp.{proj}.weight"
            g[name] = g[name] @ basis @ basis.T
    return g


def group_error(approx, exact, names):
    a = torch.cat([approx.get(n, torch.zeros_like(exact[n])).double().flatten() for n in names])
    e = torch.cat([exact[n].double().flatten() for n in names])
    return ((a - e).norm() / e.norm()).item()


def expected_errors(plain, mecefo_model, path, batches, step, plan):
    """Step and per-shard errors from MECEFO.md's averaging, with the oracle's gradients."""
    groups = parameter_groups(mecefo_model, path)
    names = {k: [n for n in groups if groups[n] == k] for k in ("attention", "ffn", "other")}
    names["total"] = list(groups)
    exact = {s: plain_gradient(plain, batches, step, s) for s in range(plan.n)}
    approx = {s: oracle_neighbour_gradient(plain, mecefo_model, batches, step, s) for s in neighbour_run_shards(plan)}
    full = {n: sum(exact[s][n] for s in exact) / plan.n for n in groups}
    step_grad = {}
    for n in groups:
        own = sum(exact[k][n] for k in plan.non_neighbours)
        if groups[n] == "attention":
            step_grad[n] = own / len(plan.non_neighbours)
        else:
            step_grad[n] = (own + sum(approx[s][n] for s in approx)) / plan.n
    step_errors = {k: group_error(step_grad, full, v) for k, v in names.items()}
    shard_errors = {s: {k: group_error(approx[s], exact[s], v) for k, v in names.items()} for s in approx}
    # shrink: each live replica's own shard, exact, over |live|
    shrink_grad = {n: sum(exact[r][n] for r in plan.live) / len(plan.live) for n in groups}
    shrink_errors = {k: group_error(shrink_grad, full, v) for k, v in names.items()}
    return step_errors, shard_errors, shrink_errors


def assert_errors_match(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k]) <= TOL * max(1.0, want[k]), f"{k}: probe {got[k]:.8f}, formula {want[k]:.8f}"


@pytest.mark.parametrize("layers,rank", [(2, 1 / 8), (2, 1.0)])
def test_probe_equals_the_formula(layers, rank):
    plain = tiny_llama(layers)
    model, path = patched(plain, rank)
    batches = RandomBatches()
    plan = plan_step(5, [0, 2, 3, 4], "mecefo")  # replica 1 dead, 2 runs shards 2 and 1, N = {0, 3, 4}
    assert neighbour_run_shards(plan) == [1, 2]
    result = probe(model, path, batches, step=3, plan=plan)
    want_step, want_shards, want_shrink = expected_errors(plain, model, path, batches, 3, plan)
    assert_errors_match(result.step, want_step)
    assert_errors_match(result.shrink, want_shrink)
    assert result.shards.keys() == want_shards.keys()
    for s in want_shards:
        assert_errors_match(result.shards[s], want_shards[s])
    # what the approximation costs must show: attention has no neighbour gradient at all
    assert all(e["attention"] == 1.0 for e in result.shards.values())
    assert 0 < result.step["attention"] < 1 and result.step["ffn"] > 0


def test_full_rank_single_layer_ffn_is_exact():
    """rank = in_features and one layer: the FFN sees the exact upstream gradient and a full basis, so its
    neighbour gradient is the exact one; the step error is then the attention averaging alone."""
    plain = tiny_llama(1)
    model, path = patched(plain, 1.0)
    batches = RandomBatches()
    plan = single_failure_plan(4)
    result = probe(model, path, batches, step=0, plan=plan)
    assert result.step["ffn"] <= TOL and all(e["ffn"] <= TOL for e in result.shards.values())
    exact = [plain_gradient(plain, batches, 0, s) for s in range(4)]
    attn = [n for n, g in parameter_groups(model, path).items() if g == "attention"]
    mean_all = torch.cat([sum(g[n] for g in exact).flatten() / 4 for n in attn])
    mean_n = torch.cat([sum(exact[k][n] for k in plan.non_neighbours).flatten() / 2 for n in attn])
    want = ((mean_n - mean_all).norm() / mean_all.norm()).item()
    assert abs(result.step["attention"] - want) <= TOL * max(1.0, want)


def test_bases_change_only_the_ffn_part():
    """Re-using one set of exact gradients for several ranks (as the sweep does) compares like with like."""
    plain = tiny_llama(2)
    batches = RandomBatches()
    plan = single_failure_plan(4)
    low, path = patched(plain, 1 / 16)
    full, _ = patched(plain, 1.0)
    groups = parameter_groups(low, path)
    exact = exact_gradients(low, path, batches, 0, plan)
    r_low = compare(exact, neighbour_gradients(low, path, batches, 0, plan), groups)
    r_full = compare(exact, neighbour_gradients(full, path, batches, 0, plan), groups)
    assert r_low.step["attention"] == r_full.step["attention"]
    assert r_low.step["other"] == pytest.approx(r_full.step["other"], rel=TOL)
    assert r_low.shard_mean()["ffn"] > r_full.shard_mean()["ffn"]


def test_plan_without_a_neighbour_is_refused():
    plain = tiny_llama(1)
    model, path = patched(plain, 1 / 8)
    with pytest.raises(ValueError, match="no neighbour"):
        probe(model, path, RandomBatches(), 0, plan_step(4, range(4), "mecefo"))


def test_every_live_replica_a_neighbour_leaves_attention_without_update():
    plain = tiny_llama(1)
    model, path = patched(plain, 1 / 8)
    result = probe(model, path, RandomBatches(), 0, single_failure_plan(2))
    assert result.step["attention"] == 1.0


@pytest.mark.parametrize("policy", ["mecefo", "neighbour-orphan"])
def test_probe_step_gradient_is_what_the_trainer_computes(policy):
    """The probe combines per-shard gradients; plan_gradient runs every replica's work items as the trainer
    does (run_work, sums, per-group normalisers). They agree for whole-shard plans of either approximation."""
    from mecefo.probe import approximate_step_gradient, plan_gradient

    plain = tiny_llama(2)
    model, path = patched(plain, 1 / 8)
    batches = RandomBatches()
    plan = plan_step(5, [0, 2, 3, 4], policy, sequences=batches.micro_batch)
    groups = parameter_groups(model, path)
    exact = exact_gradients(model, path, batches, 1, plan)
    combined = approximate_step_gradient(exact, neighbour_gradients(model, path, batches, 1, plan), groups)
    direct = plan_gradient(model, path, batches, 1, plan)
    for name, g in combined.items():
        got = direct.get(name, torch.zeros_like(g))
        assert (got - g).abs().max().item() <= TOL * max(1.0, g.abs().max().item()), name
    if policy == "neighbour-orphan":
        assert neighbour_run_shards(plan) == [1]  # only the orphan; replica 2's own shard runs exactly
