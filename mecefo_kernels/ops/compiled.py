"""Fake (meta) registration for the compiled ``torch.ops.mecefo.*`` ops.

The C++/CUDA library defines the schemas; shapes for tracing are given here in Python
(as flash-attention does), once the library has loaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..backend import compiled_op_available


def register_fake(qualname: str) -> Callable:
    """Decorator: register a fake impl for ``mecefo::<name>`` if the loaded library defines it,
    else a no-op (no library, or a stale one: the backend then reports why)."""

    def wrap(fn: Callable) -> Callable:
        if compiled_op_available(qualname):
            torch.library.register_fake(qualname)(fn)
        return fn

    return wrap
