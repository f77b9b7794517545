"""Plain data-parallel training with torch.distributed, the reference the NDB trainer must equal bit for bit.

One process per rank (``python plain_dp.py RUN_DIR RANK OUT_DIR``), gloo over loopback with a
file rendezvous. The unpatched transformers model, each rank's own shard, one SUM all-reduce of
the concatenated gradients divided by the world size, then the trainer's clip / LR / AdamW.
No torchft, no neighbour machinery. Writes the parameter hash after every step, and the final
state dict.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mecefo.config import TrainConfig  # noqa: E402
from mecefo.data import Batches, CorpusFiles  # noqa: E402
from mecefo.model import parameter_hash, shard_loss  # noqa: E402
from mecefo.models import build_model  # noqa: E402
from mecefo.optim import build_optimizer, lr_at, set_lr  # noqa: E402


def main(run_dir: str, rank: int, out_dir: str) -> None:
    run, out = Path(run_dir), Path(out_dir)
    cfg = TrainConfig.load(run / "config.json")
    corpus = CorpusFiles(**json.loads((run / "corpus.json").read_text()))
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=cfg.replicas)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    batches = Batches(corpus, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=cfg.seed,
                      vocab_size=model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    hashes = []
    for step in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        shard_loss(model, *batches.batch(step, rank)).backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(cfg.replicas)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip, foreach=False)
        set_lr(optimizer, lr_at(step, cfg))
        optimizer.step()
        hashes.append(parameter_hash(model))
    (out / f"hashes_{rank}.json").write_text(json.dumps(hashes))
    if rank == 0:
        torch.save(model.state_dict(), out / "final.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
