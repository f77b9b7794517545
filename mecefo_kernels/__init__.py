"""mecefo_kernels: kernels, layers and a trainer for MeCeFO fault-tolerant LLM training.

Public API (all functions take ``backend="auto"|"triton"|"cuda"|"cpu"|"torch"``; see
:mod:`mecefo_kernels.backend` and ``python -m mecefo_kernels.info``):

* :func:`rms_norm`
* :func:`swiglu_ffn`: the LLaMA FFN with recompute and low-rank weight-gradient options
* :func:`lowrank_basis`, :func:`lowrank_linear`: MeCeFO's low-rank weight gradient
"""

from .backend import BackendUnavailableError
from .ops.lowrank import lowrank_basis, lowrank_linear
from .ops.rmsnorm import rms_norm
from .ops.swiglu_ffn import swiglu_ffn

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "lowrank_basis",
    "lowrank_linear",
    "rms_norm",
    "swiglu_ffn",
    "__version__",
]
