"""``mecefo-plan``: which failure policy for a job, before it starts.

From the job's size, its failure rate, its step time and its restart / checkpoint costs, and what a
dropped sequence costs in training progress (the drop penalty), it simulates every policy
(:mod:`mecefo.planner`) with 0 and more hot spares and prints a table: throughput drop, expected
wall clock to the failure-free job's quality, what each policy assumes, and the recommendation.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from .command import OneLineErrors
from .costs import DEFAULT_NEIGHBOUR_COST, WorkCosts, neighbour_flop_ratio
from .failures import SCENARIOS
from .flops import model_flops
from .membership import DEFAULT_DROP_PENALTY, DEFAULT_PENALTY
from .noise import drop_penalty
from .planner import DEFAULT_RANK, CostSource, compare_policies
from .policy import POLICIES
from .presets import PRESETS, get_preset
from .simulate import DEFAULT_SEQUENCES, GPU_EVENTS, EventCosts, FailureProcess, StepCosts
from .time_to_quality import QualityModel

PROG = "mecefo-plan"
# Measured penalties (docs/fidelity-cpu-steps900.md: tiny, 900 steps, high schedule, 3 seeds, momentum bases:
# the trainer's default): dropping (shrink) 0.48, the paper's both-shards approximation (mecefo) 0.49, the
# orphan-only approximation 0.42. The approximation penalties are measured constants: no predictor for them
# suggested itself (README, "Which policy?").
MECEFO_PENALTY = 0.49
MIN_HOURS = 200.0
FAILURES_PER_SEED = 300
EXACT_NOTE = "exact: the failure-free model's quality"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"must be a positive number, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"must be a number >= 0, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be an integer >= 1, got {text}")
    return value


def _typed(parse):
    """argparse ``type=``: the message of parse's ValueError, one line (argparse names the option)."""
    import argparse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            msg = str(e)
            raise argparse.ArgumentTypeError(msg if "must" in msg else f"not a number: {text!r}") from None
    convert.__name__ = parse.__name__.strip("_")
    return convert


