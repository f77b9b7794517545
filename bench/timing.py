"""Timing and peak-memory measurement for the benchmarks.

GPU: triton.testing.do_bench (CUDA events, L2 flushed between runs), quantiles 0.5/0.2/0.8.
CPU: the same statistics over wall-clock repetitions (perf_counter), after warm-up. CPU
times are only meaningful as ratios between providers measured in the same run.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


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
