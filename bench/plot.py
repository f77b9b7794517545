"""PNG charts from bench/results/results.csv: one per benchmark family and device.

    python bench/plot.py                        # every device in the CSV -> bench/results/<family>_<device>.png
    python bench/plot.py --device H100 --out /tmp/charts

* kernels_<device>.png: time per provider, per op / shape and mode (median, p20-p80 bars);
* step_<device>.png: measured time ratio to a normal replica next to the FLOP-floor ratio, per scenario;
* cluster_<device>.png: simulated throughput drop per failure scenario and policy (median and p20-p80
  over seeds), the paper's quoted drops at the high rate, and the simulator against the real trainer.

Each chart uses the newest row of every (benchmark, provider, mode, config, metric) on the device,
so re-running a benchmark replaces its bars.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import DEFAULT_CSV, RESULTS_DIR  # noqa: E402

QUOTED_DEVICE_PREFIX = "paper:"
SCENARIO_ORDER = ("low", "mid", "high")
STEP_ORDER = ("normal", "neighbor", "mecefo-both", "exact-both", "exact-both-concat")
MODE_ORDER = ("fwd", "bwd", "full")


def newest_rows(rows: list[dict]) -> list[dict]:
    newest: dict[tuple, dict] = {}
    for r in rows:
        key = (r["benchmark"], r["provider"], r["mode"], r["config"], r["metric"], r["device"])
        if key not in newest or r["timestamp"] >= newest[key]["timestamp"]:
            newest[key] = r
    return list(newest.values())


def device_slug(device: str) -> str:
    """'cpu (x86_64, 2 threads)' -> 'cpu'; 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    if device.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def ordered(values, order=()) -> list:
    return sorted(set(values), key=lambda v: (order.index(v) if v in order else len(order), v))


