"""Heal time by shard (--shard fsdp) against today's whole-state heal (--shard none), same model, same run.

    python bench/heal.py                               # llama-60m shapes, 2 groups x 2 ranks, fp32, 3 kills each
    python bench/heal.py --preset small --kills 2 --group-size 2

Two jobs of the real trainer (mecefo-train --group-size G) that differ only in ``--shard``: the
last rank of group 1 is SIGKILLed ``--kills`` times, the group is restarted at once and heals from
group 0, rank r from rank r (torchft's Manager per rank, in parallel). A group's heal lasts until
its slowest rank has received and loaded its state (the summary's heal time). DDP-style, every rank
receives the whole model and AdamW state; FSDP, each rank its 1/G shard. Prints each job's heals
(median, p20-p80), the bytes each rank holds, and the ratio fsdp / none of the medians; appends
``heal`` rows to bench/results/results.csv. On CPU the transfers run over loopback gloo, so the
ratio says how much less each rank moves and loads, not what a network would take.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import Recorder  # noqa: E402

from mecefo.config import TrainConfig  # noqa: E402
from mecefo.launch import launch  # noqa: E402
from mecefo.report import read_jsonl  # noqa: E402


def group_heals(run_dir: Path, replica: int) -> list[float]:
    """Seconds of each heal of group ``replica``: its slowest rank's (rank 0's file and metrics/ranks/)."""
    paths = [run_dir / "metrics" / f"replica_{replica}.jsonl",
             *(run_dir / "metrics" / "ranks").glob(f"replica_{replica}_rank_*.jsonl")]
    heals: dict[tuple, float] = {}
    for path in paths:
        for r in read_jsonl(path):
            if r.get("event") == "healed":
                key = (r["step"], r.get("generation", 0))
                heals[key] = max(heals.get(key, 0.0), r["seconds"])
    return [heals[k] for k in sorted(heals)]


def quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-60m")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--kills", type=int, default=3, help="heals per job")
    parser.add_argument("--every", type=int, default=40, help="steps between kills (the group must be back)")
    parser.add_argument("--work-dir", type=Path, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--csv", type=Path, help="append rows here instead of bench/results/results.csv")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mecefo-heal-"))
    kills = [f"kill@{5 + i * args.every}:1" for i in range(args.kills)]
    steps = 5 + args.kills * args.every
    config = f"{args.preset}:groups=2,G={args.group_size},{args.dtype},kills={args.kills}"
    recorder = Recorder(torch.device("cpu"), **({"path": args.csv} if args.csv else {}))
    medians = {}
    for shard in ("none", "fsdp"):
        cfg = TrainConfig(run_dir=str(work / shard), model=args.preset, dtype=args.dtype, replicas=2,
                          group_size=args.group_size, shard=shard, steps=steps, seq_len=16, micro_batch=1,
                          policy="ndb-exact", inject=kills, restart_after=0, checkpoint_every=0, eval_batches=1,
                          heartbeat_timeout_s=2.0, timeout_s=60.0, max_wall_s=3600.0, hash_state=False,
                          cache_dir=str(work / "cache"))
        result = launch(cfg)
        if result.returncode != 0:
            print(f"heal bench: the {shard} job failed (exit {result.returncode}); see {cfg.run_dir}/logs")
            return 1
        heals = group_heals(cfg.run_path, 1)
        if len(heals) < args.kills:
            print(f"heal bench: the {shard} job healed {len(heals)} times, not {args.kills}; see {cfg.run_dir}")
            return 1
        median, p20, p80 = quantiles(heals)
        medians[shard] = median
        held = result.summary["state_bytes_per_rank"]
        print(f"shard {shard:4}: heals {', '.join(f'{s:.2f}' for s in heals)} s (median {median:.2f} s); "
              f"each rank holds {held / 1e6:,.1f} MB of parameters + optimizer state")
        recorder.add(benchmark="heal", provider=f"shard {shard}", mode="heal", config=config, metric="heal_s",
                     unit="s", median=median, p20=p20, p80=p80)
        recorder.add(benchmark="heal", provider=f"shard {shard}", mode="heal", config=config,
                     metric="state_bytes_per_rank", unit="bytes", median=held)
    ratio = medians["fsdp"] / medians["none"]
    print(f"heal time fsdp / none: {ratio:.2f}x (medians, {args.kills} heals each; {args.preset}, "
          f"2 groups x {args.group_size} ranks, {args.dtype})")
    recorder.add(benchmark="heal", provider="fsdp / none", mode="heal", config=config, metric="heal_time_ratio",
                 unit="x", median=ratio)
    if not args.no_save:
        print(f"appended {len(recorder.rows)} rows to {recorder.save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
