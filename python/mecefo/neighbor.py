"""How a neighbour runs its shards: the only place the trainer touches the MeCeFO kernels.

* :class:`ExactPath` (policies ndb-exact, shrink, restart): plain forward/backward for every
  shard; a neighbour does the exact double work.
* :class:`MeCeFOPath` (policy mecefo): the model is patched once with
  ``mecefo_kernels.apply_mecefo``; while a replica is a neighbour it runs BOTH its shards inside
  ``mecefo_kernels.neighbor_mode`` (attention backward skipped, FFN recomputed, low-rank FFN
  weight gradients), and refreshes the low-rank bases with ``mecefo_kernels.refresh_bases``.
  The parameters that get no gradient in neighbour mode come from
  ``mecefo_kernels.neighbor_skipped_parameters``; the gradient sync averages them over |N|.

Bases refresh rule (:func:`refresh_due`): when a replica becomes a neighbour, and then at every
step that is a multiple of ``tau`` while it stays one (``refresh_bases(model, step=step)``: the
period is the one given to ``apply_mecefo``). Failure-free training computes no basis at all, and
a run resumed from a checkpoint at a multiple of ``tau`` refreshes exactly when the
uninterrupted run did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ExactPath:
    """Neighbours run the orphaned shard exactly like their own."""

    name = "exact"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def skipped_parameters(self, model: torch.nn.Module) -> list[str]:
        return []

    @contextlib.contextmanager
    def context(self, model: torch.nn.Module, neighbour: bool) -> Iterator[None]:
        yield

    def refresh(self, model: torch.nn.Module, step: int | None = None) -> bool:
        return False


class MeCeFOPath:
    """Neighbours run both shards in MeCeFO neighbour mode (mecefo_kernels' public API)."""

    name = "mecefo"

    def __init__(self, rank: int | float | None, tau: int | None):
        import mecefo_kernels

        missing = [f for f in ("apply_mecefo", "neighbor_mode", "refresh_bases", "neighbor_skipped_parameters")
                   if not hasattr(mecefo_kernels, f)]
        if missing:
            raise RuntimeError(f"policy mecefo needs mecefo_kernels.{', '.join(missing)}, which this build of "
                               "mecefo_kernels does not provide; use --policy ndb-exact, shrink or restart")
        self._api = mecefo_kernels
        self.rank = rank
        self.tau = tau

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        options = {"rank": self.rank, "refresh_every": self.tau}  # None: mecefo_kernels' defaults
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

    def refresh(self, model: torch.nn.Module, step: int | None = None) -> bool:
        """Recompute the bases now (step None) or if ``step`` is a multiple of tau; True if it did."""
        return bool(self._api.refresh_bases(model, step=step))


def neighbor_path(policy: str, *, rank: int | float | None, tau: int | None) -> ExactPath | MeCeFOPath:
    return MeCeFOPath(rank, tau) if policy == "mecefo" else ExactPath()


NOW = "now"
PERIODIC = "periodic"


def refresh_due(step: int, *, was_neighbour: bool, bases_step: int | None) -> str | None:
    """How a replica that is a neighbour at ``step`` refreshes its bases before running it.

    ``was_neighbour``: it was a neighbour at its previous committed step; ``bases_step``: the
    step whose weights its current bases were computed from (None: not since it started).
    Returns NOW (entering an episode: recompute), PERIODIC (within an episode: recompute if
    ``step`` is a multiple of tau) or None (already done for this step: a replayed step).
    """
    if bases_step == step:
        return None
    return NOW if not was_neighbour or bases_step is None else PERIODIC