def build_parser() -> OneLineErrors:
    p = OneLineErrors(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    g = p.add_argument_group("the job")
    g.add_argument("--replicas", type=_typed(_count), help="data-parallel replicas (or --gpus and --group-size)")
    g.add_argument("--gpus", type=_typed(_count), help="GPUs in the job: replicas = gpus / group-size")
    g.add_argument("--group-size", type=_typed(_count), default=1, help="GPUs per replica (default %(default)s)")
    g.add_argument("--sequences", type=_typed(_count), default=DEFAULT_SEQUENCES,
                   help="sequences per replica per step (default %(default)s): spreading's granularity")
    g.add_argument("--step-s", type=_typed(_positive), help="seconds of one failure-free step")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="the model: neighbour-mode cost from its FLOP ratio; with --gpu-tflops, the step time too")
    g.add_argument("--seq", type=_typed(_count), default=2048, help="sequence length (default %(default)s)")
    g.add_argument("--gpu-tflops", type=_typed(_positive),
                   help="achieved TFLOP/s per GPU: step time = the preset's training FLOPs per replica / "
                        "(group-size x this)")
    g.add_argument("--comm-ms", type=_typed(_non_negative), default=0.0,
                   help="per-step time no replica's work changes (all-reduce, optimizer; default 0)")
    g.add_argument("--neighbour-cost", type=_typed(_positive),
                   help="a neighbour-mode sequence's time / an exact one's (default: the preset's FLOP ratio, "
                        f"else {DEFAULT_NEIGHBOUR_COST})")
    g = p.add_argument_group("failures")
    g.add_argument("--schedule", choices=sorted(SCENARIOS),
                   help="the paper's scenarios (a failure every 2 / 1 / 0.5 h lasting 4 / 3 / 2 h in a 32-replica "
                        "job); default high unless --mtbf-hours")
    g.add_argument("--mtbf-hours", type=_typed(_positive), help="mean time between failures of one node")
    g.add_argument("--repair-hours", type=_typed(_positive), help="with --mtbf-hours: how long a node stays down")
    g.add_argument("--nodes-per-replica", type=_typed(_count), default=1,
                   help="a replica fails when any of its nodes does (default %(default)s)")
    g = p.add_argument_group("event costs (seconds; defaults: a GPU cluster's, see mecefo.simulate)")
    for name, what in (("detect", "a failure stalls the job until it is detected"),
                       ("heal", "a returning replica receives the state from a live one"),
                       ("restart", "policy restart: from the failure to the relaunched job's first step"),
                       ("save", "policy restart: one checkpoint save"),
                       ("start", "a hot spare's process start")):
        g.add_argument(f"--{name}-s", type=_typed(_non_negative), default=getattr(GPU_EVENTS, f"{name}_s"),
                       help=f"{what} (default %(default)g)")
    g = p.add_argument_group("training progress")
    g.add_argument("--drop-penalty", default=str(DEFAULT_DROP_PENALTY),
                   help="progress lost per unit share of the batch dropped: a number, or a run directory whose "
                        "summary.json has the noise scale the trainer measured (its B_simple, predicted at this "
                        "job's batch); default %(default)s, measured on the tiny CPU model")
    g.add_argument("--approx-penalty", type=_typed(_non_negative), default=DEFAULT_PENALTY,
                   help="progress lost per unit share run in orphan-only neighbour mode (default %(default)s, "
                        "measured)")
    g.add_argument("--quality", type=Path,
                   help="a bench/fidelity.py results JSON: its measured penalties per variant (and ladder) "
                        "instead of the two above")
    g = p.add_argument_group("the simulation")
    g.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    g.add_argument("--spares", nargs="+", type=int,
                   help="hot spare nodes to compare (default: 0, 1, 2 and 4 per 32 replicas)")
    g.add_argument("--hours", type=_typed(_positive),
                   help=f"simulated wall clock per seed (default: {MIN_HOURS:g} h, or long enough for "
                        f"{FAILURES_PER_SEED} failures of the job)")
    g.add_argument("--seeds", type=_typed(_count), default=3, help="failure-process seeds (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="first seed")
    g.add_argument("--plot", type=Path, help="write a PNG of time to quality per policy and spares")
    g.add_argument("--json", type=Path, help="write every row as JSON")
    return p


def replicas_of(args, parser) -> int:
    if args.replicas is not None:
        if args.gpus is not None:
            parser.error("argument --gpus: give --replicas or --gpus (with --group-size), not both")
        return args.replicas
    if args.gpus is None:
        parser.error("argument --replicas: the job's size is required (--replicas, or --gpus and --group-size)")
    if args.gpus % args.group_size:
        parser.error(f"argument --gpus: {args.gpus} GPUs are not a whole number of replicas of --group-size "
                     f"{args.group_size}")
    return args.gpus // args.group_size


def failures_of(args, parser) -> FailureProcess:
    if args.mtbf_hours is None:
        if args.repair_hours is not None:
            parser.error("argument --repair-hours: needs --mtbf-hours")
        process = FailureProcess.scenario(args.schedule or "high")
    else:
        if args.schedule is not None:
            parser.error("argument --mtbf-hours: give --schedule or --mtbf-hours, not both")
        if args.repair_hours is None:
            parser.error("argument --mtbf-hours: needs --repair-hours (how long a failed node stays down)")
        process = FailureProcess(args.mtbf_hours, args.repair_hours,
                                 f"node MTBF {args.mtbf_hours:g} h, repair {args.repair_hours:g} h")
    if args.nodes_per_replica > 1:
        process = replace(process, mtbf_h=process.mtbf_h / args.nodes_per_replica,
                          name=f"{process.name}, {args.nodes_per_replica} nodes per replica")
    return process


def step_source(args, parser, n: int) -> CostSource:
    """Step costs: --step-s, or the preset's FLOPs at --gpu-tflops; the neighbour-mode cost."""
    preset = get_preset(args.preset) if args.preset else None
    if args.neighbour_cost is not None:
        neighbour, why = args.neighbour_cost, "given"
    elif preset:
        neighbour, why = neighbour_flop_ratio(preset, args.seq, DEFAULT_RANK), f"{args.preset} FLOP ratio at seq {args.seq}"
    else:
        neighbour, why = DEFAULT_NEIGHBOUR_COST, "default"
    if args.step_s is not None:
        if args.gpu_tflops is not None:
            parser.error("argument --gpu-tflops: give --step-s or --gpu-tflops, not both")
        step_s, step_why = args.step_s, "given"
    elif args.gpu_tflops is not None:
        if preset is None:
            parser.error("argument --gpu-tflops: needs --preset (the model whose FLOPs a step runs)")
        kv = (preset.num_kv_heads or preset.num_heads) * preset.head_dim
        flops = model_flops(args.sequences, args.seq, preset.hidden_size, preset.intermediate_size, kv,
                            preset.num_layers, preset.vocab_size)
        step_s = flops / (args.group_size * args.gpu_tflops * 1e12)
        step_why = (f"{args.preset}: {flops / 1e12:.3g} TFLOP per replica per step / ({args.group_size} x "
                    f"{args.gpu_tflops:g} TFLOP/s)")
    else:
        parser.error("argument --step-s: the step time is required (--step-s, or --preset and --gpu-tflops)")
    events = EventCosts(args.detect_s, args.heal_s, args.restart_s, args.save_s, args.start_s)
    costs = StepCosts(step_s, args.comm_ms / 1e3, WorkCosts(neighbour=neighbour), args.sequences)
    label = (f"step {step_s:.4g} s ({step_why}) + {args.comm_ms:g} ms; neighbour-mode sequence {neighbour:.3f}x "
             f"({why}); events: detect {events.detect_s:g} s, heal {events.heal_s:g} s, restart "
             f"{events.restart_s:g} s, checkpoint {events.save_s:g} s, spare start {events.start_s:g} s")
    return CostSource("plan", label, costs, events, "model", args.seq * args.sequences)


def drop_penalty_of(args, parser, n: int) -> tuple[float, str]:
    """The drop penalty: a number, or predicted at this job's batch from a run's measured noise scale."""
    text = args.drop_penalty
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        if not 0 <= value or math.isinf(value):
            parser.error(f"argument --drop-penalty: must be >= 0, got {text}")
        return value, ("given" if text != str(DEFAULT_DROP_PENALTY)
                       else "measured on the tiny CPU model (docs/fidelity-cpu-steps900.md)")
    summary_path = Path(text) / "summary.json"
    if not summary_path.is_file():
        parser.error(f"argument --drop-penalty: {text} is neither a number nor a run directory with a summary.json")
    summary = json.loads(summary_path.read_text())
    b_simple, run_batch = summary.get("noise_b_simple"), summary.get("noise_batch")
    if b_simple is None or not run_batch:
        parser.error(f"argument --drop-penalty: {summary_path} has no measured noise scale (noise_b_simple): "
                     "a run of a trainer without it, or one whose steps never ran two replicas exactly")
    config = json.loads((Path(text) / "config.json").read_text()) if (Path(text) / "config.json").is_file() else {}
    run_seq = config.get("seq_len", args.seq)
    # B_simple is in the run's sequences; this job's batch, in tokens, over the run's sequence length
    batch = n * args.sequences * args.seq / run_seq
    value = drop_penalty(b_simple, batch)
    return value, (f"B_simple {b_simple:.3g} sequences of {run_seq} tokens measured by {text} (at its batch of "
                   f"{run_batch}); at this job's {batch:.4g}: B_noise / (B + B_noise)")


def quality_of(args, parser, n: int) -> tuple[QualityModel, dict]:
    if args.quality is not None:
        try:
            model = QualityModel.load(args.quality)
        except (OSError, ValueError) as e:
            parser.error(f"argument --quality: {e}")
        return model, {"source": f"measured per variant in {args.quality}"}
    drop, why = drop_penalty_of(args, parser, n)
    penalties = {"shrink": drop, "spread-orphan": args.approx_penalty, "mecefo": MECEFO_PENALTY}
    return QualityModel(penalties), {"drop": (drop, why), "approximate": args.approx_penalty}


def assumptions(policy: str, quality: QualityModel, events: EventCosts) -> str:
    """What a policy's time to quality rests on, in a few words."""
    drop, approx = quality.drop_penalty, quality.approximation_penalty
    return {
        "mecefo": f"both shards of a neighbour approximated, penalty {approx('mecefo'):.2f}",
        "ndb-exact": f"{EXACT_NOTE}; a neighbour runs two shards",
        "neighbour-orphan": f"orphan approximated, penalty {approx('neighbour-orphan'):.2f}",
        "spread": f"{EXACT_NOTE}; orphans spread over survivors",
        "spread-orphan": f"orphans spread, approximated, penalty {approx('spread-orphan'):.2f}",
        "auto": f"per step the cheapest of drop / spread / approximate at penalties {drop:.2f} / "
                f"{approx('auto'):.2f}",
        "shrink": f"dropped sequences cost {drop:.2f} of their progress",
        "restart": f"{EXACT_NOTE}; restart {events.restart_s:g} s, checkpoint {events.save_s:g} s (Young/Daly)",
    }[policy]


def default_spares(n: int) -> list[int]:
    per = math.ceil(n / 32)
    return sorted({0, per, 2 * per, 4 * per})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    n = replicas_of(args, parser)
    if n < 2:
        parser.error(f"argument --replicas: a job of {n} replica has no survivor to take over; need >= 2")
    process = failures_of(args, parser)
    source = step_source(args, parser, n)
    quality, why = quality_of(args, parser, n)
    spares = args.spares if args.spares is not None else default_spares(n)
    if any(s < 0 for s in spares):
        parser.error(f"argument --spares: must be >= 0, got {spares}")
    seeds = range(args.seed, args.seed + args.seeds)
    hours = args.hours or max(MIN_HOURS, FAILURES_PER_SEED * process.job_mtbf_h(n))
    rows = {}
    for s in spares:
        result = compare_policies(source, [n], [process], seeds, hours, quality, progress=False, spares=s)
        rows[s] = result
    print(f"{PROG}: {n} replicas x {args.sequences} sequences"
          + (f" ({args.gpus} GPUs in groups of {args.group_size})" if args.gpus else "")
          + f"; failures: {process.name} (a replica fails every {process.mtbf_h:g} h on average, down "
            f"{process.repair_h:g} h; the job: one every {_duration(process.job_mtbf_h(n))}); "
            f"{args.seeds} seeds x {hours:.0f} h")
    print(f"costs: {source.label}")
    if "drop" in why:
        print(f"penalties: drop {why['drop'][0]:.3f} ({why['drop'][1]}); approximation {why['approximate']:.2f} "
              f"(orphan-only, measured constant), {MECEFO_PENALTY:.2f} (both shards, measured)")
    else:
        print(f"penalties: {why['source']}")
    table = summarize(rows, args.policies, spares)
    print_table(table, spares, quality, source.events)
    best = recommend(table, spares, quality.drop_penalty)
    for line in best:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"replicas": n, "failures": process.name, "costs": source.label,
                                         "rows": table, "recommendation": best}, indent=1) + "\n")
    if args.plot:
        plot(table, spares, args.plot, f"{n} replicas, {process.name}")
        print(f"plot: {args.plot}")
    return 0


