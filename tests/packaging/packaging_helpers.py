"""Build and install wheels of this project into scratch directories (for the packaging tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o",
                                 "_build_info.json", "runs", "cmake-build", "results", ".pytest_cache")


def copy_source(dst: Path) -> Path:
    shutil.copytree(ROOT, dst, ignore=_IGNORE)
    return dst


def _env(**overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MECEFO_")}
    env.update(overrides)
    return env


def build_wheel(src: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=900,
                          env=_env(**env))


def wheel_names(wheel_dir: Path) -> list[str]:
    (wheel,) = wheel_dir.glob("mecefo_kernels-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def install_to(wheel_dir: Path, target: Path) -> None:
    (wheel,) = wheel_dir.glob("mecefo_kernels-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)


_DROP_EDITABLE_FINDERS = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(getattr(f, '__module__', ''))]\n"
)


def run_python(code: str, pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports the package from `pythonpath` only.

    The development venv has this project installed in editable mode, whose import hook
    would otherwise resolve submodules (mecefo_kernels._C) from the source tree."""
    code = _DROP_EDITABLE_FINDERS + code
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=_env(PYTHONPATH=str(pythonpath)))
