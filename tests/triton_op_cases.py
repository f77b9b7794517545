"""Arguments for every registered Triton op (``torch.ops.mecefo_triton.*``) at named shapes.

The tests that must reach every Triton kernel through its real launcher share this table:
the ahead-of-time compile for sm_80 / sm_90 (tests/packaging/triton_aot.py) and the
device-guard test (tests/kernels/test_device_guard.py). Both check that every registered
op has cases here and that every kernel was launched, so a new kernel behind an existing
op is covered without editing them, and a new op fails them until it gets an entry here.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable

import torch

NAMESPACE = "mecefo_triton"

# tokens, hidden d, FFN width h, down-projection output d_out, low-rank rank r.
SHAPES = {
    # odd sizes and a strided view: no divisibility-by-16 specialisation, masked edges
    "small": dict(tokens=37, d=48, h=80, d_out=40, rank=12),
    "llama-7b": dict(tokens=8192, d=4096, h=11008, d_out=4096, rank=128),
    # the widest LLaMA rows (70B: d = 8192): RMSNorm's block and warps grow with d
    "llama-70b": dict(tokens=8192, d=8192, h=28672, d_out=8192, rank=256),
}


def registered_ops() -> set[str]:
    """Names of the ops registered under mecefo_triton:: (importing mecefo_kernels.triton registers them)."""
    import mecefo_kernels.triton  # noqa: F401

    prefix = NAMESPACE + "::"
    return {name[len(prefix):] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)}


def op_cases(shape: str, dtype: torch.dtype, make: Callable = torch.randn,
             device: str = "cpu") -> list[tuple[str, tuple]]:
    """[(op name, args)] covering every op and every branch of its launcher at `shape`.

    `make(*size, dtype=..., device=...)` creates the tensors: torch.randn for runs that check
    values, torch.empty for the compile-only capture (no memory is touched at LLaMA sizes).
    Bases are float32, as lowrank_basis returns them."""
    s = SHAPES[shape]
    t, d, h, d_out, r = s["tokens"], s["d"], s["h"], s["d_out"], s["rank"]

    def new(*size, dt=dtype):
        return make(*size, dtype=dt, device=device)

    x, w = new(t, d), new(d)
    if shape == "small":  # a row stride that is not the row length
        x = new(t, d + 16)[:, :d]
    rstd = new(t, dt=torch.float32)
    a, u = new(t, h), new(t, h)
    z, w_gate, w_up, w_down = new(t, d), new(h, d), new(h, d), new(d_out, h)
    dy_down = new(t, d_out)
    basis, dy_gate, xv = new(d, r, dt=torch.float32), new(t, h), new(t, r)
    return [
        ("rmsnorm_fwd", (x, w, 1e-6)),
        ("rmsnorm_bwd", (new(t, d), x, w, rstd)),
        ("swiglu_fwd", (a, u)),
        ("swiglu_bwd", (new(t, h), a, u)),
        ("gate_up_swiglu", (z, w_gate, w_up, True)),
        ("gate_up_swiglu", (z, w_gate, w_up, False)),
        ("gate_up_swiglu_bwd", (z, w_gate, w_up, dy_down, w_down)),
        ("lowrank_project", (z, basis)),
        ("lowrank_weight_grad", (dy_gate, xv, basis, dtype)),
    ]


# ------------------------------------------------------------------ kernels and their launches


def _jitted_function(obj):
    """The Python function behind a @triton.jit object (native or interpreted, autotuned or not), else None."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(obj, Autotuner):
        obj = obj.fn
    return obj.fn if isinstance(obj, (JITFunction, InterpretedFunction)) else None


def launchable_kernels() -> set[str]:
    """"module.name" of every @triton.jit function of mecefo_kernels.triton that is launched
    rather than called: those no other jitted function of the package calls by name (helpers
    such as launch.mma are called from kernels)."""
    import mecefo_kernels.triton as package

    jitted = {}
    for module in vars(package).values():
        if getattr(module, "__name__", "").startswith(package.__name__ + "."):
            for name, obj in vars(module).items():
                fn = _jitted_function(obj)
                if fn is not None and fn.__module__ == module.__name__:
                    jitted[kernel_name(fn)] = inspect.getsource(fn)
    return {key for key in jitted
            if not any(re.search(rf"\b{key.split('.')[1]}\(", src) for other, src in jitted.items() if other != key)}


def kernel_name(fn) -> str:
    """"module.name" of a kernel's Python function, e.g. "rmsnorm._rmsnorm_fwd_kernel"."""
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


@contextlib.contextmanager
def recorded_launches(on_launch: Callable[[str], None] | None = None):
    """Under the interpreter: yields a list that receives the kernel_name of every kernel launch
    (autotuned ones included), in order; `on_launch(name)` is called at each launch too."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[str] = []
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        name = kernel_name(self.fn)
        launches.append(name)
        if on_launch is not None:
            on_launch(name)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original
