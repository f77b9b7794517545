"""The gradient noise scale, measured while training, and the drop penalty it predicts.

The empirical model of large-batch training (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A) says a step on a batch of B samples makes progress in
proportion to ``1 / (1 + B_noise / B)``, with ``B_noise`` estimated by
``B_simple = tr(Sigma) / |G|^2``: the per-sample gradient covariance's trace over the squared
norm of the true gradient. A step that drops a small share ``f`` of its batch then loses
``f x B_noise / (B + B_noise)`` of its progress (d/df of the log of the progress at f = 0):
the **drop penalty** ``B_noise / (B + B_noise)``, 0.5 at the critical batch size, towards 1 far
below it, towards 0 far above it. The samples here are sequences (a shard's rows).

Data parallelism measures both quantities for free: the norm of each replica's own mean gradient
(batch ``b_r``) and of the all-reduced one (batch ``B``) have expectations
``E|G_b|^2 = |G|^2 + tr(Sigma) / b``. With unequal local batches (a replica taking over extra
sequences, or sitting out: ``b_r = 0``, it contributes nothing), the replicas' squared norms are
averaged with weights ``b_r / B`` over the ``K`` replicas that ran something, which keeps the
expectation linear: ``E[sum_r (b_r / B) |G_{b_r}|^2] = |G|^2 + tr(Sigma) K / B``, i.e. the
equal-batch formulas with the mean local batch ``b = B / K``:

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1 / b - 1 / B)

Both are unbiased (for any fixed weights; equal ``b_r`` give the usual estimators), their ratio is
not, so they are smoothed separately (exponential moving averages, bias-corrected as Adam's) and
divided afterwards. Each replica adds two scalars to the step's all-reduce: ``sum_r b_r |G_{b_r}|^2``
(as ``m^2 |g_r|^2 / b_r`` from its gradient SUM ``g_r``, see :func:`local_terms`) and ``K``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_BETA = 0.98  # EMA factor per committed step: a window of ~50 steps
READY_WEIGHT = 0.5  # the EMA's bias correction 1 - beta^k at which its estimate is used (k ~ 34 steps at 0.98)


def squared_norm(tensors: Iterable) -> float:
    """Sum of squares of every element of the tensors, accumulated in float64 (None: a zero gradient); one
    host sync. (torch is imported here: the command line's option checks import this module.)"""
    import torch

    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return 0.0
    return float(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square().sum())


def local_terms(grad_sum_sq: float, sequences: float, shard_sequences: int) -> tuple[float, float]:
    """This replica's two summands of the step's all-reduce: ``(b_r |G_{b_r}|^2, 1)``, or ``(0, 0)`` if
    it ran nothing.

    ``grad_sum_sq``: ``|g_r|^2`` of its accumulated gradient, which the trainer builds as a SUM over its
    work items each weighted by its share of a shard (:func:`mecefo.model.run_work`), so
    ``g_r = (b_r / m) G_{b_r}`` with ``m = shard_sequences`` and ``b_r = sequences``."""
    if sequences <= 0:
        return 0.0, 0.0
    return shard_sequences ** 2 * grad_sum_sq / sequences, 1.0


@dataclass(frozen=True)
class NoiseSample:
    """One step's unbiased estimates (per sequence): ``grad_sq`` ~ |G|^2, ``trace`` ~ tr(Sigma);
    ``local_batch`` b = B / K and ``batch`` B, in sequences."""

    grad_sq: float
    trace: float
    local_batch: float
    batch: float


def estimate(weighted_local_sq: float, contributors: float, batch: float, global_sq: float) -> NoiseSample | None:
    """The step's estimates from the all-reduced sums and the global gradient's squared norm (module
    docstring); None when fewer than two replicas ran something (no second batch size to compare)."""
    if contributors < 2 or batch <= 0:
        return None
    local_sq = weighted_local_sq / batch  # sum_r (b_r / B) |G_{b_r}|^2
    b = batch / contributors
    grad_sq = (batch * global_sq - b * local_sq) / (batch - b)
    trace = (local_sq - global_sq) / (1.0 / b - 1.0 / batch)
    return NoiseSample(grad_sq, trace, b, batch)


def drop_penalty(b_noise: float, batch: float) -> float:
    """Progress lost per unit share of a batch of ``batch`` sequences dropped: B_noise / (B + B_noise)."""
    if b_noise == math.inf:
        return 1.0
    return b_noise / (batch + b_noise)


class NoiseScale:
    """Exponential moving averages of |G|^2 and tr(Sigma), kept separately, and B_simple from them.

    The state is three floats and a count, all derived from all-reduced numbers, so every replica
    holds the same; it travels with healed state and checkpoints (:meth:`state_dict`)."""

    def __init__(self, beta: float = DEFAULT_BETA):
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.grad_sq = 0.0  # raw EMAs (biased towards 0 by their start; see the properties)
        self.trace = 0.0
        self.weight = 0.0  # 1 - beta^samples: the bias correction
        self.samples = 0

    def update(self, sample: NoiseSample) -> None:
        b = self.beta
        self.grad_sq = b * self.grad_sq + (1 - b) * sample.grad_sq
        self.trace = b * self.trace + (1 - b) * sample.trace
        self.weight = b * self.weight + (1 - b)
        self.samples += 1

    @property
    def mean_grad_sq(self) -> float | None:
        return self.grad_sq / self.weight if self.weight > 0 else None

    @property
    def mean_trace(self) -> float | None:
        return self.trace / self.weight if self.weight > 0 else None

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2 in sequences; None before any sample; inf when the |G|^2 average is not
        positive (the gradient is all noise as far as it can tell); 0 for a non-positive trace."""
        if self.weight <= 0:
            return None
        if self.grad_sq <= 0:
            return math.inf
        return max(0.0, self.trace / self.grad_sq)

    @property
    def ready(self) -> bool:
        """Whether the averages hold enough samples to act on (bias correction >= READY_WEIGHT)."""
        return self.weight >= READY_WEIGHT

    def drop_penalty(self, batch: float) -> float | None:
        """The predicted drop penalty at a global batch of ``batch`` sequences (None before any sample)."""
        b_simple = self.b_simple
        return None if b_simple is None else drop_penalty(b_simple, batch)

    def state_dict(self) -> dict:
        return {"grad_sq": self.grad_sq, "trace": self.trace, "weight": self.weight, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.grad_sq, self.trace = state["grad_sq"], state["trace"]
        self.weight, self.samples = state["weight"], state["samples"]
