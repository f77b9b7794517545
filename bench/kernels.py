"""Kernel microbenchmarks: every op, forward / backward / full, each live provider side by side.

    python bench/kernels.py                 # GPU if present (bf16), else a quick CPU run (fp32)
    python bench/kernels.py --ops rmsnorm --presets llama-1b --tokens 4096 8192

Times are medians with p20/p80 (triton.testing.do_bench on GPU, wall clock on CPU); each
row also goes to bench/results/results.csv. On CPU only the ratios between providers of
the same run mean anything.
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
from timing import peak_memory_bytes, time_fn  # noqa: E402

import mecefo_kernels as mk  # noqa: E402
from mecefo.presets import get_preset  # noqa: E402
from mecefo_kernels import backend as mk_backend  # noqa: E402


@dataclass
class Case:
    """One op at one shape for one provider: `run(mode)` returns a closure to time."""

    op: str
    provider: str
    config: str
    make: Callable[[str], Callable[[], object]]  # mode -> closure
    bytes_moved: Callable[[str], float] | None = None  # mode -> bytes, for GB/s


def rmsnorm_cases(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)

    def eager(a, b, eps=1e-6):
        h = a.float()
        return b * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(a.dtype)

    providers: dict[str, Callable] = {"eager": eager}
    for impl, status in mk_backend.explain("rmsnorm", device.type).items():
        if status.ok and (impl != "triton" or device.type == "cuda"):
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


OPS = {"rmsnorm": lambda preset, tokens, dtype, device: rmsnorm_cases(tokens, preset.hidden_size, dtype, device)}


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--presets", nargs="+", default=["llama-350m", "llama-1b", "llama-7b"] if cuda else ["small"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384] if cuda else [1024])
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd", "full"], choices=["fwd", "bwd", "full"])
    parser.add_argument("--csv", type=Path, default=None, help="append rows here (default bench/results/results.csv)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    recorder = Recorder(device, **({"path": args.csv} if args.csv else {}))
    print(f"# kernels on {recorder.env['device']}, {args.dtype}")
    print(f"{'op':<10}{'provider':<16}{'config':<20}{'mode':<6}{'median ms':>11}{'p20':>9}{'p80':>9}{'GB/s':>8}"
          f"{'peak MiB':>10}")
    for op in args.ops:
        for preset_name in args.presets:
            preset = get_preset(preset_name)
            for tokens in args.tokens:
                for case in OPS[op](preset, tokens, dtype, device):
                    config = f"{preset_name}:{case.config}"
                    for mode in args.modes:
                        fn = case.make(mode)
                        t = time_fn(fn, device)
                        peak = peak_memory_bytes(fn, device)
                        gbps = case.bytes_moved(mode) / (t.median_ms * 1e-3) / 1e9 if case.bytes_moved else None
                        recorder.add(benchmark=f"kernels/{op}", provider=case.provider, mode=mode, config=config,
                                     metric="time", unit="ms", median=t.median_ms, p20=t.p20_ms, p80=t.p80_ms)
                        if gbps is not None:
                            recorder.add(benchmark=f"kernels/{op}", provider=case.provider, mode=mode,
                                         config=config, metric="bandwidth", unit="GB/s", median=gbps)
                        if peak is not None:
                            recorder.add(benchmark=f"kernels/{op}", provider=case.provider, mode=mode,
                                         config=config, metric="peak_memory", unit="MiB", median=peak / 2**20)
                        print(f"{op:<10}{case.provider:<16}{case.config:<20}{mode:<6}{t.median_ms:>11.3f}"
                              f"{t.p20_ms:>9.3f}{t.p80_ms:>9.3f}{(gbps or 0):>8.1f}"
                              f"{'' if peak is None else f'{peak / 2**20:.1f}':>10}")
    if not args.no_save:
        print(f"appended {len(recorder.rows)} rows to {recorder.save()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
