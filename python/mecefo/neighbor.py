"""How work runs in MeCeFO's neighbour mode: the only place the trainer touches the MeCeFO kernels.

* :class:`ExactPath` (policies that never approximate: ndb-exact, spread, shrink, restart): plain
  forward/backward for every work item.
* :class:`MeCeFOPath` (policies that approximate: mecefo, spread-orphan, neighbour-orphan, auto,
  ...): the model is patched once with ``mecefo_kernels.apply_mecefo``; a work item in neighbour
  mode runs its forward inside ``mecefo_kernels.neighbor_mode`` (attention backward skipped, FFN
  recomputed, low-rank FFN weight gradients). The parameters that get no gradient in neighbour
  mode come from ``mecefo_kernels.neighbor_skipped_parameters``.

Bases: one set for the whole job. Every replica in the quorum refreshes its bases at the same
steps (:func:`refresh_due`) from the same weights (or the same AdamW first moments,
``--basis momentum``), so all replicas hold the same bases and a sequence's neighbour-mode gradient
does not depend on which replica runs it. They are refreshed when a step needs neighbour mode and
the previous committed step did not (a failure episode starts), and then at every multiple of
``tau`` while the episode lasts. A replica that heals receives the bases with the rest of the
state, and checkpoints hold them, so healing and resuming change nothing. Failure-free training
computes no basis at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .policy import BASES, Policy


class ExactPath:
    """Every work item runs exactly."""

    name = "exact"
    tau = 1  # never consulted: nothing runs in neighbour mode, so no bases are ever due

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def skipped_parameters(self, model: torch.nn.Module) -> list[str]:
        return []

    @contextlib.contextmanager
    def context(self, model: torch.nn.Module, neighbour: bool) -> Iterator[None]:
        if neighbour:
            raise RuntimeError("a work item in neighbour mode, but this policy never approximates (ExactPath)")
        yield

    def refresh(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                basis_fn=None) -> bool:
        return False

    def bases_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {}

    def load_bases(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError("received low-rank bases, but this policy never approximates")


class MeCeFOPath:
    """Work items in neighbour mode run inside mecefo_kernels' neighbor_mode."""

    name = "mecefo"

    def __init__(self, rank: int | float | None, tau: int | None, basis: str = "weight"):
        import mecefo_kernels

        missing = [f for f in ("apply_mecefo", "neighbor_mode", "refresh_bases", "neighbor_skipped_parameters",
                               "bases_state_dict", "load_bases_state_dict") if not hasattr(mecefo_kernels, f)]
        if missing:
            raise RuntimeError(f"approximating policies (mecefo, ...) need mecefo_kernels.{', '.join(missing)}, which "
                               "this build of mecefo_kernels does not provide; use --policy ndb-exact, spread, shrink "
                               "or restart")
        if basis not in BASES:
            raise ValueError(f"basis must be one of {', '.join(BASES)}, got {basis!r}")
        from mecefo_kernels.nn.decoder import DEFAULT_REFRESH_EVERY

        self._api = mecefo_kernels
        self.rank = rank
        self.tau = tau if tau is not None else DEFAULT_REFRESH_EVERY
        self.basis = basis

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        options = {"rank": self.rank, "refresh_every": self.tau, "basis": self.basis}
        self._api.apply_mecefo(model, **{k: v for k, v in options.items() if v is not None})
        return model

    def skipped_parameters(self, model: torch.nn.Module) -> list[str]:
        return list(self._api.neighbor_skipped_parameters(model))

    @contextlib.contextmanager
    def context(self, model: torch.nn.Module, neighbour: bool) -> Iterator[None]:
        if not neighbour:
            yield
            return
        with self._api.neighbor_mode(model):
            yield

    def refresh(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                basis_fn=None) -> bool:
        """Recompute the bases now (from the first moments in ``optimizer`` with basis momentum), each with
        ``basis_fn`` (None: mecefo_kernels' own, on whole weights; :class:`mecefo.sharded_basis.ShardedBasis`
        for sharded ones)."""
        return bool(self._api.refresh_bases(model, optimizer=optimizer if self.basis == "momentum" else None,
                                            basis_fn=basis_fn))

    def bases_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self._api.bases_state_dict(model)

    def load_bases(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self._api.load_bases_state_dict(model, state)


def neighbor_path(policy: Policy, *, rank: int | float | None, tau: int | None,
                  basis: str = "weight") -> ExactPath | MeCeFOPath:
    return MeCeFOPath(rank, tau, basis) if policy.may_approximate else ExactPath()


def refresh_due(step: int, *, needed: bool, episode_open: bool, bases_step: int | None, tau: int) -> bool:
    """Whether every replica recomputes the bases before running ``step``.

    ``needed``: the step's plan runs neighbour-mode work on some replica; ``episode_open``: the
    previous committed step's plan did too; ``bases_step``: the step whose weights the current
    bases come from (None: none yet). True when an episode starts, when there are no bases, and at
    multiples of ``tau`` within an episode; never twice for the same step (a replayed step).
    """
    if not needed or bases_step == step:
        return False
    return bases_step is None or not episode_open or step % tau == 0
