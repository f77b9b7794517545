"""The gradient noise scale estimator (mecefo.noise) against its definition on synthetic gradients.

Synthetic per-sequence gradients x ~ N(G, diag(sigma^2)) have a known |G|^2 and tr(Sigma) = sum sigma^2;
replicas hold unequal numbers of them (one sits out), and each builds its gradient SUM the way the
trainer does (every sequence weighs 1/m). Averaged over many independent steps, the estimates must
match the true values (they are unbiased); a single step with equal local batches must equal the
textbook two-batch formulas.
"""

import math

import pytest
import torch

from mecefo.noise import NoiseSample, NoiseScale, drop_penalty, estimate, local_terms, squared_norm

M = 4  # sequences per shard


def synthetic_step(gen, true_g, sigma, batches):
    """One step: per replica its gradient SUM g_r = (1/m) sum of its sequences' gradients, and the global
    mean gradient (what the trainer holds after the all-reduce and the normalisers)."""
    sums = []
    for b in batches:
        x = true_g + sigma * torch.randn(b, true_g.numel(), generator=gen, dtype=torch.float64)
        sums.append(x.sum(0) / M)
    total = sum(batches)
    global_mean = torch.stack(sums).sum(0) / (total / M)
    return sums, global_mean


def step_estimate(sums, global_mean, batches):
    terms = [local_terms(squared_norm([g]), b, M) for g, b in zip(sums, batches)]
    return estimate(sum(t[0] for t in terms), sum(t[1] for t in terms), float(sum(batches)),
                    squared_norm([global_mean]))


@pytest.mark.parametrize("batches", [(4, 4, 4, 4), (1, 3, 0, 6, 4)], ids=["equal", "unequal-one-sits-out"])
def test_estimates_are_unbiased(batches):
    gen = torch.Generator().manual_seed(0)
    d = 16
    true_g = torch.linspace(-0.5, 0.5, d, dtype=torch.float64)
    sigma = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    grad_sq, trace = float(true_g.square().sum()), float(sigma.square().sum())
    samples = [step_estimate(*synthetic_step(gen, true_g, sigma, batches)[:2], batches) for _ in range(10000)]
    for name, truth in (("grad_sq", grad_sq), ("trace", trace)):
        values = torch.tensor([getattr(s, name) for s in samples], dtype=torch.float64)
        mean, se = values.mean().item(), (values.std() / math.sqrt(len(values))).item()
        assert abs(mean - truth) < 4 * se, f"{name}: mean {mean:.4f} +- {se:.4f}, true {truth:.4f}"
        assert se < 0.05 * truth, "the test resolves a 20% bias"
    k = sum(1 for b in batches if b)
    assert samples[0].local_batch == sum(batches) / k and samples[0].batch == sum(batches)


def test_unequal_batches_averaged_without_weights_would_be_biased():
    """The weighting matters: averaging the replicas' squared norms equally, with the mean local batch,
    misses tr(Sigma) by far (so the unbiased test above can fail)."""
    gen = torch.Generator().manual_seed(1)
    batches, d = (1, 3, 6), 8
    true_g = torch.zeros(d, dtype=torch.float64)
    sigma = torch.ones(d, dtype=torch.float64)
    naive = []
    for _ in range(4000):
        sums, global_mean = synthetic_step(gen, true_g, sigma, batches)
        local = sum(squared_norm([g * M / b]) for g, b in zip(sums, batches)) / len(batches)
        b, big = sum(batches) / len(batches), sum(batches)
        naive.append((local - squared_norm([global_mean])) / (1 / b - 1 / big))
    assert sum(naive) / len(naive) > 1.5 * d


def test_equal_batches_reduce_to_the_two_batch_formulas():
    gen = torch.Generator().manual_seed(2)
    batches = (4, 4, 4)
    sums, global_mean = synthetic_step(gen, torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64),
                                       batches)
    s = step_estimate(sums, global_mean, batches)
    b, big = 4, 12
    small_sq = sum(float((g * M / b).square().sum()) for g in sums) / len(sums)
    big_sq = float(global_mean.square().sum())
    assert s.grad_sq == pytest.approx((big * big_sq - b * small_sq) / (big - b), rel=1e-12)
    assert s.trace == pytest.approx((small_sq - big_sq) / (1 / b - 1 / big), rel=1e-12)


