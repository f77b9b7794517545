"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (Triton's bundled ptxas, no GPU),
with the real constexprs of every autotune config, in bf16 / fp16 / fp32 at small and LLaMA
shapes, and fits the GPU: shared memory within the per-block limit, and RMSNorm spill-free up
to d = 8192. Register spills of every compile are reported as a warning.

The compiles run in a subprocess (tests/packaging/triton_aot.py) because the test session sets
TRITON_INTERPRET=1, under which @triton.jit functions are interpreted objects. Which kernels
and arguments: every registered mecefo_triton op through its real launcher with the cases of
tests/triton_op_cases.py, so a new kernel is covered as soon as an op launches it, and fails
the coverage check below if none does. 426 compiles, ~4 CPU minutes (2 workers)."""

import json
import os
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

# minutes on 2 idle cores; much longer when other jobs share them
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "triton_aot.py"


def run_script(script: Path, args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # cold: every compile runs ptxas
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=3500,
                          env=env, cwd=HERE)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton-aot")
    proc = run_script(SCRIPT, ["--json", str(tmp / "report.json")], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((tmp / "report.json").read_text())
    spills = [c for c in result["compiles"] if c["spill_bytes"]]
    if spills:
        worst = sorted(spills, key=lambda c: -c["spill_bytes"])[:8]
        warnings.warn(f"{len(spills)} of {len(result['compiles'])} Triton compiles spill registers; worst: " + "; ".join(
            f"{c['kernel']} {c['target']} {c['dtype']} {c['num_warps']}w "
            f"{ {k: v for k, v in c['constexprs'].items() if k.startswith('BLOCK')} } {c['spill_bytes']} B"
            for c in worst) + " (python tests/packaging/triton_aot.py prints them all)", stacklevel=1)
    return result


def test_every_kernel_compiles_for_sm80_and_sm90(report):
    assert not report["launch_errors"], report["launch_errors"]
    failed = [f"{c['kernel']} {c['target']} {c['dtype']} {c['constexprs']}: {c['error']}"
              for c in report["compiles"] if c["error"]]
    assert not failed, "\n".join(failed[:10])
    assert set(report["launched"]) == set(report["kernels"]), \
        f"kernels no op case launches: {sorted(set(report['kernels']) - set(report['launched']))}"
    per_kernel = defaultdict(set)
    for c in report["compiles"]:
        per_kernel[c["kernel"]].add((c["target"], c["dtype"]))
    for kernel, combos in per_kernel.items():
        assert combos == {(t, d) for t in ("sm_80", "sm_90") for d in ("bf16", "fp16", "fp32")}, (kernel, combos)


def test_every_autotune_config_is_compiled(report):
    """Each config of each GPU autotune list, for both targets (bf16: the lists as written; fp32
    halves BLOCK_K, launch.block_k_for_operand_size)."""
    assert report["autotune_configs"], "no autotuned kernel found"

    def signature(meta: dict) -> tuple:
        return tuple(sorted(meta.items()))

    for kernel, configs in report["autotune_configs"].items():
        listed = {signature(c) for c in configs}
        for target in ("sm_80", "sm_90"):
            compiled = set()
            for c in report["compiles"]:
                if c["kernel"] == kernel and c["target"] == target and c["dtype"] == "bf16":
                    meta = {k: v for k, v in c["constexprs"].items() if k in configs[0]}
                    compiled.add(signature(meta | {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}))
            assert compiled == listed, (kernel, target, listed - compiled)


def test_shared_memory_fits_the_target(report):
    """A config past the per-block limit cannot launch (the autotuner would skip it, or fail when
    all do): sm_80 163 KB, sm_90 227 KB."""
    over = [f"{c['kernel']} {c['target']} {c['dtype']} {c['constexprs']}: {c['shared_bytes']} B"
            for c in report["compiles"] if c["shared_bytes"] > c["max_shared_bytes"]]
    assert not over, "\n".join(over)


def test_rmsnorm_does_not_spill_up_to_8192(report):
    rows = [c for c in report["compiles"] if c["kernel"].startswith("rmsnorm.")]
    assert {c["constexprs"]["BLOCK_D"] for c in rows} >= {4096, 8192}
    spilling = [f"{c['kernel']} {c['target']} {c['dtype']} BLOCK_D={c['constexprs']['BLOCK_D']} "
                f"{c['num_warps']} warps: {c['spill_bytes']} B" for c in rows if c["spill_bytes"]]
    assert not spilling, spilling


BROKEN = """
import torch, triton, triton.language as tl
import triton_aot

@triton.jit
def broken_kernel(X, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), tl.zeros((BLOCK,), dtype=tl.float32) + undefined_name)

with triton_aot.Capture() as capture:
    broken_kernel[(1,)](torch.empty(64), BLOCK=64)
(record, *_), = [triton_aot.compile_all(capture, workers=1)]
print("ERROR" if record.error and "undefined_name" in record.error else "NO ERROR", record.target)
"""


def test_a_kernel_that_does_not_compile_is_caught(tmp_path):
    script = tmp_path / "broken_kernel.py"  # @triton.jit needs its source in a file
    script.write_text(BROKEN)
    proc = run_script(script, [], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "ERROR", proc.stdout
