"""Launch-shape decisions shared by the Triton launchers."""

from __future__ import annotations

import functools

import torch
import triton

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Number of programs for a grid-stride kernel: a few per SM on a GPU, few on the
    interpreter (each interpreted program costs milliseconds, so fewer is faster)."""
    if device.type == "cuda":
        cap = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm
    else:
        cap = 4
    return max(1, min(work_items, cap))


def block_for(n: int, limit: int = 65536) -> int:
    """Smallest power of two >= n (a whole row per program), with a clear error past `limit`."""
    block = triton.next_power_of_2(max(n, 1))
    if block > limit:
        raise ValueError(f"row length {n} exceeds the Triton kernels' single-block limit {limit}")
    return block


def check_dtype(op: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: the triton backend supports float16, bfloat16 and float32, got {t.dtype} "
                        "(use backend='torch' or 'cpu'/'cuda' for float64)")
