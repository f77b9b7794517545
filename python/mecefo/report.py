"""Metrics (JSONL), the end-of-run summary, and the loss / throughput plot.

Each replica appends one JSON object per line to ``RUN_DIR/metrics/replica_<i>.jsonl``: one per
committed step (loss, tokens/s, timings, live set, neighbours, dropped shards, policy, state
hashes, launch generation and lineage) and events (``start``, ``healed``, ``discarded``,
``checkpoint``, ``resumed``, ``eval``, ``warning``, ``fenced``, ``restart_requested``, and
``state_bytes``: the bytes of parameters and optimizer state the rank holds, after its first update). The
supervisor writes ``RUN_DIR/events.jsonl`` (launches, process spawns, exits, restarts, hang
wake-ups). :func:`summarize` turns all of it into the numbers the benchmarks need (step times,
detection, heal and restart costs) and :func:`plot` into a PNG.

The files are append-only across job restarts and ``--resume``: a step redone after a relaunch
from a checkpoint is in them twice, under two generations (a group job's too: each launch of its
groups is a generation, :func:`mecefo.group.launch_generation`). :func:`step_series` (the loss
curve, the summary's training numbers) keeps, per step, the records of the newest generation that
committed it: the job's final lineage. The summary's event counts (checkpoints, heals, ...)
cover the current launch only (since the newest ``launch`` record in ``events.jsonl``; in a group
job, since the first process of the newest generation started).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

from .command import OneLineErrors
from .failures import fired_injections, unfired_injections

METRICS_DIR = "metrics"
EVENTS_FILE = "events.jsonl"


def metrics_path(run_dir: str | Path, replica: int) -> Path:
    return Path(run_dir) / METRICS_DIR / f"replica_{replica}.jsonl"


class MetricsWriter:
    """Appends one JSON object per line, flushed at once (a killed process loses nothing written)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)

    def write(self, **record) -> None:
        record.setdefault("time", time.time())
        self._file.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    return out


def ranks_per_group(run_dir: str | Path) -> int:
    """G of a group job (mecefo.group: ranks other than 0 write metrics/ranks/replica_<I>_rank_<r>.jsonl); 1 else."""
    ranks = [int(p.stem.rsplit("_", 1)[1]) for p in (Path(run_dir) / METRICS_DIR / "ranks").glob("replica_*_rank_*.jsonl")]
    return max(ranks, default=0) + 1


def _group_heals(run_dir: Path, healed: list[dict], since: float) -> list[float]:
    """Seconds of each heal (``healed``: rank 0's events) since ``since``: a group has healed when its slowest
    rank has (the other ranks' events are in metrics/ranks)."""
    per_heal: dict[tuple, float] = {}
    rank_records = [r for p in sorted((run_dir / METRICS_DIR / "ranks").glob("replica_*_rank_*.jsonl"))
                    for r in read_jsonl(p) if r.get("event") == "healed" and r.get("time", since) >= since]
    for r in healed + rank_records:
        key = (r["replica"], r["step"], r.get("generation", 0))
        per_heal[key] = max(per_heal.get(key, 0.0), r["seconds"])
    return list(per_heal.values())


def held_state(run_dir: Path, since: float) -> dict:
    """Bytes of parameters and optimizer state each rank held (its ``state_bytes`` event, written after its
    first update; under ``--shard fsdp`` its shards) since ``since``: the largest rank's, and how the
    groups held the model."""
    events = [r for p in sorted((run_dir / METRICS_DIR).rglob("replica_*.jsonl")) for r in read_jsonl(p)
              if r.get("event") == "state_bytes" and r.get("time", since) >= since]
    if not events:
        return {"state_bytes_per_rank": None, "param_bytes_per_rank": None, "optimizer_bytes_per_rank": None,
                "shard": None}
    largest = max(events, key=lambda r: r["param_bytes"] + r["optimizer_bytes"])
    return {"state_bytes_per_rank": largest["param_bytes"] + largest["optimizer_bytes"],
            "param_bytes_per_rank": largest["param_bytes"], "optimizer_bytes_per_rank": largest["optimizer_bytes"],
            "shard": largest["shard"]}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every replica's records, in file order per replica."""
    out = []
    for path in sorted((Path(run_dir) / METRICS_DIR).glob("replica_*.jsonl")):
        out.extend(read_jsonl(path))
    return out


