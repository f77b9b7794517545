"""Drop-in modules built on the mecefo_kernels ops.

* :class:`RMSNorm`: same parameters and state_dict as transformers' LlamaRMSNorm.
* :class:`NeighborDecoderMixin`, :func:`neighbor_decoder_class`, :func:`make_neighbor_capable`:
  neighbour-capable pre-norm decoder layers (what :func:`mecefo_kernels.apply_mecefo` uses).
* ``NeighborLlamaDecoderLayer``: transformers' LlamaDecoderLayer with neighbour mode,
  ``NeighborLlamaDecoderLayer(config, layer_idx, rank=..., refresh_every=...)`` (needs transformers).
* :class:`NeighborCapable` and the whole-model helpers :func:`neighbor_mode`,
  :func:`refresh_bases`, :func:`neighbor_skipped_parameters`, :func:`bases_state_dict`,
  :func:`load_bases_state_dict`.
"""

from .decoder import NeighborDecoderMixin, make_neighbor_capable, neighbor_decoder_class
from .neighbor import (NeighborCapable, bases_state_dict, load_bases_state_dict, neighbor_mode,
                       neighbor_skipped_parameters, refresh_bases)
from .rmsnorm import RMSNorm

__all__ = ["NeighborCapable", "NeighborDecoderMixin", "NeighborLlamaDecoderLayer", "RMSNorm", "bases_state_dict",
           "load_bases_state_dict", "make_neighbor_capable", "neighbor_decoder_class", "neighbor_mode",
           "neighbor_skipped_parameters", "refresh_bases"]


def __getattr__(name: str):
    # transformers is optional: build the class on first use only.
    if name == "NeighborLlamaDecoderLayer":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return neighbor_decoder_class(LlamaDecoderLayer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
