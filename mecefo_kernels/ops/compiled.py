"""Fake (meta) registration for the compiled ``torch.ops.mecefo.*`` ops.

The C++/CUDA library defines the schemas; shapes for tracing are given here in Python
(as flash-attention does), once the library has loaded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..backend import _load_extension


def loaded() -> bool:
    return _load_extension()[0] is not None


def register_fake(qualname: str) -> Callable:
    """Decorator: register a fake impl for ``mecefo::<name>`` if the library loaded, else a no-op."""

    def wrap(fn: Callable) -> Callable:
        if loaded():
            torch.library.register_fake(qualname)(fn)
        return fn

    return wrap