def committed_steps(records: list[dict]) -> dict[int, list[dict]]:
    """step -> the committed-step records of every replica that committed it."""
    steps: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        if "event" not in r:
            steps[r["step"]].append(r)
    return dict(sorted(steps.items()))


def final_lineage(records: list[dict]) -> dict[int, list[dict]]:
    """step -> the committed-step records of the newest launch generation that committed it (a relaunch
    from a checkpoint redoes the steps after it: those of older generations were abandoned)."""
    out = {}
    for step, rs in committed_steps(records).items():
        newest = max(r.get("generation", 0) for r in rs)
        out[step] = [r for r in rs if r.get("generation", 0) == newest]
    return out


def step_series(records: list[dict]) -> list[dict]:
    """One record per committed step of the final lineage (the lowest replica's; they agree on loss and plan)."""
    return [min(rs, key=lambda r: r["replica"]) for rs in final_lineage(records).values()]


def newest_generation(records: list[dict]) -> int | None:
    """The newest launch generation in a run's records (None: no record carries one)."""
    return max((r["generation"] for r in records if "generation" in r), default=None)


def launch_start(events: list[dict], records: list[dict] = ()) -> float:
    """When the current launch of a run directory began: its supervisor's newest ``launch`` record, else (a
    group job: no supervisor) the first ``start`` of a process of the newest generation; 0 if neither."""
    launches = [e["time"] for e in events if e.get("event") == "launch"]
    if launches:
        return max(launches)
    newest = newest_generation(records)
    return min((r["time"] for r in records if r.get("event") == "start" and r.get("generation") == newest),
               default=0.0)


def failure_spans(series: list[dict], replicas: int) -> list[tuple[int, int]]:
    """[start, end) step ranges during which at least one shard's owner was not live."""
    spans, start = [], None
    for r in series:
        failing = len(r["live"]) < replicas
        if failing and start is None:
            start = r["step"]
        if not failing and start is not None:
            spans.append((start, r["step"]))
            start = None
    if start is not None:
        spans.append((start, series[-1]["step"] + 1))
    return spans


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def policy_name(config: dict) -> str:
    """The run's policy as a preset name, or takeover+approximate when --takeover / --approximate changed it."""
    from .policy import resolve_policy

    return resolve_policy(config["policy"], takeover=config.get("takeover"),
                          approximate=config.get("approximate")).name


def _plan_counts(series: list[dict]) -> dict[str, int]:
    """Steps with a replica down, by the fixed policy their plan followed (auto picks one per step)."""
    counts: dict[str, int] = {}
    for r in series:
        if not r["plan"].startswith("all "):
            name = r.get("plan_policy", r["policy"])
            counts[name] = counts.get(name, 0) + 1
    return counts


