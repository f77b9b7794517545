"""One FSDP2 replica group without the rest of the job: exactness, neighbour mode, checkpoint, bytes, step time.

    torchrun --nproc-per-node 2 bench/fsdp_group.py --device cuda --preset llama-60m   # a GPU machine, 2+ GPUs
    torchrun --nproc-per-node 2 bench/fsdp_group.py --device cpu --preset tiny         # CPU, gloo

The group is held as the trainer holds it with ``--shard fsdp`` (mecefo.sharding.FullyShardedGroup:
NCCL inside the group on CUDA, gloo on CPU); torchft is not needed (the GPU image has none). Every
rank also keeps the unsharded model as the reference and each step it checks, in fp32:

* an exact step: each rank runs its half of the batch; the gathered gradients against the reference's
  on the whole batch, then the clipped update (global norm over the shards);
* neighbour mode: the bases from the shards (mecefo.sharded_basis) against the unsharded ones, and
  the gradients with the same bases;
* a DCP checkpoint saved by both ranks and loaded into a fresh sharded model: bit for bit.

Prints (rank 0) the worst relative errors, the bytes of parameters + AdamW state per rank, and the
median time of a sharded training step next to the unsharded one on the same device; appends
``fsdp-group`` rows to ``--csv``. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mecefo_kernels as mk  # noqa: E402
from mecefo.config import TrainConfig  # noqa: E402
from mecefo.model import shard_loss
from mecefo.models import build_model  # noqa: E402


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--preset", default="llama-60m")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps of each kind")
    parser.add_argument("--csv", type=Path, help="append fsdp-group rows here")
    args = parser.parse_args(argv)

    from torch.distributed import PrefixStore

    from mecefo.ranks import IntraGroup
    from mecefo.sharded_checkpoint import load_latest_sharded, save_sharded
    from mecefo.sharding import FullyShardedGroup, state_bytes

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))  # torchrun's (mecefo.quorum would import torchft)
    ranks = IntraGroup.connect(PrefixStore("mecefo/intra", store), rank, world, 60.0)
    holding = FullyShardedGroup(ranks, device, "float32", 60.0)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"fsdp group: {world} ranks on {device.type}, backend {dist.get_backend()}, preset {args.preset}")

    cfg = TrainConfig(run_dir="unused", model=args.preset, dtype="float32")
    reference = mk.apply_mecefo(build_model(cfg, device))
    model = holding.wrap(copy.deepcopy(reference))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=False) for m in (reference, model)]
    vocab = reference.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    half = 2
    errors: dict[str, float] = {}

    def batch():
        return torch.randint(0, min(vocab, 256), (half * world, args.seq + 1), generator=gen).to(device)

    def sharded_step(x, neighbour=False):
        optimizers[1].zero_grad(set_to_none=True)
        mine = x[half * rank: half * (rank + 1)]
        with mk.neighbor_mode(model, neighbour):
            (shard_loss(model, mine[:, :-1], mine[:, 1:]) / world).backward()

    def reference_step(x, neighbour=False):
        optimizers[0].zero_grad(set_to_none=True)
        with mk.neighbor_mode(reference, neighbour):
            shard_loss(reference, x[:, :-1], x[:, 1:]).backward()

    def reference_rank_step(x):  # what one DDP-style rank computes: its half, the whole model
        optimizers[0].zero_grad(set_to_none=True)
        mine = x[half * rank: half * (rank + 1)]
        shard_loss(reference, mine[:, :-1], mine[:, 1:]).backward()

    def grad_error() -> float:
        worst = 0.0
        for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            if q.grad is not None:
                worst = max(worst, _relative(_full(p.grad), q.grad))
        return worst

    x = batch()
    sharded_step(x)
    reference_step(x)
    errors["exact gradients"] = grad_error()
    holding.clip_grad_norm_(model, 1e-3)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e-3, foreach=False)
    for o in optimizers:
        o.step()
    errors["clipped update"] = max(_relative(_full(p.detach()), q.detach())
                                   for p, q in zip(model.parameters(), reference.parameters()))

    mk.refresh_bases(reference, optimizer=optimizers[0])
    mk.refresh_bases(model, optimizer=optimizers[1], basis_fn=holding.basis_function())
    ours, theirs = mk.bases_state_dict(model), mk.bases_state_dict(reference)
    errors["bases (subspace)"] = max(
        torch.linalg.matrix_norm(ours[k].double() @ ours[k].double().T - v.double() @ v.double().T, ord=2).item()
        for k, v in theirs.items())
    mk.load_bases_state_dict(model, theirs)
    x = batch()
    sharded_step(x, neighbour=True)
    reference_step(x, neighbour=True)
    errors["neighbour gradients"] = grad_error()

    held = state_bytes(model, optimizers[1])
    whole = state_bytes(reference, optimizers[0])

    times = {"sharded": [], "unsharded": []}
    for _ in range(args.steps):
        x = batch()
        for name, run, opt in (("sharded", sharded_step, optimizers[1]),
                               ("unsharded", reference_rank_step, optimizers[0])):
            _sync(device)
            t0 = time.perf_counter()
            run(x)
            opt.step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        directory = [tmp]
        dist.broadcast_object_list(directory, src=0)
        extra = {"bases": mk.bases_state_dict(model), "trainer": {"step": 1}}
        save_sharded(directory[0], 1, model, optimizers[1], extra, lineage="bench", process_group=holding.process_group)
        fresh = holding.wrap(mk.apply_mecefo(build_model(cfg, device)))
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-4, foreach=False)
        found = load_latest_sharded(directory[0], fresh, fresh_opt, warn=say, process_group=holding.process_group)
        same = found is not None and all(torch.equal(_full(a), _full(b)) for a, b in
                                         zip(fresh.state_dict().values(), model.state_dict().values()))
        dist.barrier()

    ok = (errors["exact gradients"] < 1e-4 and errors["clipped update"] < 1e-4 and errors["bases (subspace)"] < 1e-2
          and errors["neighbour gradients"] < 1e-4 and same)
    for name, value in errors.items():
        say(f"  {name:22} relative error {value:.2e}")
    say(f"  checkpoint round trip  {'bit for bit' if same else 'DIFFERS'}")
    say(f"  bytes per rank         {(held['param_bytes'] + held['optimizer_bytes']) / 1e6:,.1f} MB of parameters + "
        f"AdamW state (unsharded {(whole['param_bytes'] + whole['optimizer_bytes']) / 1e6:,.1f} MB)")
    medians = {k: statistics.median(v) for k, v in times.items()}
    say(f"  training step          sharded {medians['sharded'] * 1e3:.1f} ms, unsharded {medians['unsharded'] * 1e3:.1f} "
        f"ms per rank, the same tokens (ratio {medians['sharded'] / medians['unsharded']:.2f}x; {args.steps} steps, "
        f"{half} x {args.seq} tokens per rank; unsharded: no gradient all-reduce)")
    say("fsdp group: PASS" if ok else "fsdp group: FAIL")
    if rank == 0 and args.csv:
        from records import Recorder

        recorder = Recorder(device, args.csv)
        config = f"{args.preset}:G={world},S={args.seq},B={half},fp32"
        for name, value in errors.items():
            recorder.add(benchmark="fsdp-group", provider="mecefo", mode=name, config=config, metric="relative_error",
                         unit="", median=value)
        recorder.add(benchmark="fsdp-group", provider="mecefo", mode="step", config=config, metric="time_ratio",
                     unit="x", median=medians["sharded"] / medians["unsharded"])
        recorder.add(benchmark="fsdp-group", provider="mecefo", mode="state", config=config,
                     metric="state_bytes_per_rank", unit="bytes", median=held["param_bytes"] + held["optimizer_bytes"])
        recorder.save()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
