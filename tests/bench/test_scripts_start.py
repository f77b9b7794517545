"""Every bench script starts the way a user starts it: `python bench/X.py` from the repository root, in a
fresh interpreter, so bench/ is first on sys.path exactly as on the user's machine (importing a bench module
from a test does not show what a script's directory does to the imports). bench/gpu_session.sh --dry-run
(tests/bench/test_gpu_session.py) starts most of them at their smallest size; the others answer --help here.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {p.name for p in (ROOT / "bench").glob("*.py") if '__name__ == "__main__"' in p.read_text()}
IN_SESSION = set(re.findall(r"(?<![\w/])bench/(\w+\.py)\b", (ROOT / "bench" / "gpu_session.sh").read_text()))


def test_finds_the_scripts():
    assert {"kernel_bench.py", "step.py", "cluster.py", "gemm.py", "plot.py", "sanitize.py"} <= IN_SESSION <= SCRIPTS
    assert "fidelity.py" in SCRIPTS - IN_SESSION


@pytest.mark.slow  # one interpreter (torch, mecefo_kernels) per script: ~4 s each
@pytest.mark.parametrize("script", sorted(SCRIPTS - IN_SESSION))
def test_answers_help(script):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("MECEFO_")}
    proc = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
