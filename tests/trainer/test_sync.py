"""The gradient sync and the MeCeFO normalisers, checked numerically against MECEFO.md's formulas.

n replicas are emulated in one process (float64): each live replica's contribution is what it
would send (its work items run by mecefo.model.run_work, the trainer's own loop), the all-reduce
is their sum, and the result after the normalisers is compared with the formula written from
whole-shard gradients computed separately:

* ndb-exact and spread: (1/n) sum over all shards of the exact gradients = the full-batch gradient;
* shrink: (1/|live|) sum over live replicas' own shards;
* mecefo: attention params (1/|N|) sum over N (live non-neighbours) of their exact gradients;
  every other param (1/n) (sum over N of exact gradients + sum over neighbours of their
  two-shard neighbour-mode gradients);
* orphan-only approximation (neighbour-orphan, spread-orphan): attention params (1/|live|) sum
  over the live replicas' own exact gradients; every other param (1/n) (that sum + the dead
  shards' neighbour-mode gradients). Spreading splits a dead shard over replicas by sequences,
  so this also shows that who runs a sequence does not change the gradient.
"""

import numpy as np
import pytest
import torch

from mecefo.config import TrainConfig
from mecefo.data import Batches, prepare_corpus
from mecefo.membership import plan_step
from mecefo.model import run_work, shard_loss
from mecefo.models import build_model
from mecefo.neighbor import neighbor_path
from mecefo.policy import PRESETS
from mecefo.sync import GradientSync

N = 4
M = 3  # sequences per shard: spreading one dead shard reaches all N - 1 survivors


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    text = tmp / "text.bin"
    np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tofile(text)
    corpus = prepare_corpus([str(text)], cache_dir=tmp / "cache", data_dtype="uint8")
    return Batches(corpus, seq_len=16, micro_batch=M, seed=0, vocab_size=256)


def make(policy, basis="weight"):
    cfg = TrainConfig(dtype="float64", policy=policy, rank=8, tau=5, basis=basis)
    path = neighbor_path(PRESETS[policy], rank=cfg.rank, tau=cfg.tau, basis=basis)
    model = path.prepare(build_model(cfg))
    return model, path


def grads(model):
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def shard_grads(model, path, batches, shards, neighbour):
    model.zero_grad(set_to_none=True)
    with path.context(model, neighbour):
        for s in shards:
            shard_loss(model, *batches.batch(0, s)).backward()
    return grads(model)


def synced(model, path, batches, live, policy, bucket_bytes):
    """Each replica's contribution, summed as the all-reduce would, then normalised."""
    plan = plan_step(N, live, policy, sequences=M)
    sync = GradientSync(model, path.skipped_parameters(model), bucket_bytes=bucket_bytes)
    summed: list[torch.Tensor] = []
    for replica in range(N):
        items = plan.items_of(replica)
        model.zero_grad(set_to_none=True)
        # a dead replica computes junk gradients, which it must not send
        run_work(model, path, batches, 0, items or plan_step(N, range(N), "ndb-exact", sequences=M).items_of(replica),
                 "cpu")
        sent = []
        sync.reduce(lambda t: sent.append(t.clone()) or True, contributes=bool(items))
        summed = [a + b for a, b in zip(summed, sent)] if summed else sent
    model.zero_grad(set_to_none=True)
    buckets = iter(summed)
    sync.reduce(lambda t: t.copy_(next(buckets)) is not None)
    sync.normalise(plan.normalisers())
    return plan, grads(model)


def assert_grads_close(got, expected):
    for name, e in expected.items():
        if e is None:
            assert got[name] is None, f"{name}: expected no gradient"
            continue
        err = (got[name] - e).abs().max().item()
        assert err <= 1e-12 * e.abs().max().item(), f"{name}: error {err:.3e}"


@pytest.mark.parametrize("live", [(0, 1, 2, 3), (0, 1, 3), (0, 3), (1,)])
@pytest.mark.parametrize("bucket_bytes", [64 << 20, 40_000])
@pytest.mark.parametrize("policy", ["ndb-exact", "spread"])
def test_exact_takeover_is_the_full_batch_gradient(batches, live, bucket_bytes, policy):
    model, path = make(policy)
    plan, got = synced(model, path, batches, live, policy, bucket_bytes)
    processed = [s for s in range(N) if s not in plan.dropped]
    xs, ys = zip(*(batches.batch(0, s) for s in processed))
    model.zero_grad(set_to_none=True)
    shard_loss(model, torch.cat(xs), torch.cat(ys)).backward()
    assert_grads_close(got, grads(model))
    if live == (1,):
        assert plan.dropped == (2, 3)  # more than half gone (bound: twice the work): only shards 1 and 0 run
    if policy == "spread" and live == (0, 1, 3):
        assert all(len(plan.items_of(r)) == 2 for r in live), "the dead shard's 3 sequences went to 3 replicas"


