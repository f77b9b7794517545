"""Time to quality: how much training progress a policy's steps make, and the wall clock to a target loss.

A failure-free job of S steps reaches validation loss ``L*(S)`` (a ladder of runs of several lengths,
each with its own warm-up and cosine decay, measured by bench/fidelity.py). A run under a policy that
ends at loss ``L`` after S steps made ``E = L*^-1(L)`` effective steps; its progress per step
(efficiency ``E / S``) is modelled as ``1 - penalty x share``, share being the fraction of its
sequences approximated or dropped. Combined with a policy's step rate under failures
(:mod:`mecefo.simulate`), this gives the wall clock to the failure-free job's final loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .simulate import FLOOR_APPROXIMATE, ClusterResult


def penalty_variant(variant: str) -> str:
    """The trained variant whose measured penalty a variant uses: quality depends only on which work is
    approximated (neighbour-orphan and auto approximate orphan work: spread-orphan's runs)."""
    policy, _, basis = variant.partition(":")
    trained = {"neighbour-orphan": "spread-orphan", "auto": "spread-orphan",
               FLOOR_APPROXIMATE: "spread-orphan"}.get(policy, policy)
    return trained + (f":{basis}" if basis else "")


@dataclass(frozen=True)
class QualityModel:
    """How much training progress a policy's steps make, from bench/fidelity.py's runs.

    A failure-free job of S steps reaches validation loss ``L*(S)`` (the ladder: runs of several
    lengths, each with its own warm-up and cosine decay). A run under a policy that ends at loss
    ``L`` after S steps made ``E = L*^-1(L)`` effective steps; its per-step efficiency ``E / S`` is
    modelled as ``1 - penalty x share``, share being the fraction of its sequences approximated
    (or, for shrink, dropped) over the run, so that ``penalty = (1 - E / S) / share``. Exact
    policies compute the full-batch gradient: efficiency 1 by construction.
    """

    penalties: dict[str, float]  # variant ("mecefo", "spread-orphan:momentum", "shrink", ...) -> penalty
    ladder: tuple[tuple[int, float], ...] = ()  # (steps, no-failure validation loss), fully annealed runs
    steps: int = 0  # S: the target is the no-failure run's loss after S steps

    @classmethod
    def from_results(cls, stored: dict) -> "QualityModel":
        """From bench/fidelity.py's ``quality_model`` entry (penalties as mean / sd / per seed)."""
        return cls({k: v["mean"] for k, v in stored["penalties"].items()},
                   tuple((int(s), loss) for s, loss in stored["ladder"]), stored["steps"])

    @classmethod
    def load(cls, path: str | Path) -> "QualityModel":
        """The quality model of a bench/fidelity.py results JSON (ValueError if it holds none)."""
        stored = json.loads(Path(path).read_text()).get("quality_model")
        if not stored:
            raise ValueError(f"{path} holds no quality_model (bench/fidelity.py --parts ttq writes it)")
        return cls.from_results(stored)

    def penalty(self, variant: str) -> float:
        """A measured penalty as the model uses it: a negative one (a failure run that ended better than no
        failure, which is noise at the runs' length) counts as 0, no better than the full batch."""
        return max(0.0, self.penalties.get(variant, 0.0))

    @property
    def drop_penalty(self) -> float:
        """Progress lost per unit share dropped: shrink's (any policy that drops pays it)."""
        return self.penalty("shrink")

    def approximation_penalty(self, variant: str) -> float:
        """The measured penalty of the trained variant with the same approximation (penalty_variant)."""
        return 0.0 if variant.split(":")[0] == "shrink" else self.penalty(penalty_variant(variant))

    def efficiency(self, variant: str, result: ClusterResult) -> float:
        e = (1.0 - self.approximation_penalty(variant) * result.approximated_share
             - self.drop_penalty * result.dropped_share)
        return max(1e-9, e)

    def loss_at(self, effective_steps: float) -> float:
        """L*(E): piecewise linear in log(steps), extended linearly past both ends."""
        return _interpolate_log([s for s, _ in self.ladder], [loss for _, loss in self.ladder], effective_steps)

    def effective_steps(self, loss: float) -> float:
        """L*^-1(loss): the steps a failure-free job needs to reach ``loss`` (the ladder decreases)."""
        steps, losses = [s for s, _ in self.ladder], [loss for _, loss in self.ladder]
        return math.exp(_interpolate(losses[::-1], [math.log(s) for s in steps][::-1], loss))


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear through (xs, ys) (xs increasing), extended linearly by the end segments."""
    i = max(1, min(len(xs) - 1, next((k for k, v in enumerate(xs) if v >= x), len(xs) - 1)))
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _interpolate_log(steps: list[int], losses: list[float], x: float) -> float:
    return _interpolate([math.log(s) for s in steps], losses, math.log(x))


@dataclass(frozen=True)
class TimeToQuality:
    variant: str
    scenario: str
    n: int
    time_ratio: float  # wall clock to reach L*(S), over the failure-free job's (S steps)
    loss_at_budget: float | None  # validation loss reached in the failure-free job's wall clock (None: no ladder)
    efficiency: float  # progress per step


def time_to_quality(variant: str, result: ClusterResult, quality: QualityModel) -> TimeToQuality:
    """Wall clock to the failure-free job's final loss, and the loss reached in its wall clock.

    The job needs ``S / efficiency`` steps at ``result.steps_per_s``; in the failure-free job's time
    (``S / free_steps_per_s``) it makes ``efficiency x S x steps_per_s / free_steps_per_s`` effective
    steps (its schedule planned for that many steps)."""
    e = quality.efficiency(variant, result)
    rate = result.steps_per_s / result.free_steps_per_s
    loss = quality.loss_at(e * rate * quality.steps) if quality.ladder else None
    return TimeToQuality(variant, result.scenario, result.n, 1 / (e * rate), loss, e)
