"""How a replica group holds the model: whole on every rank (``--shard none``) or FSDP2 (``--shard fsdp``).

Across groups nothing depends on this: the group is one replica of the job, its plan's work items
are cut over its ranks (:mod:`mecefo.ranks`), and rank ``r`` of every group all-reduces its
gradients with rank ``r`` of the others through torchft (:mod:`mecefo.sync`), divided by the plan's
normalisers. Inside the group the two holdings differ:

:class:`Replicated` (``none``, today's groups): every rank holds the whole model and AdamW state;
gradients are SUM-all-reduced over the group (DDP-style; gloo, or NCCL for CUDA tensors:
:mod:`mecefo.backends`); checkpoints are one file written by the group's rank 0
(:mod:`mecefo.checkpoint`); a healing rank receives the whole state.

:class:`FullyShardedGroup` (``fsdp``, HSDP with torchft across groups): every decoder layer and the
root get FSDP2's ``fully_shard`` over a 1-D DeviceMesh of the group's ranks. The mesh's process
group is a default process group made of the group's own store (each group's processes form their
own torch.distributed world of G ranks; torchft's cross-group groups are separate objects), so FSDP2
never talks across groups. Each rank holds rows ``[r*c, (r+1)*c)`` of every parameter
(``c = ceil(rows / G)``) and the AdamW state of those rows only: 1/G of the bytes
(:func:`planned_state_bytes`). What changes:

* **Gradients.** FSDP2 reduce-scatters each layer's gradient in backward. Its default is a mean
  over the group (and on gloo the reduction must stay a plain SUM: gloo has no AVG or PREMUL_SUM,
  pytorch issue 162338), so every FSDP module gets divide factor 1 and SUM-only collectives: the
  shard holds exactly the group's sum, as the DDP-style all-reduce would. Then rank ``r``'s shards
  go across groups (:class:`mecefo.sync.GradientSync` on the local shards).
* **Passes.** FSDP2 all-gathers in every forward and reduce-scatters in every backward, so all
  ranks of a group must run the same number of passes, each in the same mode (neighbour mode
  leaves the attention weights without a gradient: the set of reduced gradients must match too).
  For every work item of the group, each rank runs its piece, or an *idle pass* (one sequence of
  the item, loss times 0: exactly zero gradients) when its piece is empty.
* **Clipping** uses the global norm: each rank's squared norm of its shards, summed over the group.
* **Heal** (torchft's Manager per rank, rank ``r`` from rank ``r`` of a live group, all ranks in
  parallel): the state sent is this rank's shards as plain tensors, never a gathered tensor.
* **Checkpoints** are torch.distributed.checkpoint directories, every rank writing its shards
  (:mod:`mecefo.sharded_checkpoint`), so checkpointing and evaluation involve every rank of the
  writing group.
* **Low-rank bases** of sharded weights come from a sharded randomized SVD
  (:mod:`mecefo.sharded_basis`), identical on every rank of every group.

Mixed precision lives in :func:`mixed_precision`: with ``--dtype bfloat16`` the shards are fp32
master weights (and fp32 AdamW state), FSDP2 all-gathers bf16 copies for compute and reduces
gradients in fp32 (gloo has no bf16 reductions), and the trainer's bf16 autocast
(:func:`mecefo.model.compute_context`) still wraps every forward, so the ops autocast keeps in fp32
stay there. The two compose, but not bit for bit with the unsharded bf16 run: FSDP2 rounds every
parameter to bf16 (embedding and norm outputs too), autocast only the matmuls' operands
(test_sharding.py: the gradients are as close to fp32 as the unsharded bf16 ones, within 2x).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from .backends import local_backends
from .membership import WorkItem
from .model import run_work, shard_loss
from .ranks import GroupFailed, IntraGroup, rank_items
from .sync import local_shard

FSDP_STORE_PREFIX = "mecefo/fsdp"


# ---- what a rank holds -------------------------------------------------------------------------

def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters and of the optimizer state (its shards when sharded)."""
    params = sum(local_shard(p).numel() * p.element_size() for p in model.parameters())
    optim = sum(local_shard(v).numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return {"param_bytes": params, "optimizer_bytes": optim}


def shard_rows(rows: int, group_size: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of rank ``rank``'s shard of a dim-0 sharded tensor of ``rows`` rows (FSDP2
    cuts as ``torch.chunk`` does: ``ceil(rows / G)`` rows each, the last ones shorter or empty)."""
    chunk = math.ceil(rows / group_size)
    start = min(rank * chunk, rows)
    return start, min(chunk, rows - start)


def preset_shapes(preset: str) -> list[tuple[int, ...]]:
    """The parameter shapes of a preset's LlamaForCausalLM (built on the meta device: no memory)."""
    from transformers import LlamaForCausalLM

    from .presets import get_preset

    with torch.device("meta"):
        model = LlamaForCausalLM(get_preset(preset).to_llama_config())
    return [tuple(p.shape) for p in model.parameters()]


def planned_state_bytes(shapes: list[tuple[int, ...]], group_size: int, param_bytes: int) -> dict[str, int]:
    """What rank 0 (the largest shard) holds of parameters of ``shapes`` under FSDP2 over ``group_size``
    ranks with AdamW: ``param_bytes`` per element of the (master) parameters, twice that for the
    first and second moments, 4 bytes for each parameter's step counter (a float32 scalar)."""
    elements = 0
    for shape in shapes:
        _, rows = shard_rows(shape[0], group_size, 0)
        elements += rows * math.prod(shape[1:])
    return {"param_bytes": elements * param_bytes, "optimizer_bytes": 2 * elements * param_bytes + 4 * len(shapes)}


# ---- the two holdings ----------------------------------------------------------------------------

class Replicated:
    """``--shard none``: every rank holds the whole model and optimizer state (module docstring)."""

    name = "none"
    collective_io = False  # checkpoints and evaluation: the group's rank 0 alone

    def __init__(self, ranks: IntraGroup, device: torch.device | None = None, timeout_s: float = 60.0):
        self.ranks = ranks
        self._group_sum = ranks.allreduce_sum
        if device is not None and device.type == "cuda" and ranks.world_size > 1:  # NCCL for the gradients
            _init_group(ranks, device, timeout_s)
            self._group_sum = self._nccl_sum

    def _nccl_sum(self, tensor: torch.Tensor) -> bool:
        try:
            dist.all_reduce(tensor)
        except RuntimeError as e:
            if not collective_failure(e):
                raise
            raise GroupFailed(f"rank {self.ranks.rank}: a rank of this group is gone ({str(e).splitlines()[0][:200]}); "
                              "the group stops and is restarted as a whole") from None
        return True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def run_work(self, model, path, batches, step: int, items, device, *, micro_batch: int | None = None,
                 compute=contextlib.nullcontext) -> tuple[float, float]:
        """Forward + backward of this rank's pieces of the group's work ``items`` in micro-batches of at most
        ``micro_batch`` sequences (:func:`mecefo.model.run_work`): (loss sum, shards run)."""
        return run_work(model, path, batches, step, rank_items(items, self.ranks.rank, self.ranks.world_size),
                        device, micro_batch=micro_batch, compute=compute)

    def reduce_in_group(self, sync, contributes: bool) -> None:
        """Sum the gradients over the group's ranks (every rank takes part, with zeros if it ran nothing)."""
        if self.ranks.world_size > 1:
            sync.reduce(self._group_sum, contributes=contributes)

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> float:
        """Clip to ``max_norm``; the total norm before clipping (the noise scale reuses it)."""
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=False).double())

    def grad_squared_norm(self, params) -> float:
        """Sum of squares of the gradients of ``params`` (this group's gradient: after reduce_in_group)."""
        from .noise import squared_norm

        return squared_norm(p.grad for p in params)

    def transfer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The model and optimizer state a healing rank receives (and a checkpoint holds)."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_transfer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(self, directory, step: int, model, optimizer, extra: dict, lineage: str):
        from .checkpoint import save_checkpoint

        return save_checkpoint(directory, step, {**self.transfer_state(model, optimizer), **extra}, lineage=lineage)

    def load_latest(self, directory, model, optimizer, warn: Callable[[str], None]):
        """The newest intact checkpoint loaded into ``model`` and ``optimizer``: (its other entries, path), or None."""
        from .checkpoint import load_latest

        found = load_latest(directory, warn=warn)
        if found is None:
            return None
        state, path = found
        self.load_transfer_state(model, optimizer, state)
        return state, path

    def prune_checkpoints(self, directory, keep: int) -> None:
        from .checkpoint import prune_checkpoints

        prune_checkpoints(directory, keep)

    def basis_function(self):
        """How the low-rank bases are computed from a weight: None, mecefo_kernels' own (whole weights)."""
        return None

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state_dict (for an export); every rank of the group calls it."""
        return model.state_dict()


def collective_failure(e: BaseException) -> bool:
    """Whether ``e`` says a collective failed because a peer is gone or silent (gloo raises plain RuntimeErrors:
    "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer ...", timeouts; NCCL DistBackendErrors)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(m in text for m in ("/gloo/", "Connection closed", "Connection reset",
                                                                      "Timed out", "timed out"))


