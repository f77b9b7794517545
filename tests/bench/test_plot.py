"""bench/plot.py: PNG charts from a small results CSV written through bench/records.py."""

import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import plot  # noqa: E402
from records import Recorder  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GPU = "NVIDIA H100 80GB HBM3"


def write_rows(path: Path) -> None:
    recorder = Recorder(torch.device("cpu"), path=path)
    for provider, ms in (("eager", 2.0), ("mecefo-cpu", 1.5)):
        for mode in ("fwd", "bwd", "full"):
            recorder.add(benchmark="kernels/rmsnorm", provider=provider, mode=mode, config="tiny:T=64,d=128",
                         metric="time", unit="ms", median=ms, p20=0.9 * ms, p80=1.1 * ms)
    recorder.add(benchmark="kernels/ceiling", provider="torch.mm", mode="-", config="float32", metric="tflops",
                 unit="TFLOP/s", median=0.1)
    for mode, ratio, floor in (("normal", 1.0, 1.0), ("mecefo-both", 1.45, 1.4), ("exact-both", 2.0, 2.0)):
        for metric, value in (("time_ratio", ratio), ("flop_floor_ratio", floor)):
            recorder.add(benchmark="step/step", provider="mecefo", mode=mode, config="tiny:L=4,B=1,S=256,r=4/4/11",
                         metric=metric, unit="x normal", median=value)
    config = "tiny:L=4,B=1,S=256,r=4/4/11,n=32,hours=1000,seeds=5"
    for policy, drop in (("mecefo", 1.0), ("ndb-exact", 3.0), ("shrink", 2.0), ("restart", 9.0)):
        for scenario, scale in (("low", 0.3), ("mid", 0.6), ("high", 1.0)):
            recorder.add(benchmark="cluster/throughput", provider=policy, mode=scenario, config=config,
                         metric="throughput_drop", unit="%", median=drop * scale, p20=drop * scale * 0.9,
                         p80=drop * scale * 1.1)
    recorder.add(benchmark="cluster/throughput", provider="bamboo (quoted)", mode="high",
                 config="paper:LLaMA-1B,n=32 A100", metric="throughput_drop", unit="%", median=8.21,
                 device="paper: 32x A100 (quoted)")
    for metric, value in (("tokens_per_s", 1000.0), ("predicted_tokens_per_s", 1040.0)):
        recorder.add(benchmark="cluster/trainer-check", provider="mecefo", mode="high",
                     config="tiny:replicas=2,steps=120", metric=metric, unit="tokens/s", median=value)
    recorder.save()
    gpu = Recorder(torch.device("cpu"), path=path)
    gpu.env = {**gpu.env, "device": GPU}
    gpu.add(benchmark="kernels/rmsnorm", provider="eager", mode="fwd", config="llama-1b:T=8192,d=2048",
            metric="time", unit="ms", median=0.1)
    gpu.save()


def test_charts_per_device(tmp_path):
    path = tmp_path / "results.csv"
    write_rows(path)
    out = tmp_path / "charts"
    assert plot.main(["--csv", str(path), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["cluster_cpu.png", "kernels_cpu.png", "kernels_nvidia-h100-80gb-hbm3.png", "step_cpu.png"]
    for png in out.iterdir():
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_device_filter(tmp_path):
    path = tmp_path / "results.csv"
    write_rows(path)
    out = tmp_path / "charts"
    plot.main(["--csv", str(path), "--out", str(out), "--device", "h100"])
    assert [p.name for p in out.iterdir()] == ["kernels_nvidia-h100-80gb-hbm3.png"]


def test_newest_row_wins(tmp_path):
    """A re-run replaces its bars: of two rows with the same key, the later timestamp is plotted."""
    path = tmp_path / "results.csv"
    recorder = Recorder(torch.device("cpu"), path=path)
    for ms, stamp in ((2.0, "2026-01-02T00:00:00+00:00"), (1.0, "2026-01-01T00:00:00+00:00")):
        row = recorder.add(benchmark="kernels/rmsnorm", provider="eager", mode="fwd", config="c", metric="time",
                           unit="ms", median=ms)
        row["timestamp"] = stamp
    recorder.save()
    with path.open(newline="") as f:
        rows = plot.newest_rows(list(csv.DictReader(f)))
    assert [r["median"] for r in rows] == ["2"]
