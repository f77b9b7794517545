"""Which implementation serves a call, and why not the others.

Every op family (rmsnorm, swiglu, lowrank, ...) has up to four implementations:

========  =====================================================  ==============
name      what                                                   tensors
========  =====================================================  ==============
triton    Triton kernels (``mecefo_kernels/triton``)              CUDA [#]_
cuda      compiled ``mecefo_kernels._C``, CUDA kernels            CUDA
cpu       compiled ``mecefo_kernels._C``, C++ CPU kernels         CPU
torch     plain PyTorch (``mecefo_kernels/reference``)            any
========  =====================================================  ==============

.. [#] and CPU tensors when ``TRITON_INTERPRET=1`` was set before import (the tests do).

A call asks with ``backend="auto"|"triton"|"cuda"|"cpu"|"torch"``; ``None`` means the
``MECEFO_BACKEND`` environment variable, itself defaulting to ``auto``. ``auto`` picks,
for CUDA tensors, the family's preferred GPU implementation that is live (Triton first
unless the family says otherwise, then the CUDA extension, then PyTorch), and for CPU
tensors the compiled CPU op, else PyTorch. Asking for something that cannot run raises
:class:`BackendUnavailableError` with the reason.

Resolution happens once per (family, device type, request) and is treated as a
constant by ``torch.compile``, so it costs nothing in compiled graphs.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .interpreter import triton_interpreting

ENV_VAR = "MECEFO_BACKEND"
REQUESTS = ("auto", "triton", "cuda", "cpu", "torch")
IMPLEMENTATIONS = ("triton", "cuda", "cpu", "torch")


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot serve this call; the message says why."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # why not (empty when ok), or what it is (when ok)


@dataclass(frozen=True)
class OpFamily:
    """What a family of ops implements, and the order ``auto`` prefers on CUDA tensors."""

    name: str
    implementations: tuple[str, ...]
    cuda_preference: tuple[str, ...] = ("triton", "cuda", "torch")


_FAMILIES: dict[str, OpFamily] = {}


def register_family(family: OpFamily) -> OpFamily:
    unknown = set(family.implementations) - set(IMPLEMENTATIONS)
    if unknown:
        raise ValueError(f"op family {family.name!r}: unknown implementations {sorted(unknown)}")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, OpFamily]:
    return dict(_FAMILIES)


# --------------------------------------------------------------------------- live backends


def build_info() -> dict:
    """What setup.py recorded about building ``_C`` (empty when run from a plain checkout)."""
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@functools.cache
def _load_extension():
    """Import ``mecefo_kernels._C`` (registers ``torch.ops.mecefo.*``). Returns (module | None, reason)."""
    try:
        module = importlib.import_module("mecefo_kernels._C")
    except ImportError as exc:
        info = build_info()
        if info and not info.get("built", False):
            return None, f"mecefo_kernels._C was not built: {info.get('reason') or 'unknown reason'}"
        if not info:
            return None, ("mecefo_kernels._C is not built (no build record: running from a source "
                          "checkout? run `pip install --no-build-isolation -e .`)")
        return None, f"mecefo_kernels._C was built but failed to import: {exc}"
    return module, ""


_MISSING_COMPILED_OPS: set[str] = set()


def compiled_op_available(qualname: str) -> bool:
    """Whether the loaded ``_C`` defines ``qualname`` (e.g. "mecefo::swiglu_fwd"). A missing op
    means ``_C`` was built from older sources: the whole extension is then reported stale
    rather than half-used, and import still works."""
    if _load_extension()[0] is None:
        return False
    namespace, name = qualname.split("::")
    if not hasattr(getattr(torch.ops, namespace), name):
        _MISSING_COMPILED_OPS.add(qualname)
        return False
    return True


def extension_status(device_type: str) -> Availability:
    """Whether the compiled ops can serve tensors on ``device_type`` ("cpu" or "cuda")."""
    module, reason = _load_extension()
    if module is None:
        return Availability(False, reason)
    if _MISSING_COMPILED_OPS:
        return Availability(False, "mecefo_kernels._C is out of date (built from older sources; it lacks "
                                   f"{', '.join(sorted(_MISSING_COMPILED_OPS))}): rebuild it with "
                                   "`pip install --no-build-isolation -e .` (or `make venv`)")
    if device_type == "cpu":
        return Availability(True, "compiled C++ CPU kernels")
    if device_type == "cuda":
        if not module.with_cuda:
            why = build_info().get("cpu_only_reason", "it was compiled by a CPU-only build")
            return Availability(False, f"mecefo_kernels._C was built without CUDA: {why}")
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device is available")
        return Availability(True, f"compiled CUDA kernels (CUDA {module.cuda_version // 1000}."
                                  f"{module.cuda_version % 1000 // 10})")
    return Availability(False, f"no compiled kernels for device type {device_type!r}")


@functools.cache
def _triton_import() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({exc!r}); `pip install triton`"
    try:
        importlib.import_module("mecefo_kernels.triton")
    except Exception as exc:  # a kernel module failed to define itself
        return False, f"mecefo_kernels.triton failed to import: {exc!r}"
    return True, f"triton {triton.__version__}"


def triton_status(device_type: str) -> Availability:
    ok, reason = _triton_import()
    if not ok:
        return Availability(False, reason)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device is available")
        return Availability(True, reason + (" (interpreter)" if triton_interpreting() else ""))
    if triton_interpreting():
        return Availability(True, reason + " in interpreter mode (TRITON_INTERPRET=1)")
    return Availability(False, f"Triton kernels need CUDA tensors, got {device_type} tensors "
                               "(set TRITON_INTERPRET=1 before importing to run them on CPU)")


def implementation_status(impl: str, device_type: str) -> Availability:
    if impl == "torch":
        return Availability(True, "plain PyTorch reference")
    if impl == "triton":
        return triton_status(device_type)
    if impl == "cuda":
        if device_type != "cuda":
            return Availability(False, f"the cuda backend serves CUDA tensors, got {device_type} tensors")
        return extension_status("cuda")
    if impl == "cpu":
        if device_type != "cpu":
            return Availability(False, f"the cpu backend serves CPU tensors, got {device_type} tensors")
        return extension_status("cpu")
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLEMENTATIONS}")


# --------------------------------------------------------------------------- resolution


def requested_backend(backend: str | None) -> str:
    """Validate a per-call request; ``None`` falls back to $MECEFO_BACKEND, then ``auto``."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        source = f"${ENV_VAR}"
    else:
        source = "backend"
    if backend not in REQUESTS:
        raise ValueError(f"{source}={backend!r} is not a backend; expected one of {REQUESTS}")
    return backend


