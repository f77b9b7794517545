"""bench/kernel_bench.py end to end on CPU at the tiny preset: the rows it writes (to a temporary CSV), the
ceilings, and the derived TFLOP/s and GB/s against the FLOP and byte counts. Speed itself is the
benchmark's business, not a test's: nothing here depends on how fast anything ran.

One short run, backward mode only (the rows of every mode come from the same code path), of the ops
that derive rates or skip work: swiglu_ffn (TFLOP/s of exact and neighbour FFNs), swiglu (GB/s),
lowrank_linear (TFLOP/s) and residual_skip (no attention backward)."""

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

import mecefo.flops as flops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import kernel_bench  # noqa: E402

TOKENS, D, H = 64, 128, 352  # the tiny preset's hidden and FFN widths
RANK = D // 8
OPS = ("swiglu_ffn", "swiglu", "lowrank_linear", "residual_skip")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One short run of every op. torch.compile is replaced by the identity: compiling the compiled-eager
    providers costs tens of seconds on CPU and is torch's code, not ours. Fractions of the ceilings are
    taken whatever the timings' spread (--max-spread inf): this checks the arithmetic, not a speed."""
    path = tmp_path_factory.mktemp("kernels") / "results.csv"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", lambda fn, **kwargs: fn)
        assert kernel_bench.main(["--presets", "tiny", "--tokens", str(TOKENS), "--rep-ms", "1", "--modes", "bwd",
                             "--ops", *OPS, "--max-spread", "inf", "--csv", str(path)]) == 0
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def pick(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, len(found))
    return found[0]


def num(row, column="median"):
    return float(row[column])


def test_every_op_and_provider_has_time_rows(rows):
    benchmarks = {r["benchmark"] for r in rows}
    assert benchmarks == {f"kernels/{op}" for op in OPS} | {"kernels/ceiling"}
    for r in rows:
        assert r["device"].startswith("cpu") and r["torch"] == torch.__version__ and r["commit"]
    times = [r for r in rows if r["metric"] == "time"]
    assert all(num(r, "p20") <= num(r) <= num(r, "p80") and num(r) > 0 for r in times)
    ffn_providers = {r["provider"] for r in times if r["benchmark"] == "kernels/swiglu_ffn"}
    assert {f"mecefo-torch-neighbour-r{RANK}", "mecefo-torch-exact", "eager", "eager-checkpoint",
            "compiled-eager"} <= ffn_providers


def test_ceilings(rows):
    tflops = num(pick(rows, benchmark="kernels/ceiling", metric="tflops"))
    gbps = num(pick(rows, benchmark="kernels/ceiling", metric="bandwidth"))
    assert math.isfinite(tflops) and tflops > 0 and math.isfinite(gbps) and gbps > 0


@pytest.mark.parametrize("provider, amount", [
    ("eager", 2 * flops.linear_flops(TOKENS, H, D)),
    (f"mecefo-torch-r{RANK}", flops.linear_flops(TOKENS, H, D) + flops.lowrank_weight_grad_flops(TOKENS, H, D, RANK)),
])
def test_tflops_of_lowrank_linear(rows, provider, amount):
    """TFLOP/s = the provider's matmul FLOPs / its median time; p20/p80 of the rate at p80/p20 of the time."""
    key = dict(benchmark="kernels/lowrank_linear", provider=provider, mode="bwd")
    time = pick(rows, metric="time", **key)
    rate = pick(rows, metric="tflops", **key)
    for rate_column, time_column in (("median", "median"), ("p20", "p80"), ("p80", "p20")):
        assert num(rate, rate_column) == pytest.approx(amount / (num(time, time_column) * 1e-3) / 1e12, rel=1e-5)
    ceiling = num(pick(rows, benchmark="kernels/ceiling", metric="tflops"))
    assert num(pick(rows, metric="tflops_of_ceiling", **key)) == pytest.approx(num(rate) / ceiling, rel=1e-4)


def test_neighbour_ffn_counts_fewer_backward_flops(rows):
    """The neighbour FFN's backward (recompute + low-rank) is credited with its own FLOPs, not the exact ones."""
    def flops_done(provider):
        key = dict(benchmark="kernels/swiglu_ffn", provider=provider, mode="bwd")
        return num(pick(rows, metric="tflops", **key)) * num(pick(rows, metric="time", **key))

    neighbour = flops.ffn_backward_flops(TOKENS, D, H, (RANK,) * 3)
    exact = flops.ffn_backward_flops(TOKENS, D, H)
    assert flops_done(f"mecefo-torch-neighbour-r{RANK}") / flops_done("mecefo-torch-exact") == pytest.approx(
        neighbour / exact, rel=1e-4)


def test_bandwidth_of_swiglu(rows):
    key = dict(benchmark="kernels/swiglu", provider="eager", mode="bwd")
    moved = 6 * TOKENS * H * 4  # float32 dp, a, u read; da, du, p written
    gbps = num(pick(rows, metric="bandwidth", **key))
    assert gbps == pytest.approx(moved / (num(pick(rows, metric="time", **key)) * 1e-3) / 1e9, rel=1e-5)
    ceiling = num(pick(rows, benchmark="kernels/ceiling", metric="bandwidth"))
    assert num(pick(rows, metric="bandwidth_of_ceiling", **key)) == pytest.approx(gbps / ceiling, rel=1e-4)


def test_residual_skip_saves_nothing_and_runs_no_attention_backward(rows):
    key = dict(benchmark="kernels/residual_skip", provider="mecefo-residual_skip")
    assert num(pick(rows, metric="saved_activations", **key)) == 0
    assert not [r for r in rows if r["metric"] == "tflops" and r["mode"] == "bwd"
                and r["provider"] == "mecefo-residual_skip"]
    assert num(pick(rows, benchmark="kernels/residual_skip", provider="eager", metric="saved_activations")) > 0



def test_a_fraction_of_the_ceiling_needs_steady_timings(tmp_path, capsys):
    """An op whose calls take 1 ms or 6 ms in turn: its rate is recorded, its fraction of the ceiling
    (timed at another moment) is not, and the printout says why."""
    import time

    from records import Recorder
    from timing import Ceilings

    calls = []

    def unsteady():
        calls.append(None)
        time.sleep(0.001 if len(calls) % 2 else 0.006)

    case = kernel_bench.Case("swiglu", "fake", "T=1", lambda mode: unsteady, bytes_moved=lambda mode: 1e6, modes=("fwd",))
    recorder = Recorder(torch.device("cpu"), path=tmp_path / "results.csv")
    kernel_bench.run_case(case, "tiny:T=1", ["fwd"], torch.device("cpu"), recorder, 40, Ceilings(1.0, 10.0, spread=0.01))
    metrics = {r["metric"] for r in recorder.rows}
    assert "bandwidth" in metrics and "bandwidth_of_ceiling" not in metrics
    assert "? spread" in capsys.readouterr().out
