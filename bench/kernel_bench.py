"""Kernel microbenchmarks: every op, forward / backward / full, each live provider side by side.

    python bench/kernel_bench.py            # GPU if present (bf16), else a quick CPU run (fp32)
    python bench/kernel_bench.py --ops rmsnorm --presets llama-1b --tokens 4096 8192
    python bench/kernel_bench.py --ops swiglu_ffn --presets llama-350m llama-1b llama-7b --tokens 4096 16384

Times are medians with p20/p80 (triton.testing.do_bench on GPU, wall clock on CPU); each
row also goes to bench/results/results.csv. On CPU only the ratios between providers of
the same run mean anything. Memory: activations saved for backward (saved_tensors_hooks,
any device) and, on GPU, memory held after forward and peak memory per call.

Derived rates, against ceilings measured at the start of the same run (a large matrix product
and a large copy, bench/timing.measure_ceilings): TFLOP/s for the matmul ops (the matmul FLOPs
each provider executes, recomputation included; mecefo.flops) and GB/s for the memory-bound
ones (RMSNorm, the elementwise SwiGLU), each also as a fraction of its ceiling.

Rows are recorded as benchmark ``kernels/<op>`` (charts: ``kernels_<device>.png``). The file is not
called kernels.py: a script's directory comes first on sys.path, and Hugging Face's ``kernels``
package, which transformers imports, would then resolve to this file
(tests/packaging/test_module_names.py keeps every bench/ module name clear of such names).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import Recorder  # noqa: E402
from timing import (MAX_RATIO_SPREAD, Ceilings, Timing, measure_ceilings, peak_memory_bytes,  # noqa: E402
                    retained_memory_bytes, time_fn)

import mecefo_kernels as mk  # noqa: E402
from mecefo.flops import (attention_forward_flops, ffn_backward_flops, ffn_forward_flops, linear_flops,  # noqa: E402
                          lowrank_weight_grad_flops)
from mecefo.presets import get_preset  # noqa: E402
from mecefo_kernels import backend as mk_backend  # noqa: E402
from mecefo_kernels.memory import SavedTensors  # noqa: E402
from mecefo_kernels.ops.swiglu_ffn import swiglu_bwd, swiglu_fwd  # noqa: E402

MODES = ("fwd", "bwd", "full")


@dataclass
class Case:
    """One op at one shape for one provider: `run(mode)` returns a closure to time."""

    op: str
    provider: str
    config: str
    make: Callable[[str], Callable[[], object]]  # mode -> closure
    bytes_moved: Callable[[str], float] | None = None  # mode -> bytes, for GB/s
    flops: Callable[[str], float] | None = None  # mode -> matmul FLOPs executed, for TFLOP/s
    modes: tuple[str, ...] = MODES
    forward: Callable[[], object] | None = None  # one differentiable forward, for the memory metrics
    saved_exclude: tuple[torch.Tensor, ...] | None = None  # parameters and bases; None: hooks cannot see
    extra: dict[str, tuple[str, float]] | None = None  # metric -> (unit, value), recorded once


def live_providers(family: str, device: torch.device) -> list[str]:
    """Implementations to benchmark: live ones, triton only on real GPUs (the interpreter is no benchmark)."""
    return [impl for impl, status in mk_backend.explain(family, device.type).items()
            if status.ok and (impl != "triton" or device.type == "cuda")]


def mode_flops(fwd: float, bwd: float) -> Callable[[str], float]:
    return lambda mode: {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def autograd_make(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], dy: torch.Tensor):
    """mode -> closure: forward only, backward of one retained graph, or both."""
    def make(mode):
        if mode == "fwd":
            return fn
        if mode == "bwd":
            y = fn()
            return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
        return lambda: torch.autograd.grad(fn(), inputs, dy)
    return make


def rmsnorm_cases(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)

    def eager(a, b, eps=1e-6):
        h = a.float()
        return b * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(a.dtype)

    providers: dict[str, Callable] = {"eager": eager, "compiled-eager": torch.compile(eager)}
    for impl in live_providers("rmsnorm", device):
        providers[f"mecefo-{impl}"] = lambda a, b, impl=impl: mk.rms_norm(a, b, backend=impl)
    config = f"T={tokens},d={hidden}"
    elem = x.element_size()

    def make_for(fn):
        def make(mode):
            if mode == "fwd":
                return lambda: fn(x, w)
            y = fn(x, w)
            if mode == "bwd":
                return lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True)
            return lambda: torch.autograd.grad(fn(x, w), (x, w), dy)
        return make

    def bytes_moved(mode):  # x read + y write forward; dy, x read + dx write backward
        per = tokens * hidden * elem
        return {"fwd": 2 * per, "bwd": 3 * per, "full": 5 * per}[mode]

    return [Case("rmsnorm", name, config, make_for(fn), bytes_moved) for name, fn in providers.items()]


def llama_mlp(x, norm_weight, w_gate, w_up, w_down, eps=1e-6):
    """What a user runs today: LlamaRMSNorm + LlamaMLP in plain PyTorch."""
    h = x.float()
    z = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(z, w_gate))
                                      * torch.nn.functional.linear(z, w_up), w_down)


def liger_mlp() -> Callable | None:
    """Liger-Kernel's fused SwiGLU (LigerSiLUMulFunction) in the same MLP, if installed."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as exc:  # not installable everywhere (needs CUDA triton)
        print(f"# liger provider skipped: liger_kernel is not importable ({exc.__class__.__name__}: {exc})")
        return None

    def mlp(x, norm_weight, w_gate, w_up, w_down, eps=1e-6):
        h = x.float()
        z = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        gate, up = torch.nn.functional.linear(z, w_gate), torch.nn.functional.linear(z, w_up)
        return torch.nn.functional.linear(LigerSiLUMulFunction.apply(gate, up), w_down)

    return mlp


