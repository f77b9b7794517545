"""Argument checks for the public functions.

Each check raises with a message that names the argument and what was received, so a bad
call fails at the API boundary instead of as a wrong answer or a stride error in a kernel.
Shape and device problems raise ValueError; wrong types and dtypes raise TypeError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got dtype {value.dtype}")
    return value


def check_ndim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_min_ndim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() < ndim:
        raise ValueError(f"{name} must have at least {ndim} dimension(s), got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        suffix = f" ({why})" if why else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{suffix}, got {tuple(t.shape)}")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; "
                        "they must match (cast explicitly, e.g. under autocast pass the autocast dtype)")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_like(name: str, t, ref_name: str, ref: torch.Tensor, shape: Sequence[int] | None = None,
               why: str = "") -> torch.Tensor:
    """A floating tensor with ref's dtype and device (and, if given, exactly `shape`)."""
    check_tensor(name, t)
    if shape is not None:
        check_shape(name, t, shape, why)
    check_same_device(name, t, ref_name, ref)
    check_same_dtype(name, t, ref_name, ref)
    return t


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [T, d] with a contiguous last dimension (a view whenever possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
