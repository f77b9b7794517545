"""Launch decisions of the Triton kernels (mecefo_kernels/triton/launch.py): TF32, split-K,
row blocks, autotune keys, and the package's place in the layers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import live_implementations

from mecefo_kernels.triton import launch

ROOT = Path(__file__).resolve().parents[2]

TF32_SWITCHES = """
import torch
from mecefo_kernels.triton.launch import tf32_allowed
m = torch.backends.cuda.matmul
seen = [tf32_allowed()]
m.allow_tf32 = True; seen.append(tf32_allowed())
m.allow_tf32 = False; seen.append(tf32_allowed())
torch.set_float32_matmul_precision("high"); seen.append(tf32_allowed())
torch.set_float32_matmul_precision("medium"); seen.append(tf32_allowed())
torch.set_float32_matmul_precision("highest"); seen.append(tf32_allowed())
m.fp32_precision = "tf32"; seen.append(tf32_allowed())
m.fp32_precision = "ieee"; seen.append(tf32_allowed())
m.fp32_precision = "none"; torch.backends.fp32_precision = "tf32"; seen.append(tf32_allowed())
print(seen)
"""


def test_tf32_follows_torch_switches():
    """Every way torch offers to allow TF32 for fp32 matmuls, legacy and new, in one fresh process
    (mixing the two APIs makes reading allow_tf32 raise, which must not leak into other tests)."""
    proc = subprocess.run([sys.executable, "-c", TF32_SWITCHES], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str([False, True, False, True, True, False, True, False, True])


def test_split_k_rule():
    """Split only when the output's tiles cannot fill the device and K is long; every split a
    multiple of 128 long, and the splits cover K exactly."""
    # LLaMA-7B on an H100 (132 SMs: 264 programs). g = dy^T xV for Wd (4096 x r=128) and Wg (11008 x 128):
    assert launch.split_k(4096, 128, 8192, 264) == (8, 1024)
    assert launch.split_k(11008, 128, 8192, 264) == (4, 2048)
    assert launch.split_k(8192, 128, 4096, 264) == (5, 896)  # x V at 8192 tokens: 64 tiles, K = 4096 features
    assert launch.split_k(4096, 4096, 128, 264) == (1, 128)  # g V^T: short K, 1024 tiles
    assert launch.split_k(4096, 128, 1000, 264) == (1, 1000)  # K too short to split
    for m, n, k in ((4096, 128, 8191), (300, 64, 100_000), (11008, 256, 3000)):
        splits, per = launch.split_k(m, n, k, 264)
        assert splits == 1 or per % 128 == 0
        assert (splits - 1) * per < k <= splits * per


def test_row_launch_grows_warps_with_the_row():
    """At most 16 row elements per thread up to 16384 (the AOT report shows no spills there)."""
    assert [launch.row_launch(d) for d in (48, 2048, 4096, 5000, 8192, 16384, 65536)] == [
        (64, 4), (2048, 4), (4096, 8), (8192, 16), (8192, 16), (16384, 32), (65536, 32)]
    with pytest.raises(ValueError, match="row length 65537 exceeds the Triton kernels' single-block limit 65536"):
        launch.row_launch(65537)


def autotune_keys(kernel, monkeypatch):
    """Record the autotune key of each launch of `kernel`: its key arguments, as Triton's
    Autotuner computes it (plus the dtypes of the tensors, which it appends)."""
    keys = []
    run = kernel.run

    def recording_run(*args, **kwargs):
        named = dict(zip(kernel.arg_names, args)) | kwargs
        keys.append(tuple(named[k] for k in kernel.keys))
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", recording_run)
    return keys


@pytest.mark.skipif("triton" not in live_implementations("swiglu_ffn", "cpu"), reason="needs TRITON_INTERPRET=1")
def test_autotune_keys_bucket_the_tokens(monkeypatch):
    """A config tuned for one token count serves every count in its power-of-two bucket (no
    re-tune per batch shape), but not other buckets; the forward keys on store_preact too."""
    from mecefo_kernels.triton import lowrank, swiglu

    fwd = autotune_keys(swiglu._gate_up_swiglu_fwd_kernel, monkeypatch)
    bwd = autotune_keys(swiglu._gate_up_swiglu_bwd_kernel, monkeypatch)
    mm = autotune_keys(lowrank._matmul_kernel, monkeypatch)
    w_gate, w_up, w_down, basis = torch.randn(40, 24), torch.randn(40, 24), torch.randn(16, 40), torch.randn(24, 4)
    for tokens in (37, 50, 70):
        z = torch.randn(tokens, 24).bfloat16()
        for store in (True, False):
            torch.ops.mecefo_triton.gate_up_swiglu(z, w_gate.bfloat16(), w_up.bfloat16(), store)
        torch.ops.mecefo_triton.gate_up_swiglu_bwd(z, w_gate.bfloat16(), w_up.bfloat16(),
                                                   torch.randn(tokens, 16).bfloat16(), w_down.bfloat16())
        torch.ops.mecefo_triton.lowrank_project(z, basis)
    assert fwd[0] == fwd[2] != fwd[4] and fwd[1] == fwd[3] != fwd[5], fwd  # 37 ~ 50 (64), 70 (128)
    assert fwd[0] != fwd[1], "store_preact must be part of the key"
    assert bwd[0] == bwd[1] != bwd[2], bwd
    assert mm[0] == mm[1] != mm[2], mm


def test_triton_package_does_not_import_backend():
    """Layers stay one-way: backend.py imports mecefo_kernels.triton (to check it loads), so the
    Triton package must not import backend.py (the interpreter flag lives in interpreter.py)."""
    offenders = []
    for path in sorted((ROOT / "mecefo_kernels" / "triton").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):  # from ..backend import x, from .. import backend
                imported = [node.module or ""] if node.module else [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                continue
            if any(name.split(".")[-1] == "backend" for name in imported):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"mecefo_kernels/triton imports backend.py at {offenders}"
