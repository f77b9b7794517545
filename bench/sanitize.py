"""Small-shape runs of the kernels that compute-sanitizer checks in bench/gpu_session.sh.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/sanitize.py
    TRITON_INTERPRET=1 python bench/sanitize.py     # on CPU: the same calls, to check the script

What runs, forward and backward, with odd sizes so that every masked edge is exercised:
* the fused SwiGLU FFN on the triton backend: recompute (the backward's GEMM with the SwiGLU
  backward epilogue) and saved pre-activations, with low-rank bases;
* the low-rank chain on the triton backend: lowrank_linear, and dy^T (x V) split over the
  tokens (the split-K partials), which a small shape would not split by itself;
* RMSNorm on the triton and cuda backends: the CUDA backward keeps per-block dweight partials
  in shared memory without barriers (each thread owns its columns), which racecheck checks;
  both its vectorised (d % 8 == 0) and scalar (odd d) variants.
Every Triton launch autotunes over all its configs first, so every config runs under the tool.
Values are checked against the torch backend, so a wrong answer fails here too.
"""

from __future__ import annotations

import argparse
import sys

import torch

import mecefo_kernels as mk
from mecefo_kernels import backend as mk_backend


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-6
    if not err <= 0.05 * scale:  # bf16 sanity bound; the test suite checks the real tolerance
        raise AssertionError(f"{name}: max error {err:.3g} against the torch backend (scale {scale:.3g})")


def grads(fn, *tensors: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [t.grad for t in leaves]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    live = {impl for impl, status in mk_backend.explain("swiglu_ffn", device.type).items() if status.ok}
    torch.manual_seed(0)
    t, d, h = 37, 48, 80

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    x, w_gate, w_up, w_down = rand(t, d), rand(h, d, scale=0.15), rand(h, d, scale=0.15), rand(d, h, scale=0.1)
    norm_weight = rand(d) + 1
    bases = tuple(mk.lowrank_basis(w, r) for w, r in ((w_gate, 8), (w_up, 8), (w_down, 16)))
    ran = []
    if "triton" in live:
        for recompute in (True, False):
            def ffn(x, wg, wu, wd, nw, backend):
                return mk.swiglu_ffn(x, wg, wu, wd, norm_weight=nw, recompute=recompute, bases=bases, backend=backend)
            want = grads(lambda *a: ffn(*a, "torch"), x, w_gate, w_up, w_down, norm_weight)
            got = grads(lambda *a: ffn(*a, "triton"), x, w_gate, w_up, w_down, norm_weight)
            for i, (g, w) in enumerate(zip(got, want)):
                close(f"swiglu_ffn recompute={recompute} output {i}", g, w)
        ran.append("swiglu_ffn (triton, recompute and saved, low-rank)")

        basis = mk.lowrank_basis(w_gate, 8)
        want = grads(lambda a, w: mk.lowrank_linear(a, w, basis, backend="torch"), x, w_gate)
        got = grads(lambda a, w: mk.lowrank_linear(a, w, basis, backend="triton"), x, w_gate)
        for i, (g, w) in enumerate(zip(got, want)):
            close(f"lowrank_linear output {i}", g, w)
        from mecefo_kernels.triton.lowrank import _matmul

        dy, xv = rand(1100, h), rand(1100, 8)
        close("dy^T xV split over K", _matmul(dy.t(), xv, dtype, programs=64), dy.float().t() @ xv.float())
        ran.append("lowrank chain (triton, split-K)")

    for impl in sorted(live & {"triton", "cuda"}):
        for width in (48, 130):  # 16-byte packs; an odd width falls back to 2-byte accesses
            rows, w = rand(t, width), rand(width) + 1
            want = grads(lambda a, b: mk.rms_norm(a, b, backend="torch"), rows, w)
            got = grads(lambda a, b, impl=impl: mk.rms_norm(a, b, backend=impl), rows, w)
            for i, (g, ref) in enumerate(zip(got, want)):
                close(f"rms_norm {impl} d={width} output {i}", g, ref)
        ran.append(f"rms_norm ({impl})")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"ran on {device}: " + ("; ".join(ran) if ran else "nothing (neither triton nor cuda is live here)"))
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
