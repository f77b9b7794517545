"""bench/gpu_session.sh: the one-call GPU script, which has one 10-minute shot whenever a GPU is lent. Its
--dry-run runs every stage at toy sizes on CPU (~2.5 min on 2 cores), once for this module: every stage
that can run on CPU must pass (the package built from its sdist, bench/sanitize.py under the interpreter,
bench/gemm.py, every kernel benchmark, step, cluster, plot), and the ones that need a GPU must be reported
as skipped, with the reason. The GPU-only commands are checked as text."""

import csv
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

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
    assert re.search(r"for tool in memcheck racecheck; do\s+gpu_stage \"sanitize-\$tool\" \"[^\"]+\" \\\s+\d+ "
                     r"compute-sanitizer --tool \"\$tool\" --error-exitcode 1 \"\$PYTHON\" bench/sanitize.py", text)
    assert 'bench/gemm.py --csv "$CSV" "${GEMM_ARGS[@]}"' in text and "--tf32" in text


def session_env(out: Path, python: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("MECEFO_")}
    env.update(OUT=str(out), PYTHON=python)
    return env


def stage_table(summary: str) -> dict[str, str]:
    """The summary's last section: stage name -> the rest of its line."""
    table = summary.split("## stages\n", 1)[1]
    return {line.split()[0]: line.split(None, 1)[1] for line in table.splitlines() if line.strip()}


@pytest.mark.slow
def test_a_failed_stage_fails_the_session(tmp_path):
    """Every stage that needs Python fails here (PYTHON=false): the session still writes its summary, exits 1,
    and reports the GPU-only stages of a dry run as skipped, not failed."""
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=300,
                          env=session_env(tmp_path, "false"))
    assert proc.returncode == 1, proc.stdout[-2000:]
    stages = stage_table((tmp_path / "summary.txt").read_text())
    assert stages["build"].startswith("FAILED") and stages["kernels-residual_skip"].startswith("FAILED"), stages
    assert stages["sanitize-memcheck"].startswith("SKIPPED (no GPU)"), stages
    assert "kernels-residual_skip" in proc.stdout.splitlines()[-1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=1500,
                          env=session_env(out, sys.executable))  # the script's own budget: 1200 s
    with tarfile.open(out / "logs.tar.gz") as tf:
        tf.extractall(out / "logs", filter="data")
    return proc, out


@pytest.mark.slow
def test_dry_run_passes_every_stage_that_can_run_on_cpu(dry_run):
    proc, out = dry_run
    stages = stage_table((out / "summary.txt").read_text())
    gpu_only = {"sanitize-memcheck", "sanitize-racecheck", "fsdp-group"}
    expected = {"env", "build", "info", "tests", "sanitize-interpreter", "gemm", "gemm-tf32", "step-tiny", "cluster",
                "plot"} | {f"kernels-{op}" for op in kernel_bench.OPS} | gpu_only
    assert set(stages) == expected, stages
    not_ok = {name: rest for name, rest in stages.items() if name not in gpu_only and not rest.startswith("ok ")}
    assert not not_ok, f"{not_ok}\n{proc.stdout[-4000:]}"
    for name in gpu_only:
        assert re.match(r"SKIPPED \(no GPU\) +- +\S", stages[name]), stages[name]  # with its reason
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.slow
def test_dry_run_imports_the_package_built_from_its_sdist(dry_run):
    _, out = dry_run
    build = (out / "logs" / "logs" / "build.log").read_text()
    assert re.search(r"^imported /\S+/site/mecefo_kernels/_C\.\S+\.so$", build, re.M), build[-2000:]
    assert re.search(r"^_C +loaded", (out / "logs" / "logs" / "info.log").read_text(), re.M)


@pytest.mark.slow
def test_dry_run_outputs(dry_run):
    """The sanitizer's script ran every case under the interpreter; every benchmark wrote rows (the kernel
    benchmarks with the compiled CPU ops), and the charts were made."""
    _, out = dry_run
    sanitize = (out / "logs" / "logs" / "sanitize-interpreter.log").read_text()
    for case in ("swiglu_ffn (triton", "lowrank chain (triton, split-K)", "rms_norm (triton)"):
        assert case in sanitize, sanitize
    with (out / "gpu_rows.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    providers = {(r["benchmark"], r["provider"]) for r in rows}
    assert sum(r["benchmark"] == "gemm" and r["provider"] == "torch.mm" for r in rows) == 5 * 2 * 2, "gemm, gemm-tf32"
    for op in kernel_bench.OPS:
        assert any(b == f"kernels/{op}" for b, _ in providers), op
    assert ("kernels/rmsnorm", "mecefo-cpu") in providers
    assert any(b.startswith("step/") for b, _ in providers) and any(b.startswith("cluster/") for b, _ in providers)
    assert {"kernels_cpu.png", "step_cpu.png", "cluster_cpu.png"} <= {p.name for p in out.iterdir()}