@pytest.mark.parametrize("live", [(0, 1, 3), (0, 2)])
def test_shrink_averages_over_live_replicas(batches, live):
    model, path = make("shrink")
    _, got = synced(model, path, batches, live, "shrink", 64 << 20)
    per_shard = [shard_grads(model, path, batches, [s], False) for s in live]
    expected = {name: sum(g[name] for g in per_shard) / len(live) for name in got}
    assert_grads_close(got, expected)


@pytest.mark.parametrize("live", [(0, 1, 2, 3), (0, 1, 3), (0, 3), (0, 1), (1,)])
def test_mecefo_normalisers(batches, live):
    model, path = make("mecefo")
    skipped = set(path.skipped_parameters(model))
    assert skipped and all("self_attn" in n or "input_layernorm" in n for n in skipped)
    plan, got = synced(model, path, batches, live, "mecefo", 64 << 20)
    exact = {k: shard_grads(model, path, batches, [k], False) for k in plan.non_neighbours}
    neighbour = {j: shard_grads(model, path, batches, plan.shards_of(j), True) for j in plan.neighbours}
    for g in neighbour.values():
        assert all(g[name] is None for name in skipped), "the neighbour computes no attention gradient"
    expected = {}
    for name in got:
        # summed in replica order, like the emulated all-reduce
        if name in skipped:
            terms = [exact[r][name] for r in plan.live if r in exact]
            expected[name] = sum_in_order(terms) / len(terms) if terms else None  # over |N|
        else:
            terms = [(exact[r] if r in exact else neighbour[r])[name] for r in plan.live]
            expected[name] = sum_in_order(terms) / plan.processed  # over n (all processed shards)
    assert_grads_close(got, expected)
    if live == (0, 1):
        assert plan.non_neighbours == () and all(got[name] is None for name in skipped)


@pytest.mark.parametrize("live", [(0, 1, 3), (1, 2)])
@pytest.mark.parametrize("policy", ["neighbour-orphan", "spread-orphan"])
def test_orphan_only_normalisers(batches, live, policy):
    """Own shards exact (they alone feed attention, over |live|); dead shards in neighbour mode."""
    model, path = make(policy)
    skipped = set(path.skipped_parameters(model))
    plan, got = synced(model, path, batches, live, policy, 64 << 20)
    own = {r: shard_grads(model, path, batches, [r], False) for r in live}
    dead = {d: shard_grads(model, path, batches, [d], True) for d in range(N) if d not in live}
    expected = {}
    for name in got:
        if name in skipped:
            expected[name] = sum_in_order([own[r][name] for r in live]) / len(live)
        else:
            expected[name] = sum_in_order([own[r][name] for r in live] + [dead[d][name] for d in dead]) / N
    assert_grads_close(got, expected)
    assert plan.normalisers().attention == len(live) and plan.normalisers().rest == N


@pytest.mark.parametrize("live", [(0, 1, 3), (0, 2, 3)])
@pytest.mark.parametrize("approximate", ["orphan", "none"])
def test_who_runs_a_sequence_does_not_change_the_gradient(batches, live, approximate):
    """The same approximation spread over every survivor (sequence ranges) or run by one neighbour (whole
    shards) gives the same step gradient up to summation order: quality depends only on which work is
    approximated. (Not so for approximation 'both', which approximates the own shards of whoever
    takes work over: spreading makes every survivor approximate its own shard.)"""
    from mecefo.policy import Policy
    from mecefo.probe import plan_gradient

    model, path = make("neighbour-orphan" if approximate != "none" else "ndb-exact")
    neighbour = plan_step(N, live, Policy("neighbour", approximate), sequences=M, max_load=4.0)
    spread = plan_step(N, live, Policy("spread", approximate), sequences=M, max_load=4.0)
    assert spread.work != neighbour.work
    g_neighbour = plan_gradient(model, path, batches, 0, neighbour)
    g_spread = plan_gradient(model, path, batches, 0, spread)
    assert g_spread.keys() == g_neighbour.keys()
    for name, g in g_neighbour.items():
        err = (g_spread[name] - g).abs().max().item()
        assert err <= 1e-12 * max(g.abs().max().item(), 1e-30), f"{name}: {err:.2e}"


def sum_in_order(terms):
    total = terms[0].clone()
    for t in terms[1:]:
        total += t
    return total


def test_skipped_parameters_must_exist():
    model, _ = make("ndb-exact")
    with pytest.raises(ValueError, match="skipped parameters not found in the model"):
        GradientSync(model, ["model.layers.0.attn.nope"])
