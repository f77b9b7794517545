"""How a neighbour runs its shards: the only place the trainer touches the MeCeFO kernels.

* :class:`ExactPath` (policies ndb-exact, shrink, restart): plain forward/backward for every
  shard; a neighbour does the exact double work.
* :class:`MeCeFOPath` (policy mecefo): the model is patched once with
  ``mecefo_kernels.apply_mecefo``; while a replica is a neighbour it runs BOTH its shards inside
  ``mecefo_kernels.neighbor_mode`` (attention backward skipped, FFN recomputed, low-rank FFN
  weight gradients), and refreshes the low-rank bases with ``mecefo_kernels.refresh_bases``.
  The parameters that get no gradient in neighbour mode come from
  ``mecefo_kernels.neighbor_skipped_parameters``; the gradient sync averages them over |N|.

Bases refresh rule (:func:`needs_refresh`): when a replica becomes a neighbour, and then at
every step that is a multiple of ``tau`` while it stays one. Failure-free training computes no
SVD at all, and a run resumed from a checkpoint at a multiple of ``tau`` refreshes exactly when
the uninterrupted run did.
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

    def refresh(self, model: torch.nn.Module) -> None:
        pass


class MeCeFOPath:
    """Neighbours run both shards in MeCeFO neighbour mode (mecefo_kernels' public API)."""

    name = "mecefo"

    def __init__(self, rank: int | None, tau: int):
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
        options = {"refresh_every": self.tau}
        if self.rank is not None:
            options["rank"] = self.rank
        self._api.apply_mecefo(model, **options)
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

    def refresh(self, model: torch.nn.Module) -> None:
        self._api.refresh_bases(model)


def neighbor_path(policy: str, *, rank: int | None, tau: int) -> ExactPath | MeCeFOPath:
    return MeCeFOPath(rank, tau) if policy == "mecefo" else ExactPath()


def needs_refresh(step: int, tau: int, *, was_neighbour: bool, bases_step: int | None) -> bool:
    """Whether a replica that is a neighbour at ``step`` must recompute its bases first.

    ``was_neighbour``: it was a neighbour at its previous committed step; ``bases_step``: the
    step whose weights its current bases were computed from (None: never).
    """
    if bases_step == step:  # already refreshed for these weights (a replayed step)
        return False
    return not was_neighbour or bases_step is None or step % tau == 0
