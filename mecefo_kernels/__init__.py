"""mecefo_kernels: kernels, layers and a trainer for MeCeFO fault-tolerant LLM training.

Public API (all functions take ``backend="auto"|"triton"|"cuda"|"cpu"|"torch"``; see
:mod:`mecefo_kernels.backend` and ``python -m mecefo_kernels.info``):

* :func:`rms_norm`
* :func:`swiglu_ffn`: the LLaMA FFN with recompute and low-rank weight-gradient options
* :func:`lowrank_basis`, :func:`lowrank_linear`: MeCeFO's low-rank weight gradient
* :func:`residual_skip`: attention-skip backward (branch forward-only, gradient through the residual)

Layers and the Hugging Face patch (:mod:`mecefo_kernels.nn`, :mod:`mecefo_kernels.hf`):

* :func:`apply_mecefo`: make a LLaMA-family model neighbour-capable, in place
* :func:`neighbor_mode`: context manager running forwards in MeCeFO's neighbour mode
* :func:`refresh_bases`: recompute the low-rank bases (every ``refresh_every`` steps with ``step=``;
  from the optimizer's first moments with ``basis="momentum"`` and ``optimizer=``)
* :func:`bases_state_dict`, :func:`load_bases_state_dict`: the bases, to send to a healing replica or save
* :func:`neighbor_skipped_parameters`: the parameters that get no gradient in neighbour mode
"""

from .backend import BackendUnavailableError
from .hf import apply_mecefo
from .nn.neighbor import (bases_state_dict, load_bases_state_dict, neighbor_mode, neighbor_skipped_parameters,
                        refresh_bases)
from .ops.lowrank import lowrank_basis, lowrank_linear
from .ops.residual_skip import residual_skip
from .ops.rmsnorm import rms_norm
from .ops.swiglu_ffn import swiglu_ffn

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "apply_mecefo",
    "bases_state_dict",
    "load_bases_state_dict",
    "lowrank_basis",
    "lowrank_linear",
    "neighbor_mode",
    "neighbor_skipped_parameters",
    "refresh_bases",
    "residual_skip",
    "rms_norm",
    "swiglu_ffn",
    "__version__",
]
