"""What the online gradient noise scale costs a training step (mecefo.noise in the trainer).

    python bench/noise_overhead.py                       # tiny and small, CPU
    python bench/noise_overhead.py --presets llama-60m --seq 256 --micro-batch 4

The trainer adds two things to a step: a squared-norm pass over the replica's own gradients before
the all-reduce (the global norm after it is the one the gradient clip computes anyway; with
``--clip 0`` a second pass) and two float64 scalars in the step's existing [loss, shards]
all-reduce. This measures both side by side, in interleaved rounds (bench/timing.py: the median of
the per-round ratios, p20-p80):

* **step**: one replica's training step as the trainer runs it (forward + backward of its micro-batch
  through the trainer's model and neighbour path, the gradient buckets through
  :class:`mecefo.sync.GradientSync` with a one-replica all-reduce, normalisers, clipping, AdamW), with
  and without the norm pass; and, since that difference drowns in the step's own spread on a shared
  machine, the norm pass alone over the same gradients against the step without it (its share of a
  step);
* **stats all-reduce**: a gloo all-reduce of the 2-element and of the 4-element float64 stats tensor
  between two processes over loopback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import Recorder  # noqa: E402
from timing import MAX_RATIO_SPREAD, interleaved_rounds, paired_ratio, summary_timing  # noqa: E402

from mecefo.config import TrainConfig  # noqa: E402
from mecefo.data import Batches, CorpusFiles, prepare_corpus  # noqa: E402
from mecefo.membership import plan_step  # noqa: E402
from mecefo.model import run_work  # noqa: E402
from mecefo.models import build_model  # noqa: E402
from mecefo.neighbor import neighbor_path  # noqa: E402
from mecefo.noise import local_terms, squared_norm  # noqa: E402
from mecefo.optim import build_optimizer  # noqa: E402
from mecefo.sync import GradientSync  # noqa: E402


def step_functions(cfg: TrainConfig, corpus: CorpusFiles) -> dict:
    """The trainer's step for replica 0 of a failure-free plan, without and with the noise scale's work."""
    torch.set_num_threads(cfg.threads)
    path = neighbor_path(cfg.resolved_policy, rank=cfg.rank, tau=cfg.tau, basis=cfg.basis)
    model = path.prepare(build_model(cfg))
    batches = Batches(corpus, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=0,
                      vocab_size=model.config.vocab_size)
    optimizer = build_optimizer(model, cfg)
    sync = GradientSync(model, path.skipped_parameters(model))
    plan = plan_step(cfg.replicas, range(cfg.replicas), cfg.resolved_policy, sequences=cfg.micro_batch)
    items = plan.items_of(0)

    def step(noise: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        run_work(model, path, batches, 0, items, "cpu")
        if noise:
            local_terms(squared_norm(p.grad for _, p in sync.params), cfg.micro_batch, cfg.micro_batch)
        sync.reduce(lambda t: True)
        sync.normalise(plan.normalisers())
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip, foreach=False)
        if noise:
            float(total.double()) ** 2  # the global squared norm: the clip's, as the trainer reads it
        optimizer.step()

    def norms() -> None:  # the noise scale's work alone, on the gradients the last step left
        local_terms(squared_norm(p.grad for _, p in sync.params), cfg.micro_batch, cfg.micro_batch)

    return {"without": lambda: step(False), "with": lambda: step(True), "norms": norms}


def _allreduce_worker(rank: int, store_path: str, rounds: int, reps: int, queue) -> None:
    import time

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    pg = dist.ProcessGroupGloo(dist.FileStore(store_path, 2), rank, 2)
    tensors = {"2 scalars": torch.zeros(2, dtype=torch.float64), "4 scalars": torch.zeros(4, dtype=torch.float64)}
    times = {name: [] for name in tensors}
    for _ in range(rounds):
        for name, t in tensors.items():
            pg.allreduce([t]).wait()  # both ranks enter together
            t0 = time.perf_counter()
            for _ in range(reps):
                pg.allreduce([t]).wait()
            times[name].append((time.perf_counter() - t0) * 1e3 / reps)
    if rank == 0:
        queue.put(times)


def allreduce_times(rounds: int, reps: int) -> dict[str, list[float]]:
    """Per-round mean ms of a 2-process gloo all-reduce of 2 and of 4 float64 scalars."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_allreduce_worker, args=(r, store, rounds, reps, queue)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            times = queue.get(timeout=600)
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per replica per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the trainer's default: 1)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rep-ms", type=float, default=6000.0, help="time per scenario over all rounds")
    parser.add_argument("--cache-dir", default=None, help="corpus cache (default ~/.cache/mecefo)")
    parser.add_argument("--csv", type=Path, help="append rows here (default bench/results/results.csv)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    recorder = Recorder(device, **({"path": args.csv} if args.csv else {}))
    corpus = prepare_corpus(["stdlib"], cache_dir=args.cache_dir)
    print(f"{'preset':<10}{'step without':>14}{'with':>10}{'with / without (p20-p80)':>32}"
          f"{'norm pass':>14}{'/ step (p20-p80)':>26}")
    for preset in args.presets:
        cfg = TrainConfig(model=preset, seq_len=args.seq, micro_batch=args.micro_batch, replicas=4,
                          threads=args.threads)
        fns = step_functions(cfg, corpus)
        times = interleaved_rounds(fns, device, rep_ms=args.rep_ms, rounds=args.rounds)
        ratio = paired_ratio(times["with"], times["without"])
        share = paired_ratio(times["norms"], times["without"])
        config = f"{preset}:S={args.seq},B={args.micro_batch},threads={args.threads}"
        print(f"{preset:<10}{summary_timing(times['without']).median_ms:>11.2f} ms"
              f"{summary_timing(times['with']).median_ms:>7.2f} ms{ratio.median:>12.4f} ({ratio.p20:.4f}-"
              f"{ratio.p80:.4f}){'?' if not ratio.supported(MAX_RATIO_SPREAD) else ' '}"
              f"{summary_timing(times['norms']).median_ms:>10.3f} ms{share.median:>12.5f} ({share.p20:.5f}-"
              f"{share.p80:.5f}){'?' if not share.supported(MAX_RATIO_SPREAD) else ''}")
        for mode, r in (("with noise scale", ratio), ("norm passes alone", share)):
            recorder.add(benchmark="noise/step", provider="mecefo", mode=mode, config=config,
                         metric="time_ratio" if r.supported(MAX_RATIO_SPREAD) else "time_ratio_unsupported",
                         unit="x step without", median=r.median, p20=r.p20, p80=r.p80)
    print("(? : the per-round ratios spread more than "
          f"{MAX_RATIO_SPREAD:.0%} of their median: not supported by this measurement)")
    times = allreduce_times(rounds=args.rounds, reps=200)
    ratio = paired_ratio(times["4 scalars"], times["2 scalars"])
    two, four = summary_timing(times["2 scalars"]), summary_timing(times["4 scalars"])
    print(f"stats all-reduce (gloo, 2 processes): 2 scalars {1e3 * two.median_ms:.1f} us, 4 scalars "
          f"{1e3 * four.median_ms:.1f} us: ratio {ratio.describe()}")
    recorder.add(benchmark="noise/stats-allreduce", provider="gloo", mode="4 vs 2 float64 scalars",
                 config="2 processes,loopback", metric="time_ratio" if ratio.supported(MAX_RATIO_SPREAD)
                 else "time_ratio_unsupported", unit="x 2 scalars", median=ratio.median, p20=ratio.p20, p80=ratio.p80)
    if not args.no_save:
        print(f"appended {len(recorder.rows)} rows to {recorder.save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
