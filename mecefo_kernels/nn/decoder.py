"""Neighbour-capable pre-norm decoder layers (LLaMA and family).

A decoder layer of the form

    h = x + self_attn(input_layernorm(x))
    y = h + mlp(post_attention_layernorm(h)),   mlp(z) = down_proj(silu(gate_proj(z)) * up_proj(z))

becomes neighbour-capable by putting :class:`NeighborDecoderMixin` in front of its class
(:func:`neighbor_decoder_class`). The layer keeps its submodules, parameters and state_dict
keys; it gains three non-persistent buffers (the low-rank bases) and a mode flag.

* Normal mode: the layer's own ``forward``, untouched, so results are bit-identical to the
  unpatched layer (including gradient checkpointing and caches).
* Neighbour mode (MeCeFO techniques i-iii):
    h = residual_skip(x, self_attn o input_layernorm)       # attention forward-only, dL/dx = dL/dh
    y = h + swiglu_ffn(h, Wg, Wu, Wd, norm_weight=post_attention_layernorm.weight,
                       recompute=True, bases=(Vg, Vu, Vd))
  Saved for backward per layer: h and one float per token (the norm's rstd). Wq, Wk, Wv, Wo
  and input_layernorm get no gradient; the FFN weights get dW ~= dY^T (X V) V^T.

Swapping the class (as torch.nn.utils.parametrize does) rather than wrapping the layer keeps
``isinstance`` checks, hooks, output capturing and state_dict keys of the host library intact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lowrank import lowrank_basis
from ..ops.residual_skip import residual_skip
from ..ops.swiglu_ffn import swiglu_ffn
from .neighbor import NeighborCapable

# Defaults (MECEFO.md leaves r and tau open; README "Layers and the Hugging Face patch" says why).
DEFAULT_RANK = 1 / 32
DEFAULT_REFRESH_EVERY = 200
DEFAULT_BASIS_METHOD = "randomized"
BASIS_SOURCES = ("weight", "momentum")
DEFAULT_BASIS_SOURCE = "weight"

_BASIS_NAMES = ("mecefo_basis_gate", "mecefo_basis_up", "mecefo_basis_down")

# basis_fn(matrix [out, in], rank, *, method, dtype) -> V [in, rank], as lowrank_basis
BasisFunction = Callable[..., torch.Tensor]


def _any_nonzero(t: torch.Tensor) -> bool:
    """Whether ``t`` has a non-zero element, over the whole tensor also when it is sharded (a DTensor: the
    local answer would differ between ranks, and so would the bases they compute)."""
    count = torch.count_nonzero(t)
    if hasattr(count, "full_tensor"):  # a DTensor: the sum over the shards
        count = count.full_tensor()
    return bool(count.item() > 0)


def resolve_rank(rank: int | float, in_features: int, name: str = "rank") -> int:
    """An int rank as is (1 <= rank <= in_features), a float in (0, 1] as that fraction of in_features."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"{name} must be an int or a float fraction of in_features, got {type(rank).__name__}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"{name}={rank} as a fraction of in_features must be in (0, 1]")
        return max(1, round(rank * in_features))
    if not 1 <= rank <= in_features:
        raise ValueError(f"{name}={rank} is out of range for a weight with in_features={in_features}; "
                         "pass at most in_features, or a fraction such as 1/32")
    return rank


def _rms_norm_eps(norm: nn.Module, where: str) -> float:
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(norm, attr, None)
        if isinstance(eps, (int, float)):
            return float(eps)
    raise ValueError(f"{where} has no epsilon attribute (variance_epsilon or eps); expected an RMSNorm")


def _cpu_copy(module: nn.Module) -> nn.Module:
    """A CPU copy of a (meta-device) module's structure, its tensors uninitialised."""
    import copy

    return copy.deepcopy(module).to_empty(device="cpu")


