"""Compile every Triton kernel ahead of time for sm_80 and sm_90, on a machine without a GPU.

    python tests/packaging/triton_aot.py                 # table of every compile: registers, spills, shared memory
    python tests/packaging/triton_aot.py --json out.json # the same as JSON (tests/packaging/test_triton_aot.py)

Which kernels, with which arguments: every registered ``mecefo_triton`` op is called through
its real launcher with the cases of tests/triton_op_cases.py (small odd shapes, LLaMA-7B and
LLaMA-70B rows; bf16, fp16, and fp32 with TF32 allowed, the only way fp32 reaches a Triton
GEMM). The launch is intercepted instead of run: ``JITFunction.run`` binds the arguments with
Triton's own binder for each target (pointer dtypes, alignment and divisibility
specialisation, the constexprs the launcher passes) and ``Autotuner.run`` expands every
config of the GPU list. So the compiles are exactly what a GPU would compile, config by
config, and a new kernel is covered as soon as a launcher launches it.

Each distinct (kernel, target, signature, constexprs, options) is compiled once, to a cubin,
by Triton's bundled ptxas; ptxas's ``-v`` report gives registers and spills, the compiled
metadata the shared memory. Must run without TRITON_INTERPRET (the interpreter replaces
``@triton.jit`` functions and the autotune lists): the test starts it as a subprocess.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("triton_aot.py compiles for GPUs: run it without TRITON_INTERPRET=1")
# a private cache: every compile runs ptxas (a cache hit has no ptxas report) and ~/.triton stays clean
if "TRITON_CACHE_DIR" not in os.environ:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mecefo-triton-aot-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: triton_op_cases

from triton_op_cases import NAMESPACE, SHAPES, kernel_name, launchable_kernels, op_cases, registered_ops  # noqa: E402

import mecefo_kernels.triton  # noqa: E402,F401  (defines the kernels and registers the ops)

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
# Largest shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100/H200.
MAX_SHARED = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Compile:
    """One distinct compile and what came of it."""

    kernel: str
    target: str
    dtype: str  # of the op call that launched it (the kernel's pointers may mix dtypes)
    shapes: list[str]  # the case shapes that led to this exact compile
    constexprs: dict
    num_warps: int
    num_stages: int
    regs: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads, bytes per thread
    shared_bytes: int | None = None
    max_shared_bytes: int = 0
    approximate: list[str] = field(default_factory=list)  # approximate math instructions in the PTX
    cpu_seconds: float = 0.0  # this process and ptxas: what the compile costs on an idle core
    error: str | None = None


def _plain(value):
    """constexpr values as JSON-friendly plain values."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


