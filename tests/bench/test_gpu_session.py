"""bench/gpu_session.sh: the one-call GPU script. Its --dry-run takes minutes on 2 CPU cores (every
benchmark at toy sizes), so the tests check that it parses and covers every kernel benchmark, and
run the two scripts it adds for the first GPU session (bench/sanitize.py, bench/gemm.py) on CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import kernel_bench  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh"


def test_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_runs_every_kernel_op():
    text = SCRIPT.read_text()
    ops = set(re.search(r"for op in ([\w ]+); do", text).group(1).split())
    ops |= set(re.findall(r"--ops (\w+)", text))
    assert ops == set(kernel_bench.OPS)


def test_sanitizes_and_times_the_gemm_kernels():
    """The GPU run puts bench/sanitize.py under compute-sanitizer's memcheck and racecheck, and
    times every GEMM-bearing Triton kernel against torch.mm (bench/gemm.py), bf16 and fp32/TF32."""
    text = SCRIPT.read_text()
    assert re.search(r"for tool in memcheck racecheck; do\s+run_stage \"sanitize-\$tool\" \d+ compute-sanitizer "
                     r"--tool \"\$tool\" --error-exitcode 1 \"\$PYTHON\" bench/sanitize.py", text)
    assert 'bench/gemm.py --csv "$CSV" "${GEMM_ARGS[@]}"' in text and "--tf32" in text


def test_sanitize_script_runs_every_case(tmp_path):
    """bench/sanitize.py itself, on CPU through the interpreter (what the dry run does): the Triton
    FFN, the low-rank chain with split-K and RMSNorm run and match the torch backend."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "sanitize.py")], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in ("swiglu_ffn (triton", "lowrank chain (triton, split-K)", "rms_norm (triton)"):
        assert case in proc.stdout, proc.stdout


def test_gemm_bench_runs_on_cpu(tmp_path):
    """bench/gemm.py on CPU (torch.mm only: the interpreter is no benchmark) writes its rows."""
    csv = tmp_path / "rows.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "gemm.py"), "--rep-ms", "1", "--csv", str(csv)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 5 * 2 and all(",gemm,torch.mm," in "," + r for r in rows[1:]), rows[:3]
