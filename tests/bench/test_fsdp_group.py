"""bench/fsdp_group.py (gpu_session.sh's fsdp-group stage) on 2 CPU processes over gloo: its checks pass and
it writes its rows; the session runs it only with 2+ GPUs and says why not otherwise."""

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_session_runs_a_two_rank_fsdp_group_or_says_why_not():
    """With 2+ GPUs the stage runs (gpu_stage: skipped with its reason in a dry run); with fewer it is recorded as
    skipped with the reason, and such a skip does not fail the session (test_gpu_session.py runs the dry run)."""
    text = (BENCH / "gpu_session.sh").read_text()
    assert 'if [ "$DRY_RUN" = 0 ] && [ "$GPU_COUNT" -lt 2 ]; then' in text
    assert '"SKIPPED ($GPU_COUNT GPU)" "-" \\\n        "this machine has $GPU_COUNT GPU(s); a 2-rank FSDP group needs 2"' in text
    assert re.search(r'gpu_stage fsdp-group "[^"]+" \\\s+\d+ "\$PYTHON" -m torch.distributed.run --nproc-per-node 2 '
                     r'[^\n]+\\\s+bench/fsdp_group.py --csv "\$CSV" --device cuda', text)
    assert r"SKIPPED \((no|[01]) GPU\)" in text  # a skip is not a failure


@pytest.mark.slow
def test_fsdp_group_bench_passes_on_two_cpu_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    csv = tmp_path / "rows.csv"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), str(BENCH / "fsdp_group.py"), "--device", "cpu",
                           "--preset", "tiny", "--seq", "32", "--steps", "2", "--csv", str(csv)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "fsdp group: PASS" in proc.stdout and "checkpoint round trip  bit for bit" in proc.stdout
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + 6 and all(",fsdp-group,mecefo," in "," + r for r in rows[1:])
