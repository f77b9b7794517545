"""Neighbour mode: the switch every MeCeFO module shares, and the whole-model helpers.

A *neighbour-capable* module (:class:`NeighborCapable`) has two forward paths: the normal one
(exactly the original computation) and the neighbour one (MeCeFO's cheap approximations).
The path is chosen per forward by the module's ``mecefo_neighbor`` flag, which
:func:`neighbor_mode` sets on every such module of a model for the duration of a ``with``
block. Each forward records its own backward, so a micro-batch's backward follows the mode
of its forward, wherever the backward runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn


class NeighborCapable:
    """Mixin for modules with a normal and a neighbour forward path.

    Subclasses implement :meth:`skipped_parameter_names`, :meth:`basis_names` and
    :meth:`refresh_bases` and set ``refresh_every`` (steps between basis refreshes).
    """

    mecefo_neighbor: bool = False  # class default; neighbor_mode sets it per instance
    refresh_every: int

    def skipped_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the parameters that get no gradient in neighbour mode."""
        raise NotImplementedError

    def basis_names(self) -> tuple[str, ...]:
        """Names of the (non-persistent) buffers holding the low-rank bases."""
        raise NotImplementedError

    def refresh_bases(self, moments: Mapping[torch.Tensor, torch.Tensor] | None = None,
                      basis_fn: Callable[..., torch.Tensor] | None = None) -> None:
        """Recompute the low-rank bases from the current weights (or, where the module's basis
        source is "momentum", from ``moments[weight]``, the optimizer's first moment), each with
        ``basis_fn`` (default :func:`mecefo_kernels.lowrank_basis`)."""
        raise NotImplementedError


def neighbor_modules(model: nn.Module) -> list[tuple[str, NeighborCapable]]:
    """(qualified name, module) of every neighbour-capable module in model, model included."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, NeighborCapable)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no MeCeFO neighbour-capable modules; "
                         "patch it first with mecefo_kernels.apply_mecefo(model)")
    return found


@contextlib.contextmanager
def neighbor_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Run the forwards inside the block in neighbour mode (or normal mode if ``enabled`` is False).

    In neighbour mode every patched decoder layer drops its attention backward (the branch
    runs forward-only, the gradient goes through the residual) and runs its FFN with
    recomputation and low-rank weight gradients. Outside the block the model is the
    original model, bit for bit. Blocks nest; the previous modes are restored on exit.

    Activation checkpointing (transformers' ``activation_checkpointing_enable``) is suspended
    for patched layers inside the block: a neighbour layer already keeps only its FFN input,
    and a checkpointed neighbour forward would be replayed in backward under whatever mode
    is active then. (For the same reason, with checkpointing on, run a normal micro-batch's
    backward before entering neighbour mode.)

    Usage::

        with mecefo_kernels.neighbor_mode(model, enabled=is_neighbour):
            loss = model(input_ids=x, labels=y).loss
        loss.backward()
    """
    modules = [m for _, m in neighbor_modules(model)]
    saved = [(m.mecefo_neighbor, getattr(m, "gradient_checkpointing", None)) for m in modules]
    try:
        for m in modules:
            m.mecefo_neighbor = bool(enabled)
            if enabled and getattr(m, "gradient_checkpointing", False):
                m.gradient_checkpointing = False
        yield model
    finally:
        for m, (neighbor, checkpointing) in zip(modules, saved):
            m.mecefo_neighbor = neighbor
            if checkpointing is not None:
                m.gradient_checkpointing = checkpointing


def optimizer_moments(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, torch.Tensor]:
    """Parameter -> its first moment (``exp_avg``: Adam, AdamW, Lion, ...) for every parameter that has one."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return {p: state["exp_avg"] for p, state in optimizer.state.items()
            if isinstance(state.get("exp_avg"), torch.Tensor)}


def refresh_bases(model: nn.Module, *, step: int | None = None, optimizer: torch.optim.Optimizer | None = None,
                  basis_fn: Callable[..., torch.Tensor] | None = None) -> bool:
    """Recompute the low-rank FFN bases of every patched layer.

    Args:
        model: a model patched by :func:`mecefo_kernels.apply_mecefo`.
        step: if given, refresh only when ``step % refresh_every == 0`` (the period chosen at
            patch time), so a trainer can call this every step. None: refresh now.
        optimizer: layers patched with ``basis="momentum"`` take V from the top right singular
            vectors of each FFN weight's first moment in this optimizer's state (``exp_avg``:
            Adam / AdamW), falling back to the weight where there is none yet (before the first
            update) or it is all zeros. Without it every layer uses its weights.
        basis_fn: how each basis is computed, called as ``basis_fn(matrix, rank, method=...,
            dtype=...)`` with ``matrix`` the weight (or its first moment) ``[out, in]``, returning
            ``[in, rank]`` with orthonormal columns, as :func:`mecefo_kernels.lowrank_basis` (the
            default) does. For weights sharded over several processes (FSDP2 DTensors) pass one
            that computes the basis across the shards, the same on every process.

    Returns:
        Whether the bases were recomputed.
    """
    modules = [m for _, m in neighbor_modules(model)]
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int or None, got {step!r}")
        modules = [m for m in modules if step % m.refresh_every == 0]
    moments = optimizer_moments(optimizer) if optimizer is not None else None
    for m in modules:
        m.refresh_bases(moments, basis_fn=basis_fn)
    return bool(modules)


def bases_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The low-rank bases of every patched layer, by qualified buffer name.

    They are non-persistent buffers (not in ``model.state_dict()``); a trainer that wants a
    replica it heals, or a run it resumes, to use the same bases sends or saves these."""
    return {f"{prefix}.{name}" if prefix else name: getattr(m, name)
            for prefix, m in neighbor_modules(model) for name in m.basis_names()}


@torch.no_grad()
def load_bases_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Install bases from :func:`bases_state_dict` (of a model with the same shapes and rank)."""
    current = bases_state_dict(model)
    if set(state) != set(current):
        missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        raise ValueError(f"bases state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(current[name].shape):
            raise ValueError(f"basis {name}: shape {tuple(value.shape)} in the state, {tuple(current[name].shape)} "
                             "in the model (another rank?)")
        current[name].copy_(value)


def neighbor_skipped_parameters(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters that get no gradient in neighbour mode.

    For patched LLaMA-family layers: every parameter of ``self_attn`` (Wq, Wk, Wv, Wo and any
    biases or q/k norms) and of ``input_layernorm``. MeCeFO averages these over the live
    non-neighbour ranks only; every other parameter is averaged over all shards.
    """
    names = []
    for prefix, m in neighbor_modules(model):
        names += [f"{prefix}.{n}" if prefix else n for n in m.skipped_parameter_names()]
    return names
