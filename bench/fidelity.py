"""Training fidelity under failures: how good a model each failure policy trains, and how soon.

    python bench/fidelity.py                  # CPU profile, every part: writes docs/fidelity.md,
                                              #   docs/fidelity/cpu_*.png, bench/results/fidelity_cpu.json
                                              #   and rows in results.csv
    python bench/fidelity.py --parts probe    # one part; finished runs in --work-dir are reused
    python bench/fidelity.py --profile gpu    # LLaMA-60M class, for a GPU machine (docs/fidelity-gpu.md)
    python bench/fidelity.py --parts batch --steps 600 --seeds 0 1 2    # the drop penalty against batch size

This file is the command; the parts live in fidelity_runs.py (profiles, one training run),
fidelity_experiments.py (quality, seeds, ladder, sweep), fidelity_batch.py, fidelity_progress.py
(progress per step, time to quality on the package's simulator), fidelity_probe.py, and the page in
fidelity_figures.py and fidelity_page.py.

Parts (training with the real trainer, ``mecefo.launch.launch``: one process per replica, torchft):

  quality  the same model from the same seed on the same data (the embedded corpus: the Python
           standard library's sources) with no failures, then under the paper's low / mid / high
           failure schedules with each policy variant (``--policies``: presets, ``:momentum`` for
           gradient-aware bases). Final validation loss and perplexity, their change against no
           failures, loss curves. One run per approximation mode suffices: quality depends only on
           which work is approximated, not on who runs it (tests/trainer/test_sync.py), so
           spread-orphan stands for neighbour-orphan and auto's orphan steps, spread for ndb-exact.
  seeds    the high-schedule comparison (no failure, each variant) repeated with other seeds (new
           weights, data order and failure pattern each): the changes as mean +- sd, so that a
           difference can be told from seed-to-seed noise; each run's share of sequences
           approximated and dropped.
  ladder   failure-free runs of other lengths (``--ladder``), per seed: the loss a failure-free job
           reaches in S steps, each run with its own warm-up and cosine decay.
  ttq      time to quality: each variant's progress per step (its final loss read off its seed's
           ladder as effective steps; efficiency and penalty per share approximated or dropped),
           combined with the simulation of every policy (mecefo.planner) at n = 4, 8, 32 under
           low / mid / high (measured CPU step costs, and the FLOP floor at GPU scale with a quoted
           10-minute restart): the wall clock to the failure-free run's final loss.
  probe    the gradient-error probe (:mod:`mecefo.probe`) on the no-failure run's checkpoints:
           at every ``probe_every`` steps, the relative error of MeCeFO's step gradient and of one
           neighbour shard's gradient against the exact ones, total and per group (attention, FFN,
           other), for each rank and each age of the low-rank bases (the bases are at most tau
           steps old), under three failure plans: one of the run's n replicas dead, one of the
           paper's 32 dead, and the most replicas the high schedule has down at once.
  sweep    mecefo under the high schedule with the other ranks (tau at its default) and the other
           taus (rank at its default): final validation loss against no failures.
  batch    (only when named) at several batch sizes (``--batch-sizes``, sequences per shard), per
           seed: a failure-free ladder and shrink under the high schedule; the drop penalty measured
           against the one the runs' own gradient noise scale predicts (fidelity_batch.py).

The page is rendered from the results JSON, so ``--parts`` re-renders it with the other parts'
stored results. Training runs live in ``--work-dir`` (default runs/fidelity-<profile>); a run whose
directory holds a finished run with the same configuration is reused, not retrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from statistics import fmean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_batch import BATCH_SIZES, batch_sweep  # noqa: E402
from fidelity_experiments import LADDER, POLICIES, ladder, quality, seeds, sweep  # noqa: E402
from fidelity_figures import plot_batch, plot_probe, plot_quality, plot_ttq  # noqa: E402
from fidelity_page import render  # noqa: E402
from fidelity_probe import GROUPS, probe, probe_summary  # noqa: E402
from fidelity_progress import TTQ_HOURS, TTQ_NS, TTQ_SEEDS, quality_model, ttq  # noqa: E402
from fidelity_runs import (DEFAULT_RANK, PROFILE_ADDED, PROFILES, SCHEDULES, Profile, parse_rank,  # noqa: E402
                           rank_label, reference_config, variant_arg)
from records import Recorder  # noqa: E402
from tokenize_corpus import documents, measure  # noqa: E402
from tokenize_corpus import record as record_tokenize  # noqa: E402

from mecefo.replica import CORPUS_FILE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("quality", "seeds", "ladder", "ttq", "probe", "sweep", "batch")
DEFAULT_PARTS = PARTS[:-1]  # the batch sweep trains its own 12 runs per batch size: asked for by name


def record(recorder: Recorder, profile: Profile, results: dict, parts) -> None:
    config = f"{profile.preset}:n={profile.replicas},steps={profile.steps},tokens={profile.micro_batch}x{profile.seq_len}"
    if "quality" in parts:
        q = results["quality"]
        recorder.add(benchmark="fidelity/quality", provider="none", mode="none", config=config, metric="val_ppl",
                     unit="ppl", median=q["reference"]["val_ppl"])
        for key, run in q["runs"].items():
            schedule, policy = key.split("/")
            recorder.add(benchmark="fidelity/quality", provider=policy, mode=schedule, config=config,
                         metric="val_ppl", unit="ppl", median=run["val_ppl"])
            recorder.add(benchmark="fidelity/quality", provider=policy, mode=schedule, config=config,
                         metric="val_ppl_change", unit="%", median=run["ppl_change_pct"])
    if "probe" in parts:
        p = results["probe"]
        for plan in p["plans"]:
            for rank in p["ranks"]:
                for kind in ("step_error", "shard_error"):
                    if kind == "shard_error" and plan != p["plans"][0]:
                        continue
                    mean = probe_summary(p, kind, fmean, plan=plan, rank=rank, age=0)
                    worst = probe_summary(p, kind, max, plan=plan, rank=rank, age=0)
                    for g in ("total", *GROUPS):
                        recorder.add(benchmark="fidelity/probe", provider=f"rank {rank_label(rank)}",
                                     mode=plan if kind == "step_error" else "neighbour shard", config=config,
                                     metric=f"{kind}_{g}", unit="relative", median=mean[g], p80=worst[g])
            if all("shrink_error" in r for r in p["rows"]):
                mean = probe_summary(p, "shrink_error", fmean, plan=plan, rank=DEFAULT_RANK, age=0)
                worst = probe_summary(p, "shrink_error", max, plan=plan, rank=DEFAULT_RANK, age=0)
                for g in ("total", *GROUPS):
                    recorder.add(benchmark="fidelity/probe", provider="shrink", mode=plan, config=config,
                                 metric=f"step_error_{g}", unit="relative", median=mean[g], p80=worst[g])
    if "seeds" in parts:
        sd = results["seeds"]
        for seed, by_policy in sd["runs"].items():
            for policy, run in by_policy.items():
                if policy != "none":
                    recorder.add(benchmark="fidelity/seeds", provider=policy, mode=f"{sd['schedule']},seed={seed}",
                                 config=config, metric="val_ppl_change", unit="%", median=run["ppl_change_pct"])
    if "ttq" in parts:
        for variant, e in results["quality_model"]["efficiency"].items():
            recorder.add(benchmark="fidelity/progress", provider=variant, mode=results["seeds"]["schedule"],
                         config=config, metric="efficiency", unit="effective steps / step", median=e["mean"])
        for r in results["ttq"]["ttq"]:
            recorder.add(benchmark="fidelity/time-to-quality", provider=r["variant"], mode=f"{r['scenario']},n={r['n']}",
                         config=f"{config},costs={r['source']}", metric="time_ratio", unit="x no failure",
                         median=r["time_ratio"], p20=r["low"], p80=r["high"])
    if "batch" in parts:
        b = results["batch"]
        for m, size in b["runs"].items():
            for metric, key in (("drop_penalty", "penalty"), ("predicted_drop_penalty", "predicted_penalty"),
                                ("b_simple_under_failure", "b_simple_under_failure")):
                if size[key]:
                    recorder.add(benchmark="fidelity/batch", provider="shrink", mode=f"{b['schedule']},B={size['batch']}",
                                 config=f"{profile.preset}:n={profile.replicas},steps={profile.steps},"
                                        f"tokens={m}x{profile.seq_len},seeds={len(b['seeds'])}",
                                 metric=metric, unit="sequences" if key.startswith("b_") else "progress / share",
                                 median=size[key]["mean"], p20=size[key]["mean"] - size[key]["sd"],
                                 p80=size[key]["mean"] + size[key]["sd"])
    if "sweep" in parts:
        for run in results["sweep"]["runs"]:
            recorder.add(benchmark="fidelity/sweep", provider=f"rank {rank_label(run['rank'])}",
                         mode=f"{results['sweep']['schedule']},tau={run['tau']}", config=config,
                         metric="val_ppl_change", unit="%", median=run["ppl_change_pct"])


def setup_info(profile: Profile, work: Path, cache_dir: str | None, recorder: Recorder, stored: dict | None) -> dict:
    """Where and on what the page was made: the corpus from the reference run (or, if only the batch part
    ran, any of its runs; if the runs are not here, as stored: a part computed from stored results)."""
    ref = reference_config(profile, work, cache_dir)
    found = [ref.run_path / CORPUS_FILE] if (ref.run_path / CORPUS_FILE).is_file() else \
        sorted(work.glob(f"batch-m*/seed*/*/{CORPUS_FILE}"))[:1]
    corpus = json.loads(found[0].read_text()) if found else {}
    return {"device": recorder.env["device"], "commit": recorder.env["commit"],
            "corpus": corpus.get("description", (stored or {}).get("corpus", "-")),
            "parameters": parameter_count(ref, corpus.get("vocab")), "profile": asdict(profile)}


def parameter_count(cfg, corpus_vocab: int | None) -> int:
    """The model's parameters (built on the meta device; a preset on a tokenised corpus has its vocabulary)."""
    from mecefo.models import meta_model, resolve_model_source

    source = resolve_model_source(cfg, corpus_vocab=corpus_vocab, tokenised=cfg.tokenizer is not None)
    return sum(p.numel() for p in meta_model(cfg, source).parameters())