def swiglu_ffn_cases(tokens: int, hidden: int, ffn: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """The LLaMA FFN block (RMSNorm + SwiGLU MLP). Neighbour mode = recompute + low-rank
    weight gradients with r = d/8 for all three weights."""
    rank = hidden // 8
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    norm_weight = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    w_gate, w_up = (torch.randn(ffn, hidden, device=device, dtype=dtype) / hidden**0.5 for _ in range(2))
    w_down = torch.randn(hidden, ffn, device=device, dtype=dtype) / ffn**0.5
    weights = tuple(w.requires_grad_() for w in (w_gate, w_up, w_down))
    bases = tuple(mk.lowrank_basis(w, rank) for w in weights)
    dy = torch.randn(tokens, hidden, device=device, dtype=dtype)
    inputs = (x, norm_weight, *weights)
    params = (norm_weight, *weights, *bases)

    fwd = ffn_forward_flops(tokens, hidden, ffn)
    exact = mode_flops(fwd, ffn_backward_flops(tokens, hidden, ffn))
    neighbour = mode_flops(fwd, ffn_backward_flops(tokens, hidden, ffn, (rank, rank, rank)))
    # name -> (fn(*inputs), saved tensors visible to hooks, FLOPs executed per mode)
    providers: dict[str, tuple[Callable, bool, Callable[[str], float]]] = {}
    for impl in live_providers("swiglu_ffn", device):
        providers[f"mecefo-{impl}-neighbour-r{rank}"] = (
            lambda x, n, g, u, d, impl=impl: mk.swiglu_ffn(x, g, u, d, norm_weight=n, recompute=True, bases=bases,
                                                             backend=impl), True, neighbour)
        providers[f"mecefo-{impl}-exact"] = (
            lambda x, n, g, u, d, impl=impl: mk.swiglu_ffn(x, g, u, d, norm_weight=n, backend=impl), True, exact)
    providers["eager"] = (llama_mlp, True, exact)
    providers["eager-checkpoint"] = (  # its backward runs the forward again
        lambda *args: torch.utils.checkpoint.checkpoint(llama_mlp, *args, use_reentrant=False), False,
        mode_flops(fwd, fwd + ffn_backward_flops(tokens, hidden, ffn)))
    providers["compiled-eager"] = (torch.compile(llama_mlp), True, exact)
    liger = liger_mlp()
    if liger is not None:
        providers["liger"] = (liger, True, exact)

    config = f"T={tokens},d={hidden},h={ffn}"
    cases = []
    for name, (fn, hooks_see_it, flops) in providers.items():
        def forward(fn=fn):
            return fn(*inputs)
        cases.append(Case("swiglu_ffn", name, config, autograd_make(forward, inputs, dy), forward=forward,
                          saved_exclude=params if hooks_see_it else None, flops=flops))
    return cases


def swiglu_cases(tokens: int, ffn: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """The elementwise SwiGLU alone (p = silu(a) u and its backward): memory-bound, so GB/s."""
    a, u, dp = (torch.randn(tokens, ffn, device=device, dtype=dtype) for _ in range(3))

    def eager_fwd():
        return torch.nn.functional.silu(a) * u

    def eager_bwd():  # what autograd runs for silu(a) * u: da = dp u silu'(a), du = dp silu(a)
        return torch.ops.aten.silu_backward(dp * u, a), dp * torch.nn.functional.silu(a)

    providers = {"eager": (eager_fwd, eager_bwd), "compiled-eager": (torch.compile(eager_fwd), torch.compile(eager_bwd))}
    for impl in live_providers("swiglu_ffn", device):
        providers[f"mecefo-{impl}"] = (lambda impl=impl: swiglu_fwd(impl, a, u),
                                       lambda impl=impl: swiglu_bwd(impl, dp, a, u))
    per = tokens * ffn * a.element_size()

    def bytes_moved(mode):  # fwd: a, u -> p; bwd: dp, a, u -> da, du, p (mecefo; eager writes no p)
        return {"fwd": 3 * per, "bwd": 6 * per}[mode]

    return [Case("swiglu", name, f"T={tokens},h={ffn}", lambda mode, f=f, b=b: f if mode == "fwd" else b,
                 bytes_moved, modes=("fwd", "bwd")) for name, (f, b) in providers.items()]


def lowrank_linear_cases(tokens: int, hidden: int, ffn: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """The FFN's up projection as a low-rank linear (r = d/8) against nn.functional.linear."""
    rank = hidden // 8
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(ffn, hidden, device=device, dtype=dtype) / hidden**0.5).requires_grad_()
    basis = mk.lowrank_basis(weight, rank)
    dy = torch.randn(tokens, ffn, device=device, dtype=dtype)
    one = linear_flops(tokens, ffn, hidden)
    providers: dict[str, tuple[Callable, Callable[[str], float]]] = {
        "eager": (lambda: torch.nn.functional.linear(x, weight), mode_flops(one, 2 * one))}
    for impl in live_providers("lowrank", device):
        providers[f"mecefo-{impl}-r{rank}"] = (
            lambda impl=impl: mk.lowrank_linear(x, weight, basis, backend=impl),
            mode_flops(one, one + lowrank_weight_grad_flops(tokens, ffn, hidden, rank)))
    return [Case("lowrank_linear", name, f"T={tokens},in={hidden},out={ffn}", autograd_make(fn, (x, weight), dy),
                 forward=fn, saved_exclude=(weight, basis), flops=flops) for name, (fn, flops) in providers.items()]


def lowrank_basis_cases(hidden: int, ffn: int, device: torch.device) -> list[Case]:
    """lowrank_basis of the gate weight [h, d] at r = d/8: exact SVD vs randomized, with the
    share of the SVD basis's captured energy ||W V||_F^2 the randomized one keeps."""
    rank = hidden // 8
    weight = torch.randn(ffn, hidden, device=device) / hidden**0.5  # freshly initialised: the hard case
    config = f"out={ffn},in={hidden},r={rank}"

    def energy(v):
        return (weight.double() @ v.double()).norm().item() ** 2

    optimum = energy(mk.lowrank_basis(weight, rank))
    cases = []
    for method in ("svd", "randomized"):
        extra = {"captured_energy_vs_svd": ("ratio", energy(mk.lowrank_basis(weight, rank, method=method)) / optimum)}
        cases.append(Case("lowrank_basis", method, config,
                          lambda mode, method=method: lambda: mk.lowrank_basis(weight, rank, method=method),
                          modes=("fwd",), extra=extra))
    return cases


def residual_skip_cases(preset, tokens: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    """The attention half of a decoder block, h = x + MHA(RMSNorm1(x)) (transformers' LLaMA modules, SDPA):
    a normal rank's (full backward: input and weight gradients) against mecefo_kernels.residual_skip, a
    neighbour's (attention forward-only, dL/dx = dL/dh, nothing saved)."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding

    config = preset.to_llama_config(attn_implementation="sdpa")
    seq = min(tokens, preset.max_seq_len)
    batch = tokens // seq
    with torch.device(device):
        attention = LlamaAttention(config, layer_idx=0).to(dtype)
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(batch, seq, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    positions = rotary(x, torch.arange(seq, device=device)[None])
    params = (*attention.parameters(), *norm.parameters())
    dy = torch.randn_like(x)

    def branch(h):
        return attention(norm(h), position_embeddings=positions, attention_mask=None)[0]

    def normal():
        return x + branch(x)

    def neighbour():
        return mk.residual_skip(x, branch)

    fwd = attention_forward_flops(batch, seq, config.hidden_size, config.num_key_value_heads * preset.head_dim)
    name = f"B={batch},S={seq},d={config.hidden_size}"
    return [Case("residual_skip", "eager", name, autograd_make(normal, (x, *params), dy), forward=normal,
                 saved_exclude=params, flops=mode_flops(fwd, 2 * fwd)),
            Case("residual_skip", "mecefo-residual_skip", name, autograd_make(neighbour, (x,), dy), forward=neighbour,
                 saved_exclude=params, flops=mode_flops(fwd, 0))]


OPS = {
    "rmsnorm": lambda preset, tokens, dtype, device: rmsnorm_cases(tokens, preset.hidden_size, dtype, device),
    "swiglu_ffn": lambda preset, tokens, dtype, device: swiglu_ffn_cases(
        tokens, preset.hidden_size, preset.intermediate_size, dtype, device),
    "swiglu": lambda preset, tokens, dtype, device: swiglu_cases(tokens, preset.intermediate_size, dtype, device),
    "lowrank_linear": lambda preset, tokens, dtype, device: lowrank_linear_cases(
        tokens, preset.hidden_size, preset.intermediate_size, dtype, device),
    "lowrank_basis": lambda preset, tokens, dtype, device: lowrank_basis_cases(
        preset.hidden_size, preset.intermediate_size, device),
    "residual_skip": residual_skip_cases,
}
# lowrank_basis does not depend on the token count: run it once per preset.
TOKEN_FREE = {"lowrank_basis"}


def rate_quantiles(amount: float, t: Timing, scale: float) -> tuple[float, float, float]:
    """amount / time as (median, p20, p80) in units of `scale` per second (p20 of a rate is at p80 of time)."""
    return tuple(amount / (ms * 1e-3) / scale for ms in (t.median_ms, t.p80_ms, t.p20_ms))


def run_case(case: Case, config: str, modes: list[str], device: torch.device, recorder: Recorder,
             rep_ms: float, ceilings: Ceilings, max_spread: float = MAX_RATIO_SPREAD) -> None:
    def record(mode, metric, unit, median, p20=None, p80=None):
        recorder.add(benchmark=f"kernels/{case.op}", provider=case.provider, mode=mode, config=config,
                     metric=metric, unit=unit, median=median, p20=p20, p80=p80)

    for mode in modes:
        fn = case.make(mode)
        t = time_fn(fn, device, rep_ms=rep_ms)
        peak = peak_memory_bytes(fn, device)
        record(mode, "time", "ms", t.median_ms, t.p20_ms, t.p80_ms)
        rate = ""
        # a fraction of a ceiling timed at another moment: only when both timings are steady, else flagged
        steady = t.supports_ratio(max_spread) and ceilings.supports_ratio(max_spread)
        unsteady = f"? spread {max(t.spread, ceilings.spread):.0%}"
        if case.bytes_moved:
            gbps = rate_quantiles(case.bytes_moved(mode), t, 1e9)
            record(mode, "bandwidth", "GB/s", *gbps)
            if steady:
                record(mode, "bandwidth_of_ceiling", "fraction", gbps[0] / ceilings.gbps)
            rate = f"{gbps[0]:.1f} GB/s ({f'{gbps[0] / ceilings.gbps:.0%}' if steady else unsteady})"
        if case.flops and case.flops(mode):
            tflops = rate_quantiles(case.flops(mode), t, 1e12)
            record(mode, "tflops", "TFLOP/s", *tflops)
            if steady:
                record(mode, "tflops_of_ceiling", "fraction", tflops[0] / ceilings.tflops)
            rate = f"{tflops[0]:.3g} TFLOP/s ({f'{tflops[0] / ceilings.tflops:.0%}' if steady else unsteady})"
        if peak is not None:
            record(mode, "peak_memory", "MiB", peak / 2**20)
        print(f"{case.op:<15}{case.provider:<30}{case.config:<26}{mode:<6}{t.median_ms:>11.3f}"
              f"{t.p20_ms:>9.3f}{t.p80_ms:>9.3f}{rate:>24}{'' if peak is None else f'{peak / 2**20:.1f}':>10}")
    memory = []
    if case.forward is not None and case.saved_exclude is not None:
        with SavedTensors(exclude=case.saved_exclude) as meter:
            case.forward()
        saved = meter.bytes / 2**20
        record("fwd", "saved_activations", "MiB", saved)
        memory.append(f"saved for backward {saved:.2f} MiB")
    if case.forward is not None:
        held = retained_memory_bytes(case.forward, device)
        if held is not None:
            record("fwd", "retained_after_forward", "MiB", held / 2**20)
            memory.append(f"held after forward {held / 2**20:.2f} MiB")
    for metric, (unit, value) in (case.extra or {}).items():
        record("fwd", metric, unit, value)
        memory.append(f"{metric} {value:.4f}")
    if memory:
        print(f"{'':<15}{case.provider:<30}{'':<26}" + "; ".join(memory))


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--presets", nargs="+", default=["llama-350m", "llama-1b", "llama-7b"] if cuda else ["small"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384] if cuda else [1024])
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--rep-ms", type=float, default=100, help="time spent measuring each call (more: steadier)")
    parser.add_argument("--max-spread", type=float, default=MAX_RATIO_SPREAD,
                        help="a rate is given as a fraction of its ceiling only when both timings' p80 - p20 are "
                             "within this fraction of their medians (default %(default)s)")
    parser.add_argument("--csv", type=Path, default=None, help="append rows here (default bench/results/results.csv)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    recorder = Recorder(device, **({"path": args.csv} if args.csv else {}))
    ceilings = measure_ceilings(device, dtype)
    for metric, unit, value, what in (("tflops", "TFLOP/s", ceilings.tflops, "torch.mm"),
                                      ("bandwidth", "GB/s", ceilings.gbps, "copy")):
        recorder.add(benchmark="kernels/ceiling", provider=what, mode="-", config=args.dtype, metric=metric, unit=unit,
                     median=value)
    print(f"# kernels on {recorder.env['device']}, {args.dtype}; ceilings: matmul {ceilings.tflops:.3g} TFLOP/s, "
          f"copy {ceilings.gbps:.1f} GB/s")
    print(f"{'op':<15}{'provider':<30}{'config':<26}{'mode':<6}{'median ms':>11}{'p20':>9}{'p80':>9}"
          f"{'rate (of ceiling)':>24}{'peak MiB':>10}")
    for op in args.ops:
        for preset_name in args.presets:
            preset = get_preset(preset_name)
            for tokens in args.tokens[:1] if op in TOKEN_FREE else args.tokens:
                for case in OPS[op](preset, tokens, dtype, device):
                    run_case(case, f"{preset_name}:{case.config}", [m for m in args.modes if m in case.modes],
                             device, recorder, args.rep_ms, ceilings, args.max_spread)
    if not args.no_save:
        print(f"appended {len(recorder.rows)} rows to {recorder.save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
