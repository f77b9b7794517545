"""Gradient-error probe: an approximating policy's gradient against the exact one, same weights, same batch.

MeCeFO's convergence theorem assumes the approximate gradient has a bounded RELATIVE error
(the paper measured below 0.6 through LLaMA-1B training). This module measures it for a step
plan (:func:`mecefo.membership.plan_step`): which replicas are dead, who runs their work and
which work runs in neighbour mode.

Notation, for one step with ``n`` shards (shard ``s`` = micro-batch ``batches.batch(step, s)``):

* ``g_s``: the exact gradient of shard s's mean loss (plain forward/backward);
* ``ĝ_s``: the gradient of shard s in MeCeFO neighbour mode (attention backward skipped,
  low-rank FFN weight gradients); it has no attention / input_layernorm part. The paper's
  neighbour runs two shards that way, its own and the dead replica's; with orphan-only
  approximation only the dead replica's;
* ``X``: the shards run exactly; ``P``: the shards processed (n unless shards are dropped).

Exact step gradient (what ndb-exact and spread apply, and what training without failures applies)::

    G = (1/P) sum_s g_s

Approximate step gradient, what the trainer's all-reduce and normalisers (:mod:`mecefo.sync`,
:meth:`mecefo.membership.StepPlan.normalisers`) produce before clipping::

    attention params (Wq, Wk, Wv, Wo, input_layernorm):  Ĝ = (1/|X|) sum_{s in X} g_s
    every other param:  Ĝ = (1/P) (sum_{s in X} g_s + sum_{s in neighbour mode} ĝ_s)

(under the paper's MeCeFO, X holds the shards of N, the live replicas that are not neighbours).
:func:`plan_gradient` computes the same for any plan, sequence ranges included, by running every
replica's work items as the trainer does.

Reported (:class:`ProbeResult`):

* ``step``: ``||Ĝ - G|| / ||G||`` over all parameters ("total") and per group ("attention",
  "ffn": the gate/up/down projections, "other": embeddings, norms outside attention, LM head).
  This is the error of the gradient the optimizer sees, the quantity the theorem bounds.
* ``shrink``: the step error of what policy shrink applies at the same weights under the same
  plan: every live replica's own shard, exact, averaged over |live| (the dead shards dropped).
  Unbiased but from a smaller batch; the yardstick an approximating policy has to beat.
* ``shards``: for each shard run in neighbour mode, ``||ĝ_s - g_s|| / ||g_s||`` total and per
  group: the error of one neighbour micro-batch on its own. Its attention part is 1 by
  construction (no gradient at all); the FFN part holds both approximations, the low-rank
  projection and the changed upstream gradient (every layer's input gradient skips the
  attention Jacobian, so the FFNs below the top layer see a different dL/dh).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .membership import NEIGHBOUR, StepPlan, plan_step
from .model import run_work, shard_loss
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
    """The exact quantities of one (weights, step, plan): computed once, compared with any approximation."""

    plan: StepPlan
    step_gradient: Gradients  # G = (1/P) sum_s g_s
    shards: dict[int, Gradients]  # g_s for every processed shard


def neighbour_run_shards(plan: StepPlan) -> list[int]:
    """The shards run in neighbour mode under ``plan`` (whole shards: neighbour takeover)."""
    return sorted({item.shard for r in plan.live for item in plan.items_of(r) if item.mode == NEIGHBOUR})


def _check_whole_shards(plan: StepPlan) -> None:
    if any(item.sequences != plan.sequences for r in plan.live for item in plan.items_of(r)):
        raise ValueError(f"the probe compares whole shards; this plan splits them ({plan.describe()}): "
                         "use plan_gradient")


def exact_gradients(model: torch.nn.Module, path: MeCeFOPath, batches, step: int, plan: StepPlan) -> ExactGradients:
    """Every processed shard's exact gradient at the model's current weights, and their mean."""
    if not plan.runs_neighbour_mode():
        raise ValueError(f"the plan has no neighbour-mode work ({plan.describe()}): its gradient is the exact one")
    _check_whole_shards(plan)
    total: Gradients = {}
    per_shard: dict[int, Gradients] = {}
    for shard in sorted(s for r in plan.live for s in plan.shards_of(r)):
        per_shard[shard] = shard_gradient(model, path, batches, step, shard, neighbour=False)
        _add(total, per_shard[shard])
    return ExactGradients(plan, {k: v / plan.processed for k, v in total.items()}, per_shard)


def neighbour_gradients(model: torch.nn.Module, path: MeCeFOPath, batches, step: int,
                        plan: StepPlan) -> dict[int, Gradients]:
    """ĝ_s for every shard run in neighbour mode, with the model's current low-rank bases."""
    return {s: shard_gradient(model, path, batches, step, s, neighbour=True) for s in neighbour_run_shards(plan)}