def _duration(hours: float) -> str:
    return f"{60 * hours:.3g} min" if hours < 2 else f"{hours:.3g} h"


def summarize(rows: dict, policies, spares) -> list[dict]:
    """One row per policy and spares count: throughput drop and time to quality (means over seeds)."""
    out = []
    for s in spares:
        drops = {r["policy"]: r for r in rows[s]["drops"]}
        ttq = {r["variant"]: r for r in rows[s]["ttq"]}
        for policy in policies:
            out.append({"policy": policy, "spares": s, "drop_pct": drops[policy]["drop_pct"],
                        "time_ratio": ttq[policy]["time_ratio"], "low": ttq[policy]["low"],
                        "high": ttq[policy]["high"], "efficiency": ttq[policy]["efficiency"],
                        "dropped_share": drops[policy]["dropped_share"],
                        "approximated_share": drops[policy]["approximated_share"]})
    return out


def _cell(table, policy, s):
    return next(r for r in table if r["policy"] == policy and r["spares"] == s)


def print_table(table: list[dict], spares, quality: QualityModel, events: EventCosts) -> None:
    policies = list(dict.fromkeys(r["policy"] for r in table))
    print("\ntime to the failure-free job's quality, x its wall clock (throughput drop in brackets), by hot spares:")
    header = f"{'policy':<18}" + "".join(f"{f'{s} spare' + ('s' if s != 1 else ''):>18}" for s in spares) + "  assumes"
    print(header)
    for policy in policies:
        cells = "".join(f"{_cell(table, policy, s)['time_ratio']:>9.3f}x ({_cell(table, policy, s)['drop_pct']:4.1f}%)"
                        for s in spares)
        print(f"{policy:<18}{cells}  {assumptions(policy, quality, events)}")