def mixed_precision(dtype: str):
    """FSDP2's mixed-precision policy for ``--dtype``: None (compute in the parameters' dtype) for float32 and
    float64; for bfloat16, bf16 compute on fp32 master shards with fp32 gradient reduction (gloo has no bf16
    collectives, and a bf16 sum of many ranks' gradients loses precision anyway)."""
    if dtype != "bfloat16":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers FSDP2 wraps one by one (a transformers causal LM: ``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"--shard fsdp: {type(model).__name__} has no decoder layers at model.model.layers to "
                         "shard one by one (a transformers causal LM has them)")
    return list(layers)


class FullyShardedGroup(Replicated):
    """``--shard fsdp``: FSDP2 inside the group (module docstring).

    The group's default process group is built on the group's store (``ranks.store``) under the prefix
    :data:`FSDP_STORE_PREFIX`.
    """

    name = "fsdp"
    collective_io = True  # every rank of the writing group saves its shards and takes part in evaluation

    def __init__(self, ranks: IntraGroup, device: torch.device, dtype: str, timeout_s: float):
        from torch.distributed.device_mesh import DeviceMesh

        super().__init__(ranks)
        _init_group(ranks, device, timeout_s)
        self.process_group = dist.group.WORLD
        self.mesh = DeviceMesh.from_group(self.process_group, device.type, mesh_dim_names=("shard",))
        self.mp_policy = mixed_precision(dtype)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.mp_policy is not None:
            model.to(torch.float32)  # the master weights FSDP2 shards; compute runs in the policy's dtype
        options = {"mesh": self.mesh} if self.mp_policy is None else {"mesh": self.mesh, "mp_policy": self.mp_policy}
        for layer in decoder_layers(model):
            fully_shard(layer, **options)
        fully_shard(model, **options)
        for module in model.modules():
            if isinstance(module, FSDPModule):  # the group's SUM, as the DDP-style all-reduce gives
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    @contextlib.contextmanager
    def _collectives(self, what: str) -> Iterator[None]:
        """A failed collective inside the group means a rank is gone: the group stops (GroupFailed)."""
        try:
            yield
        except RuntimeError as e:
            if not collective_failure(e):
                raise
            raise GroupFailed(f"rank {self.ranks.rank}: a rank of this group is gone during {what} "
                              f"({str(e).splitlines()[0][:200]}); the group stops and is restarted as a whole") from None

    def run_work(self, model, path, batches, step: int, items, device, *, micro_batch: int | None = None,
                 compute=contextlib.nullcontext) -> tuple[float, float]:
        """Every rank runs as many passes per group work item as the rank with the largest piece (rank 0), each
        in the item's mode: its piece's micro-batches, then idle passes (module docstring), so the group's
        FSDP2 collectives match."""
        loss_sum = shards = 0.0
        with self._collectives("forward/backward"):
            for item in items:
                passes = _passes(rank_items([item], 0, self.ranks.world_size)[0].sequences, micro_batch)
                piece = rank_items([item], self.ranks.rank, self.ranks.world_size)
                if piece:
                    loss, weight = run_work(model, path, batches, step, piece, device, micro_batch=micro_batch,
                                            compute=compute)
                    loss_sum += loss
                    shards += weight
                    passes -= _passes(piece[0].sequences, micro_batch)
                for _ in range(passes):
                    _idle_pass(model, path, batches, step, item, device, compute)
        return loss_sum, shards

    def reduce_in_group(self, sync, contributes: bool) -> None:
        """Nothing left to do: FSDP2's reduce-scatters summed every gradient over the group in backward."""

    @torch.no_grad()
    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> float:
        """torch's clip_grad_norm_ (norm 2) on the global norm: sqrt of the group's sum of its shards' squares.
        Returns that norm before clipping."""
        grads = [local_shard(p.grad) for p in model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        local = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        squared = (local * local).reshape(1)
        self.ranks.allreduce_sum(squared)
        coef = torch.clamp(max_norm / (squared.sqrt() + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return float(squared.sqrt().double())

    @torch.no_grad()
    def grad_squared_norm(self, params) -> float:
        """The group's gradient's sum of squares: each rank's shards' (float64), summed over the group's ranks
        (a collective: every rank calls it at the same point)."""
        from .noise import squared_norm

        squared = torch.tensor([squared_norm(local_shard(p.grad) for p in params if p.grad is not None)],
                               dtype=torch.float64)  # the group's gloo links (mecefo.ranks) take CPU tensors
        self.ranks.allreduce_sum(squared)
        return float(squared)

    def transfer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """This rank's shards as plain tensors: what rank ``r`` of a healing group receives from rank ``r``."""
        optim = optimizer.state_dict()
        return {"model": {name: local_shard(t) for name, t in model.state_dict().items()},
                "optimizer": {"state": {i: {k: local_shard(v) if isinstance(v, torch.Tensor) else v
                                            for k, v in s.items()} for i, s in optim["state"].items()},
                              "param_groups": optim["param_groups"]}}

    @torch.no_grad()
    def load_transfer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Install shards received from the same rank of another group (same group size, same shapes)."""
        current = model.state_dict()
        received = state["model"]
        if set(received) != set(current):
            missing, unexpected = sorted(set(current) - set(received)), sorted(set(received) - set(current))
            raise ValueError(f"received model shards do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, value in received.items():
            target = local_shard(current[name])
            if target.shape != value.shape:
                raise ValueError(f"received shard of {name} has shape {tuple(value.shape)}, this rank holds "
                                 f"{tuple(target.shape)} (another group size?)")
            target.copy_(value)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optim = state["optimizer"]
        optimizer.load_state_dict({"param_groups": optim["param_groups"],
                                   "state": {i: {k: as_shard_of(params[int(i)], v) if k != "step" else v
                                                 for k, v in s.items()} for i, s in optim["state"].items()}})

    def save_checkpoint(self, directory, step: int, model, optimizer, extra: dict, lineage: str):
        from .sharded_checkpoint import save_sharded

        with self._collectives("the checkpoint"):
            return save_sharded(directory, step, model, optimizer, extra, lineage=lineage,
                                process_group=self.process_group)

    def load_latest(self, directory, model, optimizer, warn: Callable[[str], None]):
        from .sharded_checkpoint import load_latest_sharded

        with self._collectives("loading the checkpoint"):
            return load_latest_sharded(directory, model, optimizer, warn=warn, process_group=self.process_group)

    def prune_checkpoints(self, directory, keep: int) -> None:
        from .sharded_checkpoint import prune_sharded

        if self.ranks.rank == 0:
            prune_sharded(directory, keep)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state_dict gathered from the shards, on the CPU (a collective: every rank of the
        group calls it; each gets the whole, one tensor at a time on the device)."""
        with self._collectives("gathering the model"):
            return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()
                    for name, t in model.state_dict().items()}

    def basis_function(self):
        from .sharded_basis import ShardedBasis

        return ShardedBasis(self.ranks.rank, self.ranks.world_size, self.process_group)


def as_shard_of(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this rank's shard) as a tensor sharded like ``param`` (a DTensor), or ``local`` itself."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _passes(sequences: int, micro_batch: int | None) -> int:
    """Forward/backward passes a piece of ``sequences`` sequences runs as (:func:`mecefo.model.micro_batches`)."""
    return 1 if micro_batch is None else -(-sequences // micro_batch)


def _idle_pass(model, path, batches, step: int, item: WorkItem, device, compute=contextlib.nullcontext) -> None:
    """A pass that contributes nothing (its loss times 0) but runs the same collectives as the group's other
    ranks' passes on ``item``: forward and backward of the item's first sequence in the item's mode."""
    inputs, targets = batches.batch(step, item.shard, item.start, item.start + 1)
    with path.context(model, item.mode == "neighbour"), compute():
        loss = shard_loss(model, inputs.to(device), targets.to(device))
    (loss * 0.0).backward()


def _init_group(ranks: IntraGroup, device: torch.device, timeout_s: float) -> None:
    """This process's default process group: the ranks of its replica group, built on the group's store
    (``ranks.store``; a group of one rank: a store of its own), gloo or NCCL (:mod:`mecefo.backends`)."""
    if dist.is_initialized():
        raise RuntimeError("this process already has a default process group; a rank of a replica group builds "
                           "its own from the group's store")
    store = dist.HashStore() if ranks.store is None else dist.PrefixStore(FSDP_STORE_PREFIX, ranks.store)
    dist.init_process_group(local_backends(device.type).intra, store=store, rank=ranks.rank,
                            world_size=ranks.world_size, timeout=timedelta(seconds=timeout_s))


def model_holding(shard: str, ranks: IntraGroup, device: torch.device, dtype: str, timeout_s: float) -> Replicated:
    """The holding ``--shard`` names, for this rank of its group."""
    if shard == "fsdp":
        return FullyShardedGroup(ranks, device, dtype, timeout_s)
    return Replicated(ranks, device, timeout_s)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def bytes_table(presets: list[str], group_sizes: list[int], param_bytes: int = 4) -> str:
    """A markdown table of what each rank holds (rank 0, the largest shard) under FSDP2 with AdamW; the last
    column adds the gradient shards (FSDP2 keeps them sharded between steps too)."""
    lines = ["| model | parameters | G | parameters / rank | AdamW state / rank | parameters + AdamW / rank "
             "| + gradients |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for preset in presets:
        shapes = preset_shapes(preset)
        count = sum(math.prod(s) for s in shapes)
        for g in group_sizes:
            held = planned_state_bytes(shapes, g, param_bytes)
            total = held["param_bytes"] + held["optimizer_bytes"]
            lines.append(f"| {preset} | {count / 1e6:,.1f} M | {g} | {_size(held['param_bytes'])} | "
                         f"{_size(held['optimizer_bytes'])} | {_size(total)} | {_size(total + held['param_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m mecefo.sharding``: bytes of parameters + AdamW state per rank under FSDP2 (README's table)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mecefo.sharding", description=main.__doc__.split(":")[1].strip())
    parser.add_argument("--presets", nargs="+", default=["llama-1b", "llama-7b"])
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"),
                        help="the master weights' dtype follows: fp32 for float32 and bfloat16 (mixed precision)")
    args = parser.parse_args(argv)
    print(bytes_table(args.presets, args.group_sizes, 8 if args.dtype == "float64" else 4))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
