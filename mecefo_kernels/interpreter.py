"""Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``), on CPU tensors.

A module of its own because two layers need it and must not import each other this way:
backend.py reports the triton backend live for CPU tensors in this mode (and imports the Triton
package to check that it loads), and mecefo_kernels/triton/ sizes its launches for the
interpreter. Both import this; the Triton package never imports backend.py.
"""

from __future__ import annotations

import os


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1. Triton reads it when a kernel is defined, so it must be set
    before mecefo_kernels.triton is imported (the test suite's conftest does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