def summarize(run_dir: str | Path) -> dict:
    """The run's headline numbers (also written to RUN_DIR/summary.json by the launcher)."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    replicas = config["replicas"]
    records = read_metrics(run_dir)
    events = read_jsonl(run_dir / EVENTS_FILE)
    series = step_series(records)
    redone = sum(1 for rs in committed_steps(records).values() if len({r.get("generation", 0) for r in rs}) > 1)
    since = launch_start(events, records)
    events = [e for e in events if e.get("time", since) >= since]
    events_of = defaultdict(list)
    for r in records:
        if "event" in r and r.get("time", since) >= since:
            events_of[r["event"]].append(r)
    warnings = list(dict.fromkeys(r["message"] for r in events_of["warning"]))

    normal = [r for r in series if len(r["live"]) == replicas]
    failing = [r for r in series if len(r["live"]) < replicas]
    total_tokens = sum(r["tokens"] for r in series)
    total_time = sum(r["step_s"] for r in series)

    def throughput(rs):
        t = sum(r["step_s"] for r in rs)
        return sum(r["tokens"] for r in rs) / t if t > 0 else None

    tput_normal, tput_failing = throughput(normal), throughput(failing)
    evals = sorted(events_of["eval"], key=lambda r: r["step"])
    kills = [f for f in fired_injections(run_dir) if f["action"] == "kill"]
    hangs = [f for f in fired_injections(run_dir) if f["action"] == "hang"]
    detection = []
    for f in kills + hangs:
        after = [r["quorum_end"] for r in records if "event" not in r and r.get("quorum_end", 0) > f["time"]
                 and f["replica"] not in r["members"]]
        if after:
            detection.append(min(after) - f["time"])
    spawns = [e for e in events if e.get("event") == "spawn" and e.get("rejoin")]
    rejoin = []
    for e in spawns:
        first = [r["time"] for r in records  # of this process: a relaunch (another generation) is not a rejoin
                 if "event" not in r and r["replica"] == e["replica"] and r["time"] > e["time"]
                 and r.get("generation", 0) == e.get("generation", 0)]
        if first:
            rejoin.append(min(first) - e["time"])
    job_restarts = []
    for e in events:
        if e.get("event") == "job_restart":
            first = [r["time"] for r in records if "event" not in r and r["time"] > e["time"]]
            job_restarts.append(min(first) - e["time"] if first else None)
    noise = [r for r in series if r.get("noise_samples")]  # steps after the noise scale's first sample
    out = {
        "run_dir": str(run_dir),
        "policy": policy_name(config),
        "plans": _plan_counts(series),
        "replicas": replicas,
        "steps_planned": config["steps"],
        "steps_done": (series[-1]["step"] + 1) if series else 0,
        "train_seconds": total_time,
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / total_time if total_time else None,
        "tokens_per_s_no_failure": tput_normal,
        "tokens_per_s_under_failure": tput_failing,
        "throughput_drop_pct": (100 * (1 - tput_failing / tput_normal)) if tput_normal and tput_failing else None,
        "step_s_median": sorted(r["step_s"] for r in series)[len(series) // 2] if series else None,
        "compute_s_mean": _mean(r["compute_s"] for r in normal),
        "steps_under_failure": len(failing),
        "max_dead_at_once": max((replicas - len(r["live"]) for r in series), default=0),
        "steps_with_dropped_shards": sum(1 for r in series if r.get("dropped_sequences", r["dropped"])),
        "first_loss": series[0]["loss"] if series else None,
        "final_loss": _mean(r["loss"] for r in series[-10:]),
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_ppl": evals[-1]["val_ppl"] if evals else None,
        "kills": len(kills),
        "hangs": len(hangs),
        "discarded_attempts": len(events_of["discarded"]),
        "ranks_per_group": ranks_per_group(run_dir),
        **held_state(run_dir, since),
        "heals": len(events_of["healed"]),
        "heal_s_mean": _mean(_group_heals(run_dir, events_of["healed"], since)),
        "detect_s_mean": _mean(detection),
        "rejoin_s_mean": _mean(rejoin),
        "job_restarts": len(job_restarts),
        "job_restart_s_mean": _mean(s for s in job_restarts if s is not None),
        "checkpoints": len(events_of["checkpoint"]),
        "checkpoint_save_s_mean": _mean(r["seconds"] for r in events_of["checkpoint"]),
        "checkpoint_load_s_mean": _mean(r["seconds"] for r in events_of["resumed"]),
        "replica_init_s_mean": _mean(r["init_s"] for r in events_of["start"]),
        "steps_redone": redone,
        "fenced": [{"replica": r["replica"], "step": r["step"]} for r in events_of["fenced"]],
        "injections_not_fired": unfired_injections(config["inject"], replicas, run_dir),
        "warnings": warnings,
        # the gradient noise scale at the end (mecefo.noise): B_simple in sequences, at a global batch of
        # noise_batch sequences, and the drop penalty it predicts there
        "noise_b_simple": noise[-1].get("noise_b_simple") if noise else None,
        "noise_batch": noise[-1]["noise_batch"] if noise else None,
        "noise_drop_penalty": noise[-1].get("noise_drop_penalty") if noise else None,
        "noise_samples": noise[-1]["noise_samples"] if noise else 0,
    }
    return out


def _fmt(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:,.{digits}g}{unit}" if abs(value) < 1e4 else f"{value:,.0f}{unit}"
    return f"{value}{unit}"


def format_summary(s: dict) -> str:
    rows = []
    if "complete" in s:  # written by the launcher: how the run ended
        rows.append(("run", "complete" if s["complete"] else f"INCOMPLETE: {s['end']}"))
    rows += [
        ("policy", s["policy"]),
        ("replicas", s["replicas"] if s.get("ranks_per_group", 1) == 1
         else f"{s['replicas']} groups x {s['ranks_per_group']} ranks"),
        ("steps", f"{s['steps_done']} / {s['steps_planned']}"),
        ("parameters + optimizer state per rank", _held(s)),
        ("training time", _fmt(s["train_seconds"], " s")),
        ("tokens/s (all steps)", _fmt(s["tokens_per_s"])),
        ("tokens/s no failure / under failure",
         f"{_fmt(s['tokens_per_s_no_failure'])} / {_fmt(s['tokens_per_s_under_failure'])}"),
        ("throughput drop under failure", _fmt(s["throughput_drop_pct"], " %")),
        ("steps under failure (max dead at once)", f"{s['steps_under_failure']} ({s['max_dead_at_once']})"),
        ("plans under failure (steps)", ", ".join(f"{k} {v}" for k, v in s.get("plans", {}).items()) or "-"),
        ("steps with dropped shards", s["steps_with_dropped_shards"]),
        ("train loss first -> last 10", f"{_fmt(s['first_loss'], '', 4)} -> {_fmt(s['final_loss'], '', 4)}"),
        ("validation loss (ppl)", f"{_fmt(s['val_loss'], '', 4)} ({_fmt(s['val_ppl'], '', 4)})"),
        ("kills / hangs injected", f"{s['kills']} / {s['hangs']}"
                                   + (f" ({len(s['injections_not_fired'])} never fired)" if s["injections_not_fired"]
                                      else "")),
        ("discarded step attempts", s["discarded_attempts"]),
        ("detect dead replica (kill -> quorum without it)", _fmt(s["detect_s_mean"], " s")),
        ("heals (mean state transfer + quorum)", f"{s['heals']} ({_fmt(s['heal_s_mean'], ' s')})"
         + (f", groups of {s['ranks_per_group']} ranks: the slowest rank" if s.get("ranks_per_group", 1) > 1 else "")),
        ("restart -> first step of rejoined replica", _fmt(s["rejoin_s_mean"], " s")),
        ("job restarts (mean cost)", f"{s['job_restarts']} ({_fmt(s['job_restart_s_mean'], ' s')})"),
        ("steps redone after a relaunch", s["steps_redone"]),
        ("replicas fenced (behind the job)", ", ".join(f"{f['replica']} at step {f['step']}" for f in s["fenced"])
         or "-"),
        ("checkpoints (mean save / load)", f"{s['checkpoints']} ({_fmt(s['checkpoint_save_s_mean'], ' s')} / "
                                           f"{_fmt(s['checkpoint_load_s_mean'], ' s')})"),
        ("noise scale B_simple at the end (drop penalty)",
         f"{_fmt(s.get('noise_b_simple'))} sequences at a batch of {_fmt(s.get('noise_batch'))} "
         f"({_fmt(s.get('noise_drop_penalty'))}; {s.get('noise_samples', 0)} steps measured)"
         if s.get("noise_samples") else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 24)
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB" if nbytes < 1e9 else f"{nbytes / 1e9:,.2f} GB"


def _held(s: dict) -> str:
    if s.get("state_bytes_per_rank") is None:
        return "-"
    how = "fsdp: each rank its shards" if s["shard"] == "fsdp" else "whole model on every rank"
    return (f"{_mb(s['param_bytes_per_rank'])} + {_mb(s['optimizer_bytes_per_rank'])} = "
            f"{_mb(s['state_bytes_per_rank'])} ({how})")


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """PNG of training loss (and validation points), throughput and the gradient noise scale per step (with
    the drop penalty it predicts, and auto's), failure windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "plot.png"
    config = json.loads((run_dir / "config.json").read_text())
    records = read_metrics(run_dir)
    series = step_series(records)
    evals = sorted((r for r in records if r.get("event") == "eval"), key=lambda r: r["step"])
    fig, (ax_loss, ax_tput, ax_noise) = plt.subplots(3, 1, figsize=(9, 8.5), sharex=True)
    steps = [r["step"] for r in series]
    ax_loss.plot(steps, [r["loss"] for r in series], lw=1, label="train loss")
    if evals:
        ax_loss.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o", label="validation loss")
    ax_tput.plot(steps, [r["tokens_per_s"] for r in series], lw=1, color="tab:green", label="tokens/s")
    measured = [r for r in series if r.get("noise_b_simple")]
    if measured:
        ax_noise.plot([r["step"] for r in measured], [r["noise_b_simple"] for r in measured], lw=1,
                      color="tab:purple", label="B_simple (sequences)")
        ax_noise.axhline(measured[-1]["noise_batch"], color="tab:purple", ls=":", lw=0.8, label="global batch B")
        ax_noise.set_yscale("log")
        ax_penalty = ax_noise.twinx()
        ax_penalty.plot([r["step"] for r in measured], [r["noise_drop_penalty"] for r in measured], lw=1,
                        color="tab:orange", label="predicted drop penalty")
        believed = [r for r in series if "auto_drop_penalty" in r]
        if believed:
            ax_penalty.plot([r["step"] for r in believed], [r["auto_drop_penalty"] for r in believed], ".",
                            ms=2, color="tab:red", label="auto's drop penalty")
        ax_penalty.set_ylim(0, 1)
        ax_penalty.set_ylabel("drop penalty")
        ax_penalty.legend(loc="lower right", fontsize=8)
        ax_noise.legend(loc="upper left", fontsize=8)
    ax_noise.set_ylabel("noise scale")
    for i, (a, b) in enumerate(failure_spans(series, config["replicas"])):
        for ax in (ax_loss, ax_tput, ax_noise):
            ax.axvspan(a - 0.5, b - 0.5, color="tab:red", alpha=0.15, lw=0,
                       label="replica(s) down" if i == 0 and ax is ax_loss else None)
    ax_loss.set_ylabel("loss")
    ax_tput.set_ylabel("tokens / s")
    ax_noise.set_xlabel("step")
    ax_loss.legend(loc="upper right")
    model = config.get("model") or config.get("preset") or config.get("model_factory") or "tiny"
    ax_loss.set_title(f"{Path(model).name}  x{config['replicas']} replicas  policy {config['policy']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(run_dir: str | Path, extra: dict | None = None) -> tuple[dict, str, Path]:
    """summary.json, summary.txt and plot.png in ``run_dir``; ``extra`` (how the run ended) joins the summary."""
    run_dir = Path(run_dir)
    summary = summarize(run_dir)
    summary.update(extra or {})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary)
    (run_dir / "summary.txt").write_text(text + "\n")
    return summary, text, plot(run_dir)


def last_committed_step(records: list[dict]) -> int | None:
    """The highest step any replica committed (None: none)."""
    return max((r["step"] for r in records if "event" not in r), default=None)


def main(argv: list[str] | None = None) -> int:
    """``python -m mecefo.report RUN_DIR``: the summary of a run no launcher summarised (a group job under
    torchrun / srun, or a run whose launcher was killed), written next to its metrics and printed."""
    parser = OneLineErrors(prog="python -m mecefo.report", description=main.__doc__.split("\n")[0].strip("`"))
    parser.add_argument("run_dir", help="the run's --run-dir (shared by every group of a group job)")
    parser.add_argument("--complete", action="store_true",
                        help="write nothing; say whether the run's last step is committed (a record of it in the "
                             "metrics) and exit 0 if it is, 1 if not (examples/slurm_mecefo.sbatch asks this)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        parser.error(f"argument run_dir: {run_dir} holds no config.json: not a run directory")
    if args.complete:
        steps = json.loads((run_dir / "config.json").read_text())["steps"]
        last = last_committed_step(read_metrics(run_dir))
        if last is not None and last >= steps - 1:
            print(f"{run_dir}: complete: its last step ({steps - 1}) is committed")
            return 0
        print(f"{run_dir}: incomplete: " + ("no step committed" if last is None else
                                            f"last committed step {last}, the run's last is {steps - 1}"))
        return 1
    if not list((run_dir / METRICS_DIR).glob("replica_*.jsonl")):
        parser.error(f"argument run_dir: {run_dir / METRICS_DIR} holds no replica_*.jsonl: nothing was trained")
    _, text, png = write_report(run_dir)
    print(text)
    print(f"summary       {run_dir / 'summary.json'}\nplot          {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