@functools.cache
def _resolve(family_name: str, device_type: str, request: str) -> str:
    family = _FAMILIES.get(family_name)
    if family is None:
        raise KeyError(f"unknown op family {family_name!r}; known: {sorted(_FAMILIES)}")
    if request != "auto":
        if request not in family.implementations:
            raise BackendUnavailableError(
                f"{request} backend requested for {family_name}, which has no {request} "
                f"implementation (it has: {', '.join(family.implementations)})")
        status = implementation_status(request, device_type)
        if not status.ok:
            raise BackendUnavailableError(f"{request} backend requested for {family_name} but {status.reason}")
        return request
    order = family.cuda_preference if device_type == "cuda" else ("cpu", "torch")
    for impl in order:
        if impl in family.implementations and implementation_status(impl, device_type).ok:
            return impl
    return "torch"


@torch.compiler.assume_constant_result
def resolve(family_name: str, device_type: str, backend: str | None = None) -> str:
    """The implementation that serves ``family_name`` for tensors on ``device_type``."""
    return _resolve(family_name, device_type, requested_backend(backend))


def explain(family_name: str, device_type: str) -> dict[str, Availability]:
    """Availability of every implementation of a family on a device type (for `info`)."""
    family = _FAMILIES[family_name]
    return {impl: implementation_status(impl, device_type) for impl in family.implementations}
