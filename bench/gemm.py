"""Autotuned TFLOP/s of every GEMM-bearing Triton kernel next to torch.mm (cuBLAS) at the same shapes.

    python bench/gemm.py                                  # GPU: llama-1b and llama-7b, 8192 tokens, bf16
    python bench/gemm.py --presets llama-7b --dtype float32 --tf32   # fp32 GEMMs through Triton as TF32

Per kernel, its registered op (torch.ops.mecefo_triton.*, so the timing includes the launcher)
and the torch.mm products it replaces, both timed after a first call (which autotunes Triton):

==================================  =============================================  =========================
Triton op                           GEMMs                                          torch.mm baseline
==================================  =============================================  =========================
gate_up_swiglu (store / no store)   z Wg^T, z Wu^T [T, h] from [T, d], + SwiGLU     the two mm (no epilogue)
gate_up_swiglu_bwd                  z Wg^T, z Wu^T, dy Wd [T, h], + SwiGLU bwd      the three mm
lowrank_project                     x V [T, r] from [T, d]                          x @ V
lowrank_weight_grad (split-K)       dy^T xV [h, r] over T tokens, then g V^T [h, d]  the two mm
==================================  =============================================  =========================

TFLOP/s counts the GEMMs' 2 M N K only (the epilogues are extra work Triton does for free), so
"ratio" (torch.mm time / triton time) > 1 means the fused kernel beats cuBLAS on its GEMMs alone. The
two are timed in interleaved rounds and the ratio is the median of the per-round ratios; one whose
rounds spread too much (bench/timing.py) is printed as "?" and not recorded. Rows go to
bench/results/results.csv (benchmark "gemm"). On CPU (no Triton, or the interpreter) it runs
torch.mm only, at toy sizes, to check the script.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import Recorder  # noqa: E402
from timing import MAX_RATIO_SPREAD, interleaved_rounds, paired_ratio, summary_timing  # noqa: E402

import mecefo_kernels  # noqa: E402,F401
from mecefo.presets import get_preset  # noqa: E402
from mecefo_kernels import backend as mk_backend  # noqa: E402


def gemm_cases(d: int, h: int, tokens: int, rank: int, dtype: torch.dtype, device: torch.device
               ) -> list[tuple[str, float, Callable[[], object], Callable[[], object]]]:
    """[(name, GEMM FLOPs, triton call, torch.mm call)] for one model shape."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    z, w_gate, w_up, w_down = rand(tokens, d), rand(h, d, scale=d**-0.5), rand(h, d, scale=d**-0.5), rand(d, h)
    dy, basis = rand(tokens, d), torch.linalg.qr(torch.randn(d, rank, device=device))[0]
    dy_h, xv = rand(tokens, h), rand(tokens, rank)
    basis_cast = basis.to(dtype)
    ops = torch.ops.mecefo_triton
    return [
        ("gate_up_swiglu", 2 * 2 * tokens * d * h, lambda: ops.gate_up_swiglu(z, w_gate, w_up, True),
         lambda: (torch.mm(z, w_gate.t()), torch.mm(z, w_up.t()))),
        ("gate_up_swiglu[no store]", 2 * 2 * tokens * d * h, lambda: ops.gate_up_swiglu(z, w_gate, w_up, False),
         lambda: (torch.mm(z, w_gate.t()), torch.mm(z, w_up.t()))),
        ("gate_up_swiglu_bwd", 3 * 2 * tokens * d * h, lambda: ops.gate_up_swiglu_bwd(z, w_gate, w_up, dy, w_down),
         lambda: (torch.mm(z, w_gate.t()), torch.mm(z, w_up.t()), torch.mm(dy, w_down))),
        ("lowrank_project", 2 * tokens * d * rank, lambda: ops.lowrank_project(z, basis),
         lambda: torch.mm(z, basis_cast)),
        ("lowrank_weight_grad", 2 * tokens * h * rank + 2 * h * rank * d,
         lambda: ops.lowrank_weight_grad(dy_h, xv, basis, dtype),
         lambda: torch.mm(torch.mm(dy_h.t(), xv), basis_cast.t())),
    ]


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["llama-1b", "llama-7b"] if cuda else ["tiny"])
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 256)
    parser.add_argument("--rank-fraction", type=float, default=1 / 32, help="low-rank r as a fraction of d")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 (Triton's fp32 GEMMs need it)")
    parser.add_argument("--rep-ms", type=float, default=100, help="timing budget per call and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of triton and torch.mm")
    parser.add_argument("--csv", type=Path, default=None, help="append rows here (default bench/results/results.csv)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.tf32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    # Triton only natively on a GPU: timing the interpreter would mean nothing
    with_triton = cuda and mk_backend.triton_status("cuda").ok
    recorder = Recorder(device, **({"path": args.csv} if args.csv else {}))
    print(f"# GEMM-bearing Triton kernels vs torch.mm on {recorder.env['device']}, {args.dtype}"
          f"{' (TF32 allowed)' if args.tf32 else ''}" + ("" if with_triton else "; Triton not live here: torch.mm only"))
    print(f"{'kernel':<26}{'config':<28}{'triton ms':>10}{'TFLOP/s':>9}{'torch.mm ms':>12}{'TFLOP/s':>9}{'ratio':>7}")
    for preset_name in args.presets:
        preset = get_preset(preset_name)
        d, h = preset.hidden_size, preset.intermediate_size
        rank = max(1, round(d * args.rank_fraction))
        config = f"{preset_name}:T={args.tokens},d={d},h={h},r={rank}"
        for name, flops, triton_call, mm_call in gemm_cases(d, h, args.tokens, rank, dtype, device):
            calls = {"triton": triton_call, "torch.mm": mm_call} if with_triton else {"torch.mm": mm_call}
            for call in calls.values():
                call()  # the first call autotunes (Triton) or warms cuBLAS
            rounds = interleaved_rounds(calls, device, rep_ms=args.rep_ms * args.rounds, rounds=args.rounds)
            timings = {}
            for provider, values in rounds.items():
                t = summary_timing(values)
                tflops = flops / (t.median_ms * 1e-3) / 1e12
                timings[provider] = (t.median_ms, tflops)
                recorder.add(benchmark="gemm", provider=provider, mode=name, config=config, metric="time", unit="ms",
                             median=t.median_ms, p20=t.p20_ms, p80=t.p80_ms)
                recorder.add(benchmark="gemm", provider=provider, mode=name, config=config, metric="tflops",
                             unit="TFLOP/s", median=tflops)
            tri = timings.get("triton")
            mm_ms, mm_tflops = timings["torch.mm"]
            ratio = "-"
            if tri:
                speedup = paired_ratio(rounds["torch.mm"], rounds["triton"])
                ratio = f"{speedup.median:.2f}" if speedup.supported(MAX_RATIO_SPREAD) else f"?{speedup.spread:.0%}"
                if speedup.supported(MAX_RATIO_SPREAD):
                    recorder.add(benchmark="gemm", provider="triton", mode=name, config=config,
                                 metric="speedup_vs_torch_mm", unit="x", median=speedup.median, p20=speedup.p20,
                                 p80=speedup.p80)
            print(f"{name:<26}{config:<28}{tri[0] if tri else float('nan'):>10.3f}"
                  f"{tri[1] if tri else float('nan'):>9.1f}{mm_ms:>12.3f}{mm_tflops:>9.1f}{ratio:>7}")
    if not args.no_save:
        print(f"appended {len(recorder.rows)} rows to {recorder.save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
