"""mecefo_kernels: kernels, layers and a trainer for MeCeFO fault-tolerant LLM training.

Public API (all functions take ``backend="auto"|"triton"|"cuda"|"cpu"|"torch"``; see
:mod:`mecefo_kernels.backend` and ``python -m mecefo_kernels.info``):

* :func:`rms_norm`
"""

from .backend import BackendUnavailableError
from .ops.rmsnorm import rms_norm

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "rms_norm", "__version__"]
