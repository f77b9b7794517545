"""Every csrc/*.cu compiles with nvcc for sm_80 and sm_90, so CUDA code that does not compile
cannot land even though CI has no GPU."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from cuda_compile import CSRC, compile_cu, nvcc_path

SOURCES = sorted(CSRC.glob("*.cu"))

pytestmark = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found (CUDA_HOME unset, no nvcc on PATH)")


def test_every_cu_file_compiles(tmp_path):
    assert SOURCES, "no csrc/*.cu found"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: (s, compile_cu(s, tmp_path)), SOURCES))
    failures = [f"--- {s.name} (exit {r.returncode})\n{r.stderr[-4000:]}" for s, r in results if r.returncode]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    for source in SOURCES:
        assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


def test_a_broken_cu_file_is_caught(tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* x) { x[threadIdx.x] = undefined_symbol; }\n")
    result = compile_cu(broken, tmp_path)
    assert result.returncode != 0
    assert "undefined_symbol" in result.stderr