@torch.no_grad()
def check_decoder_layer(layer: nn.Module, where: str = "layer") -> None:
    """Raise ValueError unless layer has the structure and math the neighbour path reproduces.

    Structure: self_attn, input_layernorm, post_attention_layernorm and an mlp with bias-free
    gate_proj/up_proj/down_proj linears. Math, probed on a few values (a few FLOPs, no RNG
    state consumed): mlp.act_fn is SiLU and post_attention_layernorm is x * rsqrt(mean(x^2) + eps)
    * weight (this rejects e.g. Gemma's (1 + weight) norm and GELU FFNs)."""
    for attr in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        if not isinstance(getattr(layer, attr, None), nn.Module):
            raise ValueError(f"{where} ({type(layer).__name__}) has no submodule {attr!r}; MeCeFO patches "
                             "pre-norm decoder layers with self_attn, mlp, input_layernorm, post_attention_layernorm")
    mlp = layer.mlp
    linears = {}
    for attr in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, attr, None)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{where}.mlp ({type(mlp).__name__}) has no nn.Linear {attr!r}; MeCeFO's FFN path "
                             "needs a SwiGLU MLP with gate_proj, up_proj, down_proj (mixture-of-experts is not supported)")
        if lin.bias is not None:
            raise ValueError(f"{where}.mlp.{attr} has a bias; MeCeFO's FFN path supports bias-free projections only")
        linears[attr] = lin.weight
    h, d = linears["gate_proj"].shape
    if linears["up_proj"].shape != (h, d) or linears["down_proj"].shape != (d, h):
        raise ValueError(f"{where}.mlp projections have inconsistent shapes: gate {tuple(linears['gate_proj'].shape)}, "
                         f"up {tuple(linears['up_proj'].shape)}, down {tuple(linears['down_proj'].shape)}")
    residual = getattr(layer, "residual_multiplier", 1.0)  # Granite: h = x + attn(.) * multiplier
    if not isinstance(residual, (int, float)) or residual != 1.0:
        raise ValueError(f"{where} ({type(layer).__name__}) scales its residual branches by residual_multiplier="
                         f"{residual}; MeCeFO's neighbour path computes h = x + attn(norm(x)), y = h + mlp(norm(h))")
    weight = linears["gate_proj"]
    act = getattr(mlp, "act_fn", None)
    norm = layer.post_attention_layernorm
    norm_weight = getattr(norm, "weight", None)
    if not isinstance(norm_weight, torch.Tensor) or norm_weight.shape != (d,):
        raise ValueError(f"{where}.post_attention_layernorm must have a weight of shape ({d},)")
    if weight.device.type == "meta":
        # a model on the meta device (checked before it is built): probe CPU copies of the activation and
        # the norm, the norm with a known weight
        act = _cpu_copy(act) if isinstance(act, nn.Module) else act
        norm = _cpu_copy(norm)
        norm.weight.copy_(torch.linspace(0.5, 1.5, d))
        norm_weight = norm.weight
    probe = torch.linspace(-4, 4, 9, device=norm_weight.device, dtype=torch.float32)
    if act is None or not torch.allclose(act(probe), F.silu(probe), rtol=1e-5, atol=1e-6):
        raise ValueError(f"{where}.mlp.act_fn ({type(act).__name__}) is not SiLU; MeCeFO's FFN path is SwiGLU")
    eps = _rms_norm_eps(norm, f"{where}.post_attention_layernorm")
    x = torch.linspace(-2, 3, 2 * d, device=norm_weight.device).view(2, d).to(norm_weight.dtype)
    got = norm(x).double()
    xd = x.double()
    want = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps) * norm_weight.double()
    # transformers' RMSNorms compute in float32 even for float64 models: allow float32 rounding at least
    # (the mistakes this catches are O(1))
    ulp = max(torch.finfo(norm_weight.dtype).eps, torch.finfo(torch.float32).eps)
    tol = 8 * ulp * (want.abs().max().item() + 1)
    if (got - want).abs().max().item() > tol:
        raise ValueError(f"{where}.post_attention_layernorm ({type(norm).__name__}) does not compute "
                         "x * rsqrt(mean(x^2) + eps) * weight; MeCeFO's FFN path fuses exactly that RMSNorm")


