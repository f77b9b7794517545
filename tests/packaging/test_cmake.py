"""CMakeLists.txt configures and builds csrc/ against the installed torch, and the library it
produces registers working ops when loaded with torch.ops.load_library."""

import shutil
import subprocess
import sys

import pytest
import torch
from packaging_helpers import ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")]

LOAD = """
import sys, torch
torch.ops.load_library(sys.argv[1])
x, w = torch.randn(5, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
y, rstd = torch.ops.mecefo.rmsnorm_fwd(x, w, 1e-6)
ref = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w
torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
print("ok")
"""


def test_cmake_builds_a_loadable_library(tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build),
                                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                                "-DMECEFO_WITH_CUDA=OFF"],
                               capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    compile_ = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, timeout=900)
    assert compile_.returncode == 0, compile_.stdout[-3000:] + compile_.stderr[-2000:]
    (lib,) = build.glob("libmecefo_ops.*")
    load = subprocess.run([sys.executable, "-c", LOAD, str(lib)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert load.returncode == 0 and "ok" in load.stdout, load.stderr[-2000:]