def approximate_step_gradient(exact: ExactGradients, neighbour: dict[int, Gradients],
                              groups: dict[str, str]) -> Gradients:
    """Ĝ: what the trainer's SUM all-reduce and the plan's normalisers make of these shard gradients:
    shards in ``neighbour`` contribute ĝ_s (no attention part), the others g_s; attention parameters
    are divided by the exact shards' count (no exact shard: no update, a zero step), the rest by
    the processed shards'."""
    norms = exact.plan.normalisers()
    out = {}
    for name, g in exact.step_gradient.items():
        summed = torch.zeros_like(g)
        for shard, grads in exact.shards.items():
            part = neighbour[shard].get(name) if shard in neighbour else grads[name]
            if part is not None:
                summed += part
        divisor = norms.attention if groups[name] == "attention" else norms.rest
        out[name] = summed / divisor if divisor else torch.zeros_like(g)
    return out


def shrink_step_gradient(exact: ExactGradients) -> Gradients:
    """What policy shrink applies under the same plan: (1/|live|) sum over live replicas r of g_r."""
    live = exact.plan.live
    return {name: sum(exact.shards[r][name] for r in live) / len(live) for name in exact.step_gradient}


def plan_gradient(model: torch.nn.Module, path, batches, step: int, plan: StepPlan) -> Gradients:
    """The step gradient (before clipping) of any plan, as the trainer computes it: every live replica
    runs its work items (:func:`mecefo.model.run_work`), the sums are added and each parameter divided
    by its group's normaliser. Parameters nobody produced a gradient for are absent."""
    device = next(model.parameters()).device
    skipped = set(path.skipped_parameters(model))
    total: Gradients = {}
    for replica in plan.live:
        model.zero_grad(set_to_none=True)
        run_work(model, path, batches, step, plan.items_of(replica), device)
        _add(total, {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    norms = plan.normalisers()
    out = {}
    for name, g in total.items():
        divisor = norms.attention if name in skipped else norms.rest
        if divisor:
            out[name] = g / divisor
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
    step = relative_errors(approximate_step_gradient(exact, neighbour, groups), exact.step_gradient, groups)
    shards = {s: relative_errors(neighbour[s], exact.shards[s], groups) for s in sorted(neighbour)}
    shrink = relative_errors(shrink_step_gradient(exact), exact.step_gradient, groups)
    return ProbeResult(step, shards, shrink)


def probe(model: torch.nn.Module, path: MeCeFOPath, batches, step: int, plan: StepPlan) -> ProbeResult:
    """The gradient error at the model's current weights and bases, on step ``step``'s batch, under ``plan``."""
    groups = parameter_groups(model, path)
    exact = exact_gradients(model, path, batches, step, plan)
    return compare(exact, neighbour_gradients(model, path, batches, step, plan), groups)


def single_failure_plan(n: int, dead: int = 0, policy: str = "mecefo") -> StepPlan:
    """The plan with one replica dead out of ``n``: replica ``dead + 1`` runs the dead shard as well."""
    return plan_step(n, [r for r in range(n) if r != dead], policy)

