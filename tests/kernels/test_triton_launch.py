"""Launch decisions of the Triton kernels (mecefo_kernels/triton/launch.py), and the package's
place in the layers."""

import ast
from pathlib import Path

import pytest

from mecefo_kernels.triton import launch

ROOT = Path(__file__).resolve().parents[2]


def test_row_launch_grows_warps_with_the_row():
    """At most 16 row elements per thread up to 16384 (the AOT report shows no spills there)."""
    assert [launch.row_launch(d) for d in (48, 2048, 4096, 5000, 8192, 16384, 65536)] == [
        (64, 4), (2048, 4), (4096, 8), (8192, 16), (8192, 16), (16384, 32), (65536, 32)]
    with pytest.raises(ValueError, match="row length 65537 exceeds the Triton kernels' single-block limit 65536"):
        launch.row_launch(65537)


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