class NeighborDecoderMixin(NeighborCapable, nn.Module):
    """Put in front of a pre-norm decoder layer class to give it MeCeFO's neighbour mode.

    Use :func:`neighbor_decoder_class` (or :func:`mecefo_kernels.apply_mecefo` for a whole
    model) rather than this class directly. Constructing the mixed class builds the layer
    and its bases: ``NeighborLlamaDecoderLayer(config, layer_idx, rank=1/32)``.

    Forward: ``hidden_states`` [batch, seq, d] plus the layer's usual keyword arguments
    (attention_mask, position_embeddings, ...) -> [batch, seq, d]. See the module docstring
    for the two modes.

    Attributes:
        mecefo_neighbor: the mode flag (set by :func:`mecefo_kernels.neighbor_mode`).
        mecefo_rank: the requested rank (int, or fraction of each weight's in_features).
        refresh_every: steps between basis refreshes (see :func:`mecefo_kernels.refresh_bases`).
        mecefo_basis_source: "weight" (V from W, the paper) or "momentum" (V from the optimizer's
            first moment of W when :func:`mecefo_kernels.refresh_bases` is given the optimizer).
        mecefo_basis_gate [d, r_g], mecefo_basis_up [d, r_u], mecefo_basis_down [h, r_d]:
            non-persistent buffers, float32 (float64 for float64 weights).
        mecefo_bases_from: what the current bases were computed from, per projection
            ("weight" or "momentum": a momentum basis falls back to W where the moment is missing).
    """

    def __init__(self, *args, rank: int | float = DEFAULT_RANK, refresh_every: int = DEFAULT_REFRESH_EVERY,
                 basis_method: str = DEFAULT_BASIS_METHOD, basis: str = DEFAULT_BASIS_SOURCE,
                 backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.configure_mecefo(rank=rank, refresh_every=refresh_every, basis_method=basis_method, basis=basis,
                              backend=backend)

    def configure_mecefo(self, *, rank: int | float = DEFAULT_RANK, refresh_every: int = DEFAULT_REFRESH_EVERY,
                         basis_method: str = DEFAULT_BASIS_METHOD, basis: str = DEFAULT_BASIS_SOURCE,
                         backend: str | None = None) -> None:
        """Set the neighbour-mode options and compute the bases from the current weights."""
        check_decoder_layer(self, type(self).__name__)
        d, h = self.mlp.gate_proj.in_features, self.mlp.gate_proj.out_features
        resolve_rank(rank, d)
        resolve_rank(rank, h)
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive int (steps), got {refresh_every!r}")
        if basis not in BASIS_SOURCES:
            raise ValueError(f"basis must be one of {', '.join(BASIS_SOURCES)}, got {basis!r}")
        self.mecefo_rank = rank
        self.refresh_every = refresh_every
        self.mecefo_basis_method = basis_method
        self.mecefo_basis_source = basis
        self.mecefo_backend = backend
        self.refresh_bases()

    def basis_names(self) -> tuple[str, ...]:
        return _BASIS_NAMES

    @torch.no_grad()
    def refresh_bases(self, moments: Mapping[torch.Tensor, torch.Tensor] | None = None,
                      basis_fn: BasisFunction | None = None) -> None:
        """V of each projection from its weight, or (basis "momentum") from ``moments[weight]`` where
        that exists and is not all zeros; computed by ``basis_fn`` (default :func:`lowrank_basis`)."""
        mlp = self.mlp
        compute = basis_fn or lowrank_basis
        sources = []
        for name, lin in zip(_BASIS_NAMES, (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            rank = resolve_rank(self.mecefo_rank, lin.in_features)
            matrix, source = lin.weight, "weight"
            if self.mecefo_basis_source == "momentum" and moments is not None:
                moment = moments.get(lin.weight)
                if moment is not None and moment.shape == lin.weight.shape and _any_nonzero(moment):
                    matrix, source = moment, "momentum"
            basis = compute(matrix, rank, method=self.mecefo_basis_method,
                            dtype=torch.float64 if lin.weight.dtype == torch.float64 else torch.float32)
            self.register_buffer(name, basis, persistent=False)
            sources.append(source)
        self.mecefo_bases_from = tuple(sources)

    def skipped_parameter_names(self) -> list[str]:
        return ([f"self_attn.{n}" for n, _ in self.self_attn.named_parameters()]
                + [f"input_layernorm.{n}" for n, _ in self.input_layernorm.named_parameters()])

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if not self.mecefo_neighbor:
            return super().forward(hidden_states, *args, **kwargs)
        if args:
            raise TypeError(f"{type(self).__name__} in neighbour mode takes hidden_states and keyword arguments only, "
                            f"got {len(args)} extra positional argument(s)")
        h = residual_skip(hidden_states, self._attention_branch, **kwargs)
        return h + self._neighbor_ffn(h).to(h.dtype)

    def _attention_branch(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _neighbor_ffn(self, h: torch.Tensor) -> torch.Tensor:
        """FFN branch output (without the residual), recomputed in backward, low-rank weight gradients.

        Under autocast the op runs in the autocast dtype, as the original layer's linears would;
        the casts of the weights are differentiable, so their gradients arrive in the weights' dtype."""
        mlp, norm = self.mlp, self.post_attention_layernorm
        device_type = h.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
        return swiglu_ffn(h.to(dtype), mlp.gate_proj.weight.to(dtype), mlp.up_proj.weight.to(dtype),
                          mlp.down_proj.weight.to(dtype), norm_weight=norm.weight.to(dtype),
                          eps=_rms_norm_eps(norm, "post_attention_layernorm"), recompute=True,
                          bases=(self.mecefo_basis_gate, self.mecefo_basis_up, self.mecefo_basis_down),
                          backend=self.mecefo_backend)


@functools.cache
def neighbor_decoder_class(layer_class: type) -> type:
    """The neighbour-capable subclass of a decoder layer class (created once per class).

    E.g. ``neighbor_decoder_class(LlamaDecoderLayer)`` is ``NeighborLlamaDecoderLayer``:
    a LlamaDecoderLayer (isinstance holds) whose constructor also takes rank, refresh_every,
    basis_method and backend keywords."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, nn.Module)):
        raise TypeError(f"layer_class must be an nn.Module subclass, got {layer_class!r}")
    if issubclass(layer_class, NeighborDecoderMixin):
        return layer_class
    name = f"Neighbor{layer_class.__name__}"
    return type(name, (NeighborDecoderMixin, layer_class), {"__module__": __name__, "__qualname__": name,
                                                              "__doc__": NeighborDecoderMixin.__doc__})


def make_neighbor_capable(layer: nn.Module, **options) -> nn.Module:
    """Give an existing decoder layer neighbour mode in place (parameters shared, state_dict unchanged).

    ``options`` are those of :meth:`NeighborDecoderMixin.configure_mecefo`. Calling it again on
    a patched layer reconfigures it (new rank, period, ...) and recomputes the bases."""
    check_decoder_layer(layer, type(layer).__name__)
    if not isinstance(layer, NeighborDecoderMixin):
        layer.__class__ = neighbor_decoder_class(type(layer))
    layer.configure_mecefo(**options)
    return layer