def _grid(plt, panels: int, width: float = 5.2, height: float = 3.4, cols: int = 3):
    cols = min(cols, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def grouped_bars(ax, groups: list[str], series: dict[str, dict[str, tuple]], *, hatch: dict[str, str] | None = None):
    """Bars per group (x) and series (colour); values (median, p20, p80) with p20/p80 as error bars."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs, heights, lows, highs = [], [], [], []
        for g, group in enumerate(groups):
            if group in values:
                med, p20, p80 = values[group]
                xs.append(g - 0.4 + width * (i + 0.5))
                heights.append(med)
                lows.append(med - p20 if p20 is not None else 0)
                highs.append(p80 - med if p80 is not None else 0)
        ax.bar(xs, heights, width, yerr=[lows, highs], capsize=2, label=name,
               hatch=(hatch or {}).get(name), edgecolor="black" if hatch and name in hatch else None, linewidth=0.5)
    ax.set_xticks(range(len(groups)), groups)


def _value(r: dict) -> tuple:
    num = (lambda v: float(v) if v not in ("", None) else None)
    return num(r["median"]), num(r["p20"]), num(r["p80"])


def plot_kernels(plt, rows: list[dict], device: str, out: Path) -> Path | None:
    rows = [r for r in rows if r["benchmark"].startswith("kernels/") and r["benchmark"] != "kernels/ceiling"
            and r["metric"] == "time"]
    panels = ordered((r["benchmark"], r["config"]) for r in rows)
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels))
    for ax, (bench, config) in zip(axes, panels):
        mine = [r for r in rows if (r["benchmark"], r["config"]) == (bench, config)]
        series = defaultdict(dict)
        for r in mine:
            series[r["provider"]][r["mode"]] = _value(r)
        grouped_bars(ax, ordered((r["mode"] for r in mine), MODE_ORDER), dict(sorted(series.items())))
        ax.set_title(f"{bench.split('/', 1)[1]}  {config}", fontsize=8)
        ax.set_ylabel("ms (median, p20-p80)")
        ax.legend(fontsize=6)
    fig.suptitle(f"kernels on {device}")
    return _save(plt, fig, out)


def plot_step(plt, rows: list[dict], device: str, out: Path) -> Path | None:
    rows = [r for r in rows if r["benchmark"].startswith("step/") and r["metric"] in ("time_ratio", "flop_floor_ratio")]
    panels = ordered((r["benchmark"], r["config"]) for r in rows)
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels))
    names = {"time_ratio": "measured time", "flop_floor_ratio": "FLOP floor"}
    for ax, (bench, config) in zip(axes, panels):
        mine = [r for r in rows if (r["benchmark"], r["config"]) == (bench, config)]
        series = {names[m]: {r["mode"]: _value(r) for r in mine if r["metric"] == m} for m in names}
        grouped_bars(ax, ordered((r["mode"] for r in mine), STEP_ORDER), series)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{bench}  {config}", fontsize=8)
        ax.set_ylabel("x normal replica")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"neighbour step cost on {device} (ratios to a normal replica)")
    return _save(plt, fig, out)


def plot_cluster(plt, rows: list[dict], quoted: list[dict], device: str, out: Path) -> Path | None:
    drops = [r for r in rows if r["benchmark"] == "cluster/throughput" and r["metric"] == "throughput_drop"]
    checks = [r for r in rows if r["benchmark"] == "cluster/trainer-check"
              and r["metric"] in ("tokens_per_s", "predicted_tokens_per_s")]
    configs = ordered(r["config"] for r in drops)
    panels = len(configs) + bool(quoted) + bool(checks)
    if not configs and not checks:
        return None
    fig, axes = _grid(plt, panels, width=6.0)
    axes = iter(axes)
    for config in configs:
        ax = next(axes)
        mine = [r for r in drops if r["config"] == config]
        series = defaultdict(dict)
        for r in mine:
            series[r["provider"]][r["mode"]] = _value(r)
        grouped_bars(ax, ordered((r["mode"] for r in mine), SCENARIO_ORDER), dict(series))
        ax.set_title(config.split(",n=")[0] + f"  n={config.split(',n=')[1].split(',')[0]}", fontsize=8)
        ax.set_ylabel("throughput drop, % (simulated)")
        ax.legend(fontsize=7)
    if quoted:
        ax = next(axes)
        series = defaultdict(dict)
        for r in quoted:
            series[r["provider"]][r["config"].split(":", 1)[1].split(",")[0]] = _value(r)
        sizes = ordered((g for s in series.values() for g in s), ("LLaMA-350M", "LLaMA-1B", "LLaMA-7B"))
        grouped_bars(ax, sizes, dict(series), hatch={name: "//" for name in series})
        ax.set_title("quoted from the paper: high scenario, 32 A100", fontsize=8)
        ax.set_ylabel("throughput drop, %")
        ax.legend(fontsize=7)
    if checks:
        ax = next(axes)
        series = defaultdict(dict)
        for r in checks:
            series["measured (trainer)" if r["metric"] == "tokens_per_s" else "simulated"][r["provider"]] = _value(r)
        grouped_bars(ax, ordered(r["provider"] for r in checks), dict(series))
        ax.set_title("simulator vs the real trainer, schedule:high\n" + checks[0]["config"], fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"cluster throughput under failures, step costs from {device}")
    return _save(plt, fig, out)


def _save(plt, fig, out: Path) -> Path:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory for the PNGs")
    parser.add_argument("--device", default=None, help="only devices whose name contains this")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with args.csv.open(newline="") as f:
        rows = newest_rows(list(csv.DictReader(f)))
    quoted = [r for r in rows if r["device"].startswith(QUOTED_DEVICE_PREFIX)]
    devices = ordered(r["device"] for r in rows if not r["device"].startswith(QUOTED_DEVICE_PREFIX)
                      and (args.device is None or args.device.lower() in r["device"].lower()))
    written = []
    for device in devices:
        mine = [r for r in rows if r["device"] == device]
        slug = device_slug(device)
        written += [plot_kernels(plt, mine, device, args.out / f"kernels_{slug}.png"),
                    plot_step(plt, mine, device, args.out / f"step_{slug}.png"),
                    plot_cluster(plt, mine, quoted, device, args.out / f"cluster_{slug}.png")]
    for path in filter(None, written):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