EXACT = ("ndb-exact", "spread", "restart")


def recommend(table: list[dict], spares, drop: float) -> list[str]:
    """The policy with the least expected time to quality at each spares count, and why: against the best
    exact policy, the drop penalty at which dropping and exact work would tie."""
    lines = []
    for s in spares:
        rows = [r for r in table if r["spares"] == s]
        ranked = sorted(rows, key=lambda r: (r["time_ratio"], r["policy"] == "auto"))
        best = ranked[0]
        line = (f"recommended with {s} spare{'s' if s != 1 else ''}: {best['policy']} ({best['time_ratio']:.3f}x the "
                f"failure-free wall clock")
        twins = [r["policy"] for r in ranked[1:] if r["time_ratio"] == best["time_ratio"]]
        if twins:
            line += f"; {', '.join(twins)} the same: the same plans"
        exact = min((r for r in rows if r["policy"] in EXACT), key=lambda r: r["time_ratio"], default=None)
        shrink = next((r for r in rows if r["policy"] == "shrink"), None)
        if exact and shrink and shrink["dropped_share"] >= 1e-3:
            # shrink's wall clock is T_s = 1 / (e rate) with e = 1 - p d: equal to the exact policy's at
            # p* = (1 - T_s e / T_e) / d
            tie = (1 - shrink["time_ratio"] * shrink["efficiency"] / exact["time_ratio"]) / shrink["dropped_share"]
            line += (f"). Dropping ({100 * shrink['dropped_share']:.1f}% of the sequences at drop penalty {drop:.2f}) "
                     f"{'beats' if shrink['time_ratio'] < exact['time_ratio'] else 'loses to'} the best exact policy, "
                     f"{exact['policy']} ({exact['time_ratio']:.3f}x); they tie at a drop penalty of {tie:.2f}"
                     + (" (above 1, which the noise-scale model never predicts: dropping wins at any batch)"
                        if tie > 1 else ""))
        else:
            line += ")"
        lines.append(line)
    base = sorted((r for r in table if r["spares"] == spares[0]), key=lambda r: r["time_ratio"])[0]
    top = min(table, key=lambda r: r["time_ratio"])
    if top["spares"] != spares[0]:
        lines.append(f"{top['spares']} spares save {100 * (1 - top['time_ratio'] / base['time_ratio']):.1f}% of the "
                     f"wall clock against {spares[0]} ({top['policy']} {top['time_ratio']:.3f}x vs {base['policy']} "
                     f"{base['time_ratio']:.3f}x)")
    return lines


def plot(table: list[dict], spares, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in table))
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(policies)), 4.5))
    width = 0.8 / len(spares)
    for i, s in enumerate(spares):
        ax.bar([k + (i - (len(spares) - 1) / 2) * width for k in range(len(policies))],
               [_cell(table, p, s)["time_ratio"] for p in policies], width, label=f"{s} spares")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right")
    ax.set_ylabel("wall clock to quality / failure-free")
    ax.set_ylim(0.9, min(3.0, max(r["time_ratio"] for r in table) * 1.05))
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