def tokenize_speed(profile: Profile, recorder: Recorder, rounds: int) -> dict:
    """The tokenisation step of the runs' corpus (prepare_corpus with the tokenizer, into an empty cache, one
    worker per core) against the tokenizer's own batch encoding of the same documents: tokens/s and their
    ratio (bench/tokenize_corpus.py's measurement), as rows."""
    import shutil
    import tempfile

    from mecefo.tokenizing import default_workers

    texts = documents(list(profile.data))
    scratch = Path(tempfile.mkdtemp(prefix="mecefo-fidelity-tokenize-"))
    try:
        seconds, counts = measure(Path(profile.tokenizer), list(profile.data), texts, [default_workers()], rounds,
                                  scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    config = (f"fidelity:{'+'.join(Path(d).name for d in profile.data)},{len(texts)} documents,"
              f"{sum(len(t.encode()) for t in texts) / 1e6:.1f} MB,{Path(profile.tokenizer).name}")
    lines = record_tokenize(recorder, seconds, counts, config)
    print("\n".join(lines), flush=True)
    return {"config": config, "rounds": rounds, "table": lines}


# the profile values a command line may override (--model, stored as the profile's preset, --tokenizer and --data
# are declared with their own help)
PROFILE_OVERRIDES = ("preset", "steps", "replicas", "seq_len", "micro_batch", "eval_every", "eval_batches",
                     "checkpoint_every", "probe_every")


def regenerate_command(parser: argparse.ArgumentParser, args: argparse.Namespace, profile: Profile,
                       parts: list[str]) -> str:
    """The command that regenerates the page: the options that differ from their defaults (paths left out)."""
    words = ["python bench/fidelity.py"]
    if profile.name != "cpu":
        words.append(f"--profile {profile.name}")
    for name in PROFILE_OVERRIDES:
        if getattr(args, name) is not None:
            words.append(f"--{'model' if name == 'preset' else name.replace('_', '-')} {getattr(args, name)}")
    if args.tokenizer is not None:
        words.append(f"--tokenizer {args.tokenizer}")
    if args.data is not None:
        words.append("--data " + " ".join(args.data))
    if parts != list(DEFAULT_PARTS):
        words.append("--parts " + " ".join(parts))
    for name in ("schedules", "policies", "seeds", "ranks", "taus", "ladder", "ttq_n", "ttq_seeds", "ttq_hours",
                 "batch_sizes", "batch_ladder"):
        value = getattr(args, name)
        if value is not None and value != parser.get_default(name):
            shown = map(rank_label, value) if name == "ranks" else map(str, value if isinstance(value, list) else [value])
            words.append(f"--{name.replace('_', '-')} " + " ".join(shown))
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS),
                        help="default: every part but batch (the batch sweep trains 12 runs per batch size)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES),
                        help="batch: sequences per shard (global batch = replicas x this)")
    parser.add_argument("--batch-ladder", nargs="+", type=int,
                        help="batch: failure-free run lengths besides --steps (default 0.8 x --steps)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES),
                        help="low, mid, high, or schedule files ('REPLICA START END' lines)")
    parser.add_argument("--policies", nargs="+", type=variant_arg, default=list(POLICIES),
                        help="policy presets, each optionally with :momentum (gradient-aware bases)")
    parser.add_argument("--ladder", nargs="+", type=int, default=list(LADDER),
                        help="no-failure run lengths of the ladder part (besides --steps)")
    parser.add_argument("--ttq-n", nargs="+", type=int, default=list(TTQ_NS), help="ttq: replica counts")
    parser.add_argument("--ttq-seeds", type=int, default=TTQ_SEEDS, help="ttq: failure-process seeds per scenario")
    parser.add_argument("--ttq-hours", type=float, default=TTQ_HOURS, help="ttq: simulated hours per seed")
    parser.add_argument("--sweep-schedule", default="high",
                        help="the schedule of the seeds and sweep parts and of the probe's worst plan")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                        help="seeds of the seeds part (0: the quality part's runs)")
    parser.add_argument("--ranks", nargs="+", type=parse_rank, help="probed and trained ranks (e.g. 1/32 1.0)")
    parser.add_argument("--taus", nargs="+", type=int, help="trained taus, probed as bases ages")
    for name in PROFILE_OVERRIDES[1:]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="override the profile's value")
    parser.add_argument("--model", "--preset", dest="preset", metavar="PRESET|DIR",
                        help="override the profile's model: a preset (e.g. llama-60m) or a local Hugging Face model "
                             "directory (the trainer's --model)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="a local tokenizer directory: the runs train on --data tokenised with it (the trainer's "
                             "--tokenizer); the tokenisation step's speed is recorded against the tokenizer's own "
                             "batch encoding (a ratio row in results.csv)")
    parser.add_argument("--data", nargs="+", metavar="SRC",
                        help="the runs' corpus (the trainer's --data: text files, directories, JSON Lines, Parquet, "
                             "Arrow, datasets directories; default the embedded corpus)")
    parser.add_argument("--tokenize-rounds", type=int, default=3,
                        help="with --tokenizer: rounds of the tokenisation measurement (0: none)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the probe (this process)")
    parser.add_argument("--work-dir", type=Path, help="training runs (default runs/fidelity-<profile>)")
    parser.add_argument("--cache-dir", help="corpus cache (default ~/.cache/mecefo)")
    parser.add_argument("--docs", type=Path, help="the results page (default docs/fidelity.md; gpu: docs/fidelity-gpu.md)")
    parser.add_argument("--json", type=Path, help="the results (default bench/results/fidelity_<profile>.json)")
    parser.add_argument("--csv", type=Path, help="rows appended here (default bench/results/results.csv)")
    args = parser.parse_args(argv)

    profile = PROFILES[args.profile]
    overrides = {k: getattr(args, k) for k in (*PROFILE_OVERRIDES, "taus", "tokenizer") if getattr(args, k) is not None}
    if args.data is not None:
        overrides["data"] = tuple(args.data)
    if args.ranks:
        overrides["ranks"] = tuple(args.ranks)
    profile = replace(profile, **overrides)
    if any(a % profile.checkpoint_every for a in (profile.probe_every, *profile.taus)):
        parser.error(f"--probe-every and --taus must be multiples of --checkpoint-every ({profile.checkpoint_every})")
    if any(m < 1 for m in args.batch_sizes) or any(s < 1 for s in args.batch_ladder or ()):
        parser.error("--batch-sizes and --batch-ladder must be >= 1")
    if DEFAULT_RANK not in profile.ranks:
        parser.error(f"--ranks must include the default rank {rank_label(DEFAULT_RANK)}")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        parser.error(f"--tokenizer {args.tokenizer}: not a directory (a local Hugging Face tokenizer directory)")
    missing = [d for d in args.data or () if d != "stdlib" and not Path(d).exists()]
    if missing:
        parser.error(f"--data {missing[0]}: no such file or directory")
    if profile.device == "cuda" and not torch.cuda.is_available():
        parser.error("profile gpu needs a CUDA device; this machine has none")
    # another model or training shape gets its own runs, page, JSON and figures instead of replacing the
    # profile's: e.g. --preset small -> cpu-small, --steps 900 -> cpu-steps900
    shape = [("", args.preset and Path(args.preset).name)] + [(k.replace("_", "-"), getattr(args, k))
                                                              for k in ("steps", "replicas", "seq_len", "micro_batch")]
    shape += [("data-", args.data and Path(args.data[0]).stem), ("tok-", args.tokenizer and Path(args.tokenizer).name)]
    variant = "-".join([profile.name] + [f"{k}{v}" for k, v in shape if v is not None])
    suffix = "" if variant == "cpu" else f"-{variant}"
    work = args.work_dir or REPO / "runs" / f"fidelity-{variant}"
    docs = args.docs or REPO / "docs" / f"fidelity{suffix}.md"
    results_json = args.json or REPO / "bench" / "results" / f"fidelity_{variant}.json"
    figures_dir = docs.parent / "fidelity"
    cache = args.cache_dir
    recorder = Recorder(torch.device("cuda" if profile.device == "cuda" else "cpu"),
                        **({"path": args.csv} if args.csv else {}))

    results = json.loads(results_json.read_text()) if results_json.is_file() else {}
    # compared as stored (JSON has lists where the profile has tuples; fields added since, at their values then)
    stored_profile = results.get("setup", {}).get("profile")
    if stored_profile is not None and {**PROFILE_ADDED, **stored_profile} != json.loads(json.dumps(asdict(profile))):
        results = {}  # another configuration: nothing stored can be mixed with this one
    results.setdefault("seconds", {})
    if profile.tokenizer is not None and args.tokenize_rounds > 0:
        results["tokenize"] = tokenize_speed(profile, recorder, args.tokenize_rounds)
    for part in PARTS:
        if part not in args.parts:
            continue
        t0 = time.time()
        if part == "quality":
            results["quality"] = quality(profile, work, cache, args.schedules, args.policies)
        elif part == "seeds":
            results["seeds"] = seeds(profile, work, cache, args.sweep_schedule, args.policies, args.seeds)
        elif part == "ladder":
            results["ladder"] = ladder(profile, work, cache, args.seeds, args.ladder)
        elif part == "ttq":
            if "seeds" not in results or "ladder" not in results:
                parser.error("--parts ttq needs the seeds and ladder parts' results (run them first)")
            results["quality_model"] = quality_model(results, profile.steps)
            results["ttq"] = ttq(results, args.csv, tuple(args.ttq_n), args.ttq_seeds, args.ttq_hours)
        elif part == "probe":
            results["probe"] = probe(profile, work, cache, args.sweep_schedule, args.threads)
        elif part == "batch":
            results["batch"] = batch_sweep(profile, work, cache, args.sweep_schedule, args.seeds, args.batch_sizes,
                                           args.batch_ladder)
        else:
            results["sweep"] = sweep(profile, work, cache, args.sweep_schedule)
        results["seconds"][part] = time.time() - t0
    results["setup"] = setup_info(profile, work, cache, recorder, results.get("setup"))

    figures = {}
    if "quality" in results:
        figures["quality"] = plot_quality(results["quality"], figures_dir / f"{variant}_quality.png")
    if "probe" in results:
        figures["probe"] = plot_probe(profile, results["probe"], figures_dir / f"{variant}_probe.png")
    if "ttq" in results:
        figures["ttq"] = plot_ttq(results["ttq"], figures_dir / f"{variant}_ttq.png")
    if "batch" in results:
        figures["batch"] = plot_batch(results["batch"], figures_dir / f"{variant}_batch.png")
    rel = {k: str(v.relative_to(docs.parent)) for k, v in figures.items()}
    command = regenerate_command(parser, args, profile, [p for p in PARTS if p in results])
    results_json.parent.mkdir(parents=True, exist_ok=True)
    results_json.write_text(json.dumps(results, indent=1) + "\n")
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render(profile, results, rel, command, variant))
    record(recorder, profile, results, args.parts)
    recorder.save()
    print(f"wrote {docs}, {results_json}, {', '.join(map(str, figures.values()))}; {len(recorder.rows)} rows -> "
          f"{recorder.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
