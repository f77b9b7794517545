"""How the kernel tests decide "correct".

The oracle is float64 math written in the test from the formula. A result in a low
precision dtype is accepted when its error against the oracle is at most FACTOR times the
error of a *baseline* (the same computation done the ordinary PyTorch way in that dtype,
e.g. the HF module in bf16), plus a floor of a few ulps of the output's scale. So the
tolerance is the reference's own low-precision error, not a hand-picked atol: a kernel
that is no worse than what users run today passes, a wrong one does not.
"""

from __future__ import annotations

import torch

FACTOR = 2.0
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def live_implementations(family: str, device: str) -> list[str]:
    """The implementations of `family` that can run on `device` here (triton via the interpreter on CPU)."""
    from mecefo_kernels import backend

    return [impl for impl, a in backend.explain(family, device).items() if a.ok]


def assert_close(name: str, got: torch.Tensor, exact: torch.Tensor, baseline: torch.Tensor,
                 factor: float = FACTOR, ulps: float = 4.0) -> None:
    """|got - exact|_max <= factor * |baseline - exact|_max + ulps * eps(got.dtype) * |exact|_max."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    exact = exact.double()
    err = (got.double() - exact).abs().max().item()
    base = (baseline.double() - exact).abs().max().item()
    floor = ulps * torch.finfo(got.dtype).eps * exact.abs().max().item()
    allowed = factor * base + floor
    assert err <= allowed, (f"{name}: max error {err:.3e} vs float64 exceeds {allowed:.3e} "
                            f"({factor} x baseline error {base:.3e} + floor {floor:.3e}), dtype {got.dtype}")


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, last dimension strided by 2 (a view into a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view
