"""One long-format CSV for every benchmark run: bench/results/results.csv.

Each row is one measurement with enough context to compare across machines and commits:
benchmark, provider, mode, config, metric, unit, median, p20, p80, device, torch, triton,
cuda, commit, timestamp.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CSV = RESULTS_DIR / "results.csv"
COLUMNS = ("benchmark", "provider", "mode", "config", "metric", "unit", "median", "p20", "p80", "device",
           "torch", "triton", "cuda", "commit", "timestamp")


@functools.cache
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=RESULTS_DIR.parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "", "commit": _commit()}


class Recorder:
    """Collects rows in memory, prints them, and appends them to the CSV on `save()`."""

    def __init__(self, device: torch.device, path: Path = DEFAULT_CSV):
        self.path = path
        self.env = environment(device)
        self.rows: list[dict] = []

    def add(self, *, benchmark: str, provider: str, mode: str, config: str, metric: str, unit: str,
            median: float, p20: float | None = None, p80: float | None = None, device: str | None = None) -> dict:
        """One row; `device` names the machine the numbers describe when it is not this one (a
        simulation from another device's rows, figures quoted from a paper)."""
        row = {"benchmark": benchmark, "provider": provider, "mode": mode, "config": config, "metric": metric,
               "unit": unit, "median": f"{median:.6g}", "p20": "" if p20 is None else f"{p20:.6g}",
               "p80": "" if p80 is None else f"{p80:.6g}", **self.env, **({"device": device} if device else {}),
               "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.rows.append(row)
        return row

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(self.rows)
        return self.path
