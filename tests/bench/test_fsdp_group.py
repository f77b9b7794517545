"""bench/fsdp_group.py (gpu_session.sh's fsdp-group stage) on 2 CPU processes over gloo: its checks pass and
it writes its rows; the session runs it only with 2+ GPUs and says why not otherwise."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_session_runs_a_two_rank_fsdp_group_or_says_why_not():
    text = (BENCH / "gpu_session.sh").read_text()
    assert 'elif [ "$GPU_COUNT" -ge 2 ]; then\n    run_stage fsdp-group' in text
    assert "skipped: this machine has $GPU_COUNT GPU(s); a 2-rank FSDP group needs 2" in text


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