def test_no_estimate_from_a_single_replica():
    assert estimate(10.0, 1.0, 4.0, 2.0) is None
    assert local_terms(3.0, 0, M) == (0.0, 0.0)


def test_squared_norm_is_float64_over_every_tensor():
    a = torch.full((1000,), 1e-4, dtype=torch.float32)
    b = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    expected = 1000 * float(torch.tensor(1e-4, dtype=torch.float32).double()) ** 2 + 25.0
    assert squared_norm([a, None, b]) == pytest.approx(expected, rel=1e-14)
    assert squared_norm([None]) == 0.0


def test_moving_averages_are_bias_corrected_and_kept_separately():
    noise = NoiseScale(beta=0.5)
    assert noise.b_simple is None and noise.drop_penalty(8) is None and not noise.ready
    noise.update(NoiseSample(grad_sq=2.0, trace=8.0, local_batch=1, batch=4))
    assert noise.mean_grad_sq == 2.0 and noise.mean_trace == 8.0 and noise.b_simple == 4.0 and noise.ready
    noise.update(NoiseSample(grad_sq=1.0, trace=1.0, local_batch=1, batch=4))
    # weights 0.5 x 0.5 (first) and 0.5 (second) over 0.75: the ratio of the averages, not the average ratio
    assert noise.mean_grad_sq == pytest.approx((0.25 * 2 + 0.5 * 1) / 0.75)
    assert noise.b_simple == pytest.approx((0.25 * 8 + 0.5 * 1) / (0.25 * 2 + 0.5 * 1))
    restored = NoiseScale(beta=0.5)
    restored.load_state_dict(noise.state_dict())
    assert restored.state_dict() == noise.state_dict() and restored.b_simple == noise.b_simple


def test_not_positive_averages():
    noise = NoiseScale(beta=0.9)
    noise.update(NoiseSample(grad_sq=-1.0, trace=3.0, local_batch=1, batch=4))
    assert noise.b_simple == math.inf and noise.drop_penalty(16) == 1.0
    noise = NoiseScale(beta=0.9)
    noise.update(NoiseSample(grad_sq=1.0, trace=-3.0, local_batch=1, batch=4))
    assert noise.b_simple == 0.0 and noise.drop_penalty(16) == 0.0


def test_drop_penalty():
    assert drop_penalty(16.0, 16.0) == 0.5  # at the critical batch size
    assert drop_penalty(0.0, 16.0) == 0.0
    assert drop_penalty(1e6, 16.0) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="beta"):
        NoiseScale(beta=1.0)


# ---- in the trainer ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("policy", ["shrink", "spread"])
def test_trainer_estimates_match_a_single_process_reference(tmp_path, corpus_cache, policy):
    """Replica 1 sits out steps 0-1: under shrink 3 replicas run 2 sequences each; under spread its 2
    sequences go to two survivors (local batches 2, 3, 3). The trainer's step-0 estimates, from its
    weighted gradient sums and one all-reduce, equal those from each replica's own mean gradient. (To 1e-6:
    transformers computes the rotary angles in float32 with batch-shaped matmuls, so the same sequences
    in micro-batches of 2 and in one batch of 6 differ by ~1e-8 relative even in float64; a wrong factor
    in the plumbing is of order 1.)"""
    from trainer_runs import make_config, noise_reference, run

    schedule = tmp_path / "failures.txt"
    schedule.write_text("1 0 2\n")
    cfg = make_config(tmp_path / policy, corpus_cache, policy=policy, steps=3, failures=f"schedule:{schedule}")
    run(cfg)
    from mecefo.report import read_metrics

    first = [r for r in read_metrics(cfg.run_path) if "event" not in r and r["step"] == 0]
    ran = {r["replica"]: [(shard, a, b) for shard, a, b, _ in r["work"]] for r in first}
    assert sorted(len(x) for x in ran.values()) == ([0, 1, 1, 1] if policy == "shrink" else [0, 1, 2, 2])
    grad_sq, trace = noise_reference(cfg.run_path, ran)
    for r in first:  # every replica, the one sitting out too, holds the same estimate
        assert r["noise_grad_sq"] == pytest.approx(grad_sq, rel=1e-6)
        assert r["noise_trace"] == pytest.approx(trace, rel=1e-6)
        assert r["noise_local_batch"] == 2.0 if policy == "shrink" else 8 / 3
    assert len({(r["noise_b_simple"], r["noise_drop_penalty"]) for r in first}) == 1
