"""Timing and peak-memory measurement for the benchmarks.

GPU: triton.testing.do_bench (CUDA events, L2 flushed between runs), quantiles 0.5/0.2/0.8.
CPU: the same statistics over wall-clock repetitions (perf_counter), after warm-up. CPU
times are only meaningful as ratios between providers measured in the same run.

Ratios of times (:class:`Ratio`) come from interleaved rounds (:func:`interleaved_rounds`): every
round times each candidate once, one after the other, and the ratio is taken within the round,
so a load that comes and goes (another job on a shared machine) hits both sides of it alike.
The result is the median of the per-round ratios with their p20-p80. A ratio whose per-round
values spread more than ``MAX_RATIO_SPREAD`` of its median, or that rests on fewer than
``MIN_RATIO_ROUNDS`` rounds, is not supported by its measurement: benchmarks rerun it, then
flag it instead of printing it as a result. (A ratio of two medians taken at different
moments has no such check: next to another job, one once came out as 0.15x for work that is
twice the baseline's.)
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


MAX_RATIO_SPREAD = 0.25  # (p80 - p20) / median of a ratio's per-round values, at most
MIN_RATIO_ROUNDS = 3  # fewer rounds cannot show a spread


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: how far apart the repetitions are."""
        return (self.p80_ms - self.p20_ms) / self.median_ms

    def supports_ratio(self, max_spread: float = MAX_RATIO_SPREAD) -> bool:
        """Whether this timing is steady enough to be divided by another one."""
        return self.spread <= max_spread


@dataclass(frozen=True)
class Ratio:
    """time / a baseline's time, from interleaved rounds: median of the per-round ratios, p20, p80."""

    median: float
    p20: float
    p80: float
    rounds: int

    @property
    def spread(self) -> float:
        return (self.p80 - self.p20) / self.median

    def supported(self, max_spread: float = MAX_RATIO_SPREAD) -> bool:
        """Whether the measurement supports the ratio (enough rounds, per-round values close together)."""
        return self.rounds >= MIN_RATIO_ROUNDS and self.spread <= max_spread

    def describe(self) -> str:
        return (f"{self.median:.3f} (per-round p20-p80 {self.p20:.3f}-{self.p80:.3f}, spread {self.spread:.0%}, "
                f"{self.rounds} rounds)")


def paired_ratio(times_ms: list[float], baseline_ms: list[float]) -> Ratio:
    """The ratio of two series timed in the same rounds (``times_ms[i]`` and ``baseline_ms[i]`` in round i)."""
    if len(times_ms) != len(baseline_ms) or not times_ms:
        raise ValueError(f"paired rounds needed, got {len(times_ms)} and {len(baseline_ms)} values")
    ratios = sorted(t / b for t, b in zip(times_ms, baseline_ms))
    return Ratio(statistics.median(ratios), _quantile(ratios, 0.2), _quantile(ratios, 0.8), len(ratios))


def summary_timing(times_ms: list[float]) -> Timing:
    """Median and p20 / p80 of per-round times."""
    values = sorted(times_ms)
    return Timing(statistics.median(values), _quantile(values, 0.2), _quantile(values, 0.8))


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            min_reps: int = 5, grad_to_none=None) -> Timing:
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    times: list[float] = []
    start = time.perf_counter()
    fn()  # warm-up (first call pays allocation and dispatch caches)
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    budget_start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - budget_start) * 1e3 < rep_ms:
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8))


def retained_memory_bytes(forward: Callable[[], object], device: torch.device) -> int | None:
    """CUDA memory still allocated when `forward()` returns, its output alive: the output plus
    everything kept for backward, whoever keeps it (checkpoint included). None on CPU."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    out = forward()
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - base
    del out
    return held


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory allocated above the starting point during one call (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@dataclass(frozen=True)
class Ceilings:
    """What this device reaches in the same run: a large matrix product and a large copy."""

    tflops: float  # dense matmul, in the benchmark's dtype
    gbps: float  # device-to-device copy, bytes read + bytes written
    spread: float = 0.0  # the larger of the two timings' spreads (Timing.spread)

    def supports_ratio(self, max_spread: float = MAX_RATIO_SPREAD) -> bool:
        """Whether the ceilings were measured steadily enough to divide a rate by them."""
        return self.spread <= max_spread


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Measured ceilings to report achieved TFLOP/s and GB/s against (random data, never zeros: zeros
    run faster on some GPUs). GPU: an 8192^3 product and a 1 GiB copy; CPU: 1024^3 and 64 MiB."""
    n, copy_bytes = (8192, 2**30) if device.type == "cuda" else (1024, 2**26)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    mm = time_fn(lambda: torch.mm(a, b), device, rep_ms=200)
    del a, b
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, rep_ms=200)
    return Ceilings(tflops=2 * n**3 / (mm.median_ms * 1e-3) / 1e12, gbps=2 * copy_bytes / (copy.median_ms * 1e-3) / 1e9,
                    spread=max(mm.spread, copy.spread))


def interleaved_rounds(fns: dict[str, Callable[[], object]], device: torch.device, *, rep_ms: float, rounds: int,
                       grad_to_none=None, skip: Callable[[str, BaseException], bool] | None = None
                       ) -> dict[str, list[float]]:
    """``rounds`` rounds; each times every function once (``time_fn`` median over ``rep_ms / rounds``), in
    order. name -> its per-round medians, round i at index i. ``skip(name, error)``: True to drop a
    function that raised (out of memory) from the remaining rounds, its list cut short; else it raises."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    dropped: set[str] = set()
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in dropped:
                continue
            for t in grad_to_none or ():
                t.grad = None
            try:
                out[name].append(time_fn(fn, device, rep_ms=rep_ms / rounds, grad_to_none=grad_to_none).median_ms)
            except Exception as e:
                if skip is None or not skip(name, e):
                    raise
                dropped.add(name)
    return out
