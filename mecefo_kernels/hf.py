"""One-call MeCeFO patch for Hugging Face LLaMA-family models.

    model = LlamaForCausalLM(config)                 # or from_pretrained(...)
    mecefo_kernels.apply_mecefo(model)               # in place; returns model
    with mecefo_kernels.neighbor_mode(model):        # only on a neighbour rank, only while a failure lasts
        loss = model(input_ids=x, labels=y).loss
    loss.backward()

transformers itself is not imported here: the patch works on any model whose decoder layers
have ``self_attn``, ``mlp`` (gate_proj/up_proj/down_proj), ``input_layernorm`` and
``post_attention_layernorm`` (LLaMA, Mistral, Qwen2/3, ...), see :mod:`mecefo_kernels.nn.decoder`.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from .nn.decoder import (DEFAULT_BASIS_METHOD, DEFAULT_BASIS_SOURCE, DEFAULT_RANK, DEFAULT_REFRESH_EVERY,
                         check_decoder_layer, make_neighbor_capable)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every submodule (model included) with both ``self_attn`` and ``mlp``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "self_attn", None), nn.Module) and isinstance(getattr(m, "mlp", None), nn.Module)]


# The transformers releases this package allows: (major, minor) from, (major, minor) below. pyproject.toml's
# `hf` and `train` extras say the same (tests/packaging/test_dependency_versions.py); CI tests the pinned
# release (requirements/cpu.txt) and the newest allowed one (requirements/newest.txt). README: Install.
TRANSFORMERS_RANGE = ((5, 0), (5, 26))


def transformers_requirement() -> str:
    """The range as a pip specifier, e.g. "transformers>=5.0,<5.26"."""
    (lo_major, lo_minor), (hi_major, hi_minor) = TRANSFORMERS_RANGE
    return f"transformers>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def _check_transformers_version(layers: list[nn.Module]) -> None:
    """Decoder layers of transformers < 5 return tuples; the neighbour path returns a tensor as 5.x does: refused.
    A release outside TRANSFORMERS_RANGE (one pip would not install with this package) is used with a warning."""
    if not any(type(layer).__module__.startswith("transformers.") for layer in layers):
        return
    found = transformers_version()
    release = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", found).groups())
    if release[0] < 5:
        raise RuntimeError(f"apply_mecefo needs transformers >= 5 (decoder layers return tensors), "
                           f"found {found}: pip install 'mecefo_kernels[hf]'")
    low, high = TRANSFORMERS_RANGE
    if not low <= release < high:
        warnings.warn(f"transformers {found} is outside the range this mecefo_kernels allows "
                      f"({transformers_requirement()}, whose newest release is tested): its LLaMA layers may have "
                      f"changed, so the HF patch may fail or compute something else; "
                      f"pip install '{transformers_requirement()}'", UserWarning, stacklevel=3)


def apply_mecefo(model: nn.Module, *, rank: int | float = DEFAULT_RANK, refresh_every: int = DEFAULT_REFRESH_EVERY,
                 basis_method: str = DEFAULT_BASIS_METHOD, basis: str = DEFAULT_BASIS_SOURCE,
                 backend: str | None = None) -> nn.Module:
    """Make every decoder layer of model neighbour-capable, in place, and compute the first bases.

    Parameters are shared, not copied: ``state_dict()`` keys and values are unchanged (the
    bases are non-persistent buffers, so they follow ``model.to(...)`` but are not saved).
    Outside :func:`mecefo_kernels.neighbor_mode` the model computes exactly what it did before.
    Calling it again reconfigures the layers (new rank, period, ...) and recomputes the bases.

    Args:
        model: e.g. a transformers ``LlamaForCausalLM`` (or ``LlamaModel``, or any module whose
            decoder layers have self_attn, mlp with bias-free gate/up/down projections and SiLU,
            input_layernorm and an RMSNorm post_attention_layernorm). Layers that do not match
            raise ValueError before anything is changed.
        rank: rank of the low-rank FFN weight gradients: an int (the same for all three
            weights, at most each one's in_features) or a float in (0, 1], the fraction of each
            weight's in_features (d for gate/up, the intermediate size for down).
            Default 1/32 (see README: cost-driven, a fidelity sweep may revise it).
        refresh_every: tau, the period in steps of :func:`mecefo_kernels.refresh_bases` with
            ``step=``. Default 200.
        basis_method: "randomized" (default; randomized SVD, O(out * in * (rank + 8)) per pass
            instead of a full SVD's O(out * in * min(out, in))) or "svd" (exact top singular vectors).
        basis: what V is the top-r right singular vectors of: "weight" (default; W itself, the
            paper) or "momentum" (each FFN weight's optimizer first moment, a gradient-aware
            subspace: pass ``optimizer=`` to :func:`mecefo_kernels.refresh_bases`; W is used where
            there is no moment yet, e.g. for the bases computed here).
        backend: kernel backend for the neighbour FFN op (None: $MECEFO_BACKEND or auto).

    Returns:
        model (patched in place).
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers (submodules with self_attn and mlp) "
                         "to patch; apply_mecefo expects a LLaMA-family model")
    for name, layer in layers:
        check_decoder_layer(layer, name or type(layer).__name__)
    _check_transformers_version([layer for _, layer in layers])
    for _, layer in layers:
        make_neighbor_capable(layer, rank=rank, refresh_every=refresh_every, basis_method=basis_method,
                              basis=basis, backend=backend)
    return model
