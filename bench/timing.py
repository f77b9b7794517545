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


@dataclass(frozen=True)
class Ceilings:
    """What this device reaches in the same run: a large matrix product and a large copy."""

    tflops: float  # dense matmul, in the benchmark's dtype
    gbps: float  # device-to-device copy, bytes read + bytes written


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
    return Ceilings(tflops=2 * n**3 / (mm.median_ms * 1e-3) / 1e12, gbps=2 * copy_bytes / (copy.median_ms * 1e-3) / 1e9)