class Capture:
    """Context manager: launches are bound for every target and recorded instead of run."""

    def __init__(self):
        self.specs: dict[tuple, tuple] = {}  # dedup key -> (JITFunction, target, src args, options, Compile)
        self.context = ("", "")  # (shape, dtype) of the op call in progress
        self._backends = {name: make_backend(target) for name, target in TARGETS.items()}
        self._binders: dict[tuple, object] = {}

    def _bind(self, fn: JITFunction, args, kwargs):
        for target_name, backend in self._backends.items():
            binder = self._binders.get((id(fn), target_name))
            if binder is None:
                binder = self._binders[(id(fn), target_name)] = create_function_from_signature(
                    fn.signature, fn.params, backend)
            kw = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
            bound, specialization, options = binder(*args, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
            key = (id(fn), target_name, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
            shape, dtype = self.context
            if key in self.specs:
                self.specs[key][-1].shapes.append(shape)
                continue
            named = {fn.arg_names[path[0]]: _plain(v) for path, v in constexprs.items()}
            record = Compile(kernel_name(fn.fn), target_name, dtype, [shape], named, options.num_warps,
                             options.num_stages, max_shared_bytes=MAX_SHARED[target_name])
            self.specs[key] = (fn, target_name, (signature, constexprs, attrs), options.__dict__, record)

    def __enter__(self):
        capture = self
        self._jit_run, self._autotune_run = JITFunction.run, Autotuner.run

        def jit_run(fn, *args, grid, warmup, **kwargs):
            capture._bind(fn, args, kwargs)

        def autotune_run(tuner, *args, grid, warmup, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)  # every config a GPU would try for these arguments
            tuner.nargs = None
            for config in configs:
                tuner.fn.run(*args, grid=grid, warmup=warmup, **kwargs, **config.all_kwargs())

        JITFunction.run, Autotuner.run = jit_run, autotune_run
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._jit_run, self._autotune_run


def capture_all(shapes=tuple(SHAPES), dtypes=tuple(DTYPES), ops=None) -> tuple[Capture, list[str]]:
    """Call every op case under Capture. -> (capture, errors raised by launchers)."""
    # fp32 GEMMs reach Triton only when TF32 is allowed (else cuBLAS): allow it for the capture
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    errors = []
    capture = Capture()
    with capture, torch.no_grad():
        for shape in shapes:
            for dtype_name in dtypes:
                capture.context = (shape, dtype_name)
                for name, args in op_cases(shape, DTYPES[dtype_name], make=torch.empty):
                    if ops is not None and name not in ops:
                        continue
                    try:
                        getattr(getattr(torch.ops, NAMESPACE), name)(*args)
                    except Exception as exc:  # a launcher that cannot even bind its kernel
                        errors.append(f"{name} [{shape}, {dtype_name}]: {type(exc).__name__}: {exc}")
    return capture, errors


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# what exp, division and sqrt lower to on the GPU: approximate instructions, not IEEE-rounded ones
_APPROXIMATE = re.compile(r"\b((?:ex2|lg2|rcp|sqrt|rsqrt|sin|cos|tanh)\.approx(?:\.ftz)?\.f32|div\.full\.f32)\b")

_WORK: list = []  # filled before the worker pool forks


def _compile_one(index: int) -> Compile:
    fn, target_name, (signature, constexprs, attrs), options, record = _WORK[index]
    log = io.StringIO()
    start = _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGETS[target_name],
                                    options=options)
        assert kernel.asm.get("cubin"), "no cubin produced"
        record.shared_bytes = kernel.metadata.shared
        text = log.getvalue()
        regs = _PTXAS_REGS.findall(text)
        record.regs = max(int(r) for r in regs) if regs else None
        record.spill_bytes = sum(int(s) + int(l) for s, l in _PTXAS_SPILLS.findall(text))
        record.approximate = sorted(set(_APPROXIMATE.findall(kernel.asm["ptx"])))
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    record.cpu_seconds = round(_cpu_seconds() - start, 2)
    return record


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _die_with_parent() -> None:
    """Pool workers end with the process that forked them (a test timeout kills only that one)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def compile_all(capture: Capture, workers: int) -> list[Compile]:
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed per compile (captured above)
    _WORK[:] = list(capture.specs.values())
    if workers <= 1:
        return [_compile_one(i) for i in range(len(_WORK))]
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_die_with_parent) as pool:
        return list(pool.map(_compile_one, range(len(_WORK))))


def report(workers: int = 2, shapes=tuple(SHAPES), dtypes=tuple(DTYPES), ops=None) -> dict:
    start = time.perf_counter()
    capture, launch_errors = capture_all(shapes, dtypes, ops)
    captured = time.perf_counter() - start
    compiles = compile_all(capture, workers)
    launched = {c.kernel for c in compiles}
    return {
        "kernels": sorted(launchable_kernels()),
        "autotune_configs": autotune_configs(),
        "launched": sorted(launched),
        "ops": sorted(registered_ops()),
        "launch_errors": launch_errors,
        "compiles": [asdict(c) for c in compiles],
        "capture_seconds": round(captured, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(sum(c.cpu_seconds for c in compiles), 1),
        "triton": triton.__version__,
    }


def autotune_configs() -> dict[str, list[dict]]:
    """The GPU config list of every autotuned kernel (what this process, without the interpreter, defined)."""
    configs = {}
    for module in vars(mecefo_kernels.triton).values():
        for obj in vars(module).values() if getattr(module, "__name__", "").startswith("mecefo_kernels.triton.") else ():
            if isinstance(obj, Autotuner):
                configs[kernel_name(obj.fn.fn)] = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                                                   for c in obj.configs]
    return configs


def format_table(result: dict) -> str:
    lines = [f"{'kernel':36} {'target':6} {'dtype':5} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>8} "
             f"{'smem KB':>8}  constexprs / shapes"]
    for c in sorted(result["compiles"], key=lambda c: (c["kernel"], c["target"], c["dtype"], str(c["constexprs"]))):
        consts = ",".join(f"{k}={v}" for k, v in c["constexprs"].items())
        smem = "-" if c["shared_bytes"] is None else f"{c['shared_bytes'] / 1024:.0f}"
        lines.append(f"{c['kernel']:36} {c['target']:6} {c['dtype']:5} {c['num_warps']:>5} {c['num_stages']:>6} "
                     f"{c['regs'] if c['regs'] is not None else '-':>5} "
                     f"{c['spill_bytes'] if c['spill_bytes'] is not None else '-':>8} {smem:>8}  "
                     f"{consts} [{','.join(sorted(set(c['shapes'])))}]" + (f"  ERROR {c['error'][:200]}" if c["error"] else ""))
    lines.append(f"{len(result['compiles'])} compiles of {len(result['launched'])} kernels in {result['seconds']} s "
                 f"({result['cpu_seconds']} CPU s; capture {result['capture_seconds']} s), triton {result['triton']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--ops", nargs="+", help="only these mecefo_triton ops (default: all)")
    args = parser.parse_args(argv)
    result = report(args.workers, tuple(args.shapes), tuple(args.dtypes), args.ops)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
