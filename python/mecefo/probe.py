"""Gradient-error probe: MeCeFO's gradient against the exact one, on the same weights and the same batch.

MeCeFO's convergence theorem assumes the approximate gradient has a bounded RELATIVE error
(the paper measured below 0.6 through LLaMA-1B training). This module measures it for a step
plan (:func:`mecefo.membership.plan_step`): which replicas are dead and which live replica
runs each dead replica's shard.

Notation, for one step with ``n`` shards (shard ``s`` = micro-batch ``batches.batch(step, s)``):

* ``g_s``: the exact gradient of shard s's mean loss (plain forward/backward);
* ``ĝ_s``: the gradient a neighbour computes for shard s in MeCeFO neighbour mode (attention
  backward skipped, low-rank FFN weight gradients); it has no attention / input_layernorm part.
  A neighbour runs two shards in neighbour mode: its own and the dead replica's;
* ``N``: the live replicas that are not neighbours; ``P``: the shards processed (n unless more
  than half the replicas are gone).

Exact step gradient (what ndb-exact applies, and what training without failures applies)::

    G = (1/P) sum_s g_s

MeCeFO step gradient, what the trainer's all-reduce and normalisers (:mod:`mecefo.sync`,
:func:`mecefo.membership.normalisers`) produce before clipping::

    attention params (Wq, Wk, Wv, Wo, input_layernorm):  Ĝ = (1/|N|) sum_{k in N} g_k
    every other param:  Ĝ = (1/P) (sum_{k in N} g_k + sum_{s run by a neighbour} ĝ_s)

Reported (:class:`ProbeResult`):

* ``step``: ``||Ĝ - G|| / ||G||`` over all parameters ("total") and per group ("attention",
  "ffn": the gate/up/down projections, "other": embeddings, norms outside attention, LM head).
  This is the error of the gradient the optimizer sees, the quantity the theorem bounds.
* ``shrink``: the step error of what policy shrink applies at the same weights under the same
  plan: every live replica's own shard, exact, averaged over |live| (the dead shards dropped).
  Unbiased but from a smaller batch; the yardstick MeCeFO's biased full-batch estimate has to beat.
* ``shards``: for each shard run in neighbour mode, ``||ĝ_s - g_s|| / ||g_s||`` total and per
  group: the error of one neighbour micro-batch on its own. Its attention part is 1 by
  construction (no gradient at all); the FFN part holds both approximations, the low-rank
  projection and the changed upstream gradient (every layer's input gradient skips the
  attention Jacobian, so the FFNs below the top layer see a different dL/dh).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .membership import StepPlan, normalisers, plan_step
from .model import shard_loss
from .neighbor import MeCeFOPath

GROUPS = ("attention", "ffn", "other")
Gradients = dict[str, torch.Tensor]


def parameter_groups(model: torch.nn.Module, path: MeCeFOPath) -> dict[str, str]:
    """Parameter name -> "attention" (skipped by neighbours), "ffn" (inside a layer's mlp) or "other"."""
    skipped = set(path.skipped_parameters(model))
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in skipped:
            groups[name] = "attention"
        elif ".mlp." in f".{name}":
            groups[name] = "ffn"
        else:
            groups[name] = "other"
    return groups


def shard_gradient(model: torch.nn.Module, path: MeCeFOPath, batches, step: int, shard: int, *,
                   neighbour: bool) -> Gradients:
    """Gradient of shard ``shard``'s mean loss at ``step`` (parameters without a gradient are left out)."""
    device = next(model.parameters()).device
    inputs, targets = batches.batch(step, shard)
    model.zero_grad(set_to_none=True)
    with path.context(model, neighbour):
        loss = shard_loss(model, inputs.to(device), targets.to(device))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _add(total: Gradients, grads: Gradients) -> None:
    for name, g in grads.items():
        if name in total:
            total[name] += g
        else:
            total[name] = g.clone()


@dataclass
class ExactGradients:
    """The exact quantities of one (weights, step, plan): computed once, compared with any MeCeFO variant."""

    plan: StepPlan
    step_gradient: Gradients  # G = (1/P) sum_s g_s
    non_neighbour_sum: Gradients  # sum_{k in N} g_k
    neighbour_shards: dict[int, Gradients]  # g_s for every shard a neighbour runs


def neighbour_run_shards(plan: StepPlan) -> list[int]:
    """The shards run in neighbour mode under ``plan``: each neighbour's own and the one it covers."""
    return sorted(s for r in plan.neighbours for s in plan.shards_of(r))


def exact_gradients(model: torch.nn.Module, path: MeCeFOPath, batches, step: int, plan: StepPlan) -> ExactGradients:
    """Every processed shard's exact gradient at the model's current weights, summed as the probe needs."""
    if not plan.neighbours:
        raise ValueError(f"the plan has no neighbour ({plan.describe()}): MeCeFO's gradient is the exact one")
    total: Gradients = {}
    non_neighbour: Gradients = {}
    per_shard: dict[int, Gradients] = {}
    run_by_neighbours = set(neighbour_run_shards(plan))
    for shard in sorted(s for r in plan.live for s in plan.shards_of(r)):
        g = shard_gradient(model, path, batches, step, shard, neighbour=False)
        _add(total, g)
        if shard in run_by_neighbours:
            per_shard[shard] = g
        else:
            _add(non_neighbour, g)
    processed = normalisers(plan, "ndb-exact").rest
    return ExactGradients(plan, {k: v / processed for k, v in total.items()}, non_neighbour, per_shard)


def neighbour_gradients(model: torch.nn.Module, path: MeCeFOPath, batches, step: int,
                        plan: StepPlan) -> dict[int, Gradients]:
    """ĝ_s for every shard run in neighbour mode, with the model's current low-rank bases."""
    return {s: shard_gradient(model, path, batches, step, s, neighbour=True) for s in neighbour_run_shards(plan)}


def mecefo_step_gradient(exact: ExactGradients, neighbour: dict[int, Gradients], groups: dict[str, str]) -> Gradients:
    """Ĝ: what the trainer's SUM all-reduce and MeCeFO normalisers make of these shard gradients."""
    norms = normalisers(exact.plan, "mecefo")
    out = {}
    for name, g in exact.step_gradient.items():
        summed = exact.non_neighbour_sum.get(name, torch.zeros_like(g))
        if groups[name] == "attention":
            # neighbours contribute nothing; |N| = 0 means no update (a zero step for these parameters)
            out[name] = summed / norms.attention if norms.attention else torch.zeros_like(g)
        else:
            summed = summed.clone()
            for grads in neighbour.values():
                summed += grads.get(name, torch.zeros_like(g))
            out[name] = summed / norms.rest
    return out


def shrink_step_gradient(exact: ExactGradients) -> Gradients:
    """What policy shrink applies under the same plan: (1/|live|) sum over live replicas r of g_r."""
    plan = exact.plan
    live = normalisers(plan, "shrink").rest
    out = {}
    for name, g in exact.step_gradient.items():
        summed = exact.non_neighbour_sum.get(name, torch.zeros_like(g)).clone()
        for r in plan.neighbours:  # a neighbour's own shard is shard r
            summed += exact.neighbour_shards[r][name]
        out[name] = summed / live
    return out


def relative_errors(approx: Gradients, exact: Gradients, groups: dict[str, str]) -> dict[str, float]:
    """||approx - exact|| / ||exact|| over all parameters ("total") and per group; missing approx = 0.

    Norms are Frobenius over the concatenation of the group's parameters, accumulated in float64.
    """
    num = dict.fromkeys(("total", *GROUPS), 0.0)
    den = dict.fromkeys(("total", *GROUPS), 0.0)
    for name, e in exact.items():
        e = e.double()
        a = approx[name].double() if name in approx else torch.zeros_like(e)
        diff, ref = (a - e).square().sum().item(), e.square().sum().item()
        for key in ("total", groups[name]):
            num[key] += diff
            den[key] += ref
    return {k: (num[k] / den[k]) ** 0.5 if den[k] > 0 else float("nan") for k in num}


@dataclass
class ProbeResult:
    step: dict[str, float]  # relative error of the step gradient, total and per group
    shards: dict[int, dict[str, float]] = field(default_factory=dict)  # per neighbour-run shard
    shrink: dict[str, float] = field(default_factory=dict)  # shrink's step gradient, same weights and plan

    def shard_mean(self) -> dict[str, float]:
        """The per-shard errors averaged over the shards run in neighbour mode."""
        keys = next(iter(self.shards.values())).keys()
        return {k: sum(e[k] for e in self.shards.values()) / len(self.shards) for k in keys}


def compare(exact: ExactGradients, neighbour: dict[int, Gradients], groups: dict[str, str]) -> ProbeResult:
    """The step-level and per-shard relative errors of one MeCeFO variant against the exact gradients."""
    step = relative_errors(mecefo_step_gradient(exact, neighbour, groups), exact.step_gradient, groups)
    shards = {s: relative_errors(neighbour[s], exact.neighbour_shards[s], groups) for s in sorted(neighbour)}
    shrink = relative_errors(shrink_step_gradient(exact), exact.step_gradient, groups)
    return ProbeResult(step, shards, shrink)


def probe(model: torch.nn.Module, path: MeCeFOPath, batches, step: int, plan: StepPlan) -> ProbeResult:
    """The gradient error at the model's current weights and bases, on step ``step``'s batch, under ``plan``."""
    groups = parameter_groups(model, path)
    exact = exact_gradients(model, path, batches, step, plan)
    return compare(exact, neighbour_gradients(model, path, batches, step, plan), groups)


def single_failure_plan(n: int, dead: int = 0) -> StepPlan:
    """The plan with one replica dead out of ``n``: replica ``dead + 1`` runs both shards."""
    return plan_step(n, [r for r in range(n) if r != dead], "mecefo")

