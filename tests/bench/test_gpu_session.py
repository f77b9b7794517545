"""bench/gpu_session.sh: the one-call GPU script. Its --dry-run takes minutes on 2 CPU cores (every
benchmark at toy sizes), so the tests check only that it parses and covers every kernel benchmark."""

import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import kernels  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_session.sh"


def test_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_runs_every_kernel_op():
    text = SCRIPT.read_text()
    ops = set(re.search(r"for op in ([\w ]+); do", text).group(1).split())
    ops |= set(re.findall(r"--ops (\w+)", text))
    assert ops == set(kernels.OPS)
