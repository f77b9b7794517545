"""Triton kernels, one file per op family. Importing this package defines the kernels and
registers them as ``torch.ops.mecefo_triton.*`` custom ops (with fake implementations).

Set ``TRITON_INTERPRET=1`` before this import to run them on CPU tensors (the tests do).
"""

from . import lowrank, rmsnorm, swiglu  # noqa: F401
