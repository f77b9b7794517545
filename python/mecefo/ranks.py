"""A replica group of G ranks: how a group's work is split over its ranks, its data, its gradients.

Across groups nothing changes: the group index plays the role of the replica index in the step
plans (:mod:`mecefo.membership`), torchft decides which groups are live, and the MeCeFO
normalisers are counted in **group shards**. Inside a group:

* **Data.** A group shard is the ``G`` data shards ``g*G .. g*G+G-1`` of ``m`` sequences each, laid
  end to end (``G*m`` sequences, :class:`GroupBatches`). Rank ``r`` of group ``g`` therefore
  trains on exactly what replica ``g*G + r`` of a single-rank job with ``G*N`` replicas trains on,
  and a group of one rank is a replica of today's trainer.
* **Work.** Every work item of the group's plan (a range of a group shard, exact or in neighbour
  mode) is cut into ``G`` contiguous, nearly equal pieces; rank ``r`` runs piece ``r``
  (:func:`rank_items`). An item weighs its sequences over ``G*m``, so the gradients summed over all
  ranks of all groups, divided by the plan's normalisers, stay means over sequences.
* **Gradients.** How the group holds the model (:mod:`mecefo.sharding`): with ``--shard none``
  (DDP-style) each rank holds the whole model and gradients are SUM-all-reduced over the group's
  own gloo process group (:class:`IntraGroup`); with ``--shard fsdp`` FSDP2 reduce-scatters them
  and each rank keeps its shard. Then over the groups through torchft (each rank with the same
  rank of the other groups).

One rank dying fails its whole group: the group's other ranks fail in the intra-group
all-reduce (or are stopped by torchrun) and exit, torchft drops the group, and the restarted
group heals from a live one rank by rank (rank ``r`` receives the state from rank ``r`` of a
live group).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .membership import WorkItem


def rank_items(items: tuple[WorkItem, ...] | list[WorkItem], rank: int, world_size: int) -> list[WorkItem]:
    """Rank ``rank``'s pieces of a group's work items: each item's ``[start, stop)`` cut into
    ``world_size`` contiguous ranges (the first ``sequences % world_size`` one longer); empty pieces
    are left out, so a rank may run nothing while its group runs something."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    mine = []
    for item in items:
        base, extra = divmod(item.sequences, world_size)
        start = item.start + rank * base + min(rank, extra)
        stop = start + base + (1 if rank < extra else 0)
        if stop > start:
            mine.append(WorkItem(item.shard, start, stop, item.mode))
    return mine


class GroupBatches:
    """A group shard's micro-batches over the data shards (module docstring): ``micro_batch = G*m``.

    ``batch(step, shard, start, stop)`` returns the rows ``[start, stop)`` of group shard ``shard``,
    i.e. rows of data shards ``shard*G + j // m`` (``j`` in ``[start, stop)``), concatenated in order.
    """

    def __init__(self, batches, world_size: int):
        self.batches = batches
        self.world_size = world_size
        self.micro_batch = batches.micro_batch * world_size

    def batch(self, step: int, shard: int, start: int = 0,
              stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.batches.micro_batch
        stop = self.micro_batch if stop is None else stop
        if not 0 <= start < stop <= self.micro_batch:
            raise ValueError(f"sequence range [{start}, {stop}) is not a non-empty range within the group shard's "
                             f"{self.micro_batch} sequences")
        inputs, targets = [], []
        for data_shard in range(start // m, (stop - 1) // m + 1):
            lo, hi = max(start, data_shard * m), min(stop, (data_shard + 1) * m)
            x, y = self.batches.batch(step, shard * self.world_size + data_shard, lo - data_shard * m,
                                      hi - data_shard * m)
            inputs.append(x)
            targets.append(y)
        return torch.cat(inputs), torch.cat(targets)

    def val_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.val_batch(index)


class GroupFailed(RuntimeError):
    """A collective inside the group failed: a rank of this group is gone, so the whole group stops."""


@dataclass
class IntraGroup:
    """The group's own gloo process group (ranks ``0 .. world_size-1``), built from the group's store
    (kept in ``store``: ``--shard fsdp`` builds FSDP2's process group on it too)."""

    rank: int
    world_size: int
    pg: dist.ProcessGroup | None = None
    store: dist.Store | None = None

    @classmethod
    def connect(cls, store: dist.Store, rank: int, world_size: int, timeout_s: float) -> "IntraGroup":
        if world_size == 1:
            return cls(rank, world_size, store=store)
        pg = dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))
        return cls(rank, world_size, pg, store)

    def allreduce_sum(self, tensor: torch.Tensor, timeout_s: float | None = None) -> bool:
        """In-place SUM over the group's ranks; always True (a :data:`mecefo.sync.AllReduceSum`): a rank
        that is gone raises :class:`GroupFailed` instead, since the group cannot go on without it.
        ``timeout_s``: how long to wait for the other ranks (default: the group's timeout)."""
        if self.pg is None:
            return True
        opts = dist.AllreduceOptions()
        if timeout_s is not None:
            opts.timeout = timedelta(seconds=timeout_s)
        try:
            self.pg.allreduce([tensor], opts).wait()
        except RuntimeError as e:
            raise GroupFailed(f"rank {self.rank}: a rank of this group is gone ({str(e).splitlines()[0][:200]}); "
                              "the group stops and is restarted as a whole") from None
        return True
