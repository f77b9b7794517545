"""Build and install sdists and wheels of this project into scratch directories (for the packaging tests),
and read the pins of requirements files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o",
                                 "_build_info.json", "runs", "cmake-build", "results", ".pytest_cache")


def copy_source(dst: Path) -> Path:
    shutil.copytree(ROOT, dst, ignore=_IGNORE)
    return dst


def clean_env(**overrides: str) -> dict:
    """This process's environment without MECEFO_* settings, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MECEFO_")}
    env.update(overrides)
    return env


def build_sdist(src: Path, out: Path) -> Path:
    """The source distribution of the tree at src, built by setuptools' PEP 517 hook (what `python -m build
    --sdist --no-isolation` calls)."""
    out.mkdir(parents=True, exist_ok=True)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                          cwd=src, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


def sdist_names(sdist: Path) -> set[str]:
    """Files in an sdist, relative to its top directory."""
    with tarfile.open(sdist) as tf:
        return {m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile()}


def build_wheel(src: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """A wheel from a source tree or an sdist (pip unpacks it and builds as a user's install would)."""
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=900,
                          env=clean_env(**env))


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
                          env=clean_env(PYTHONPATH=str(pythonpath)))


CHECK = """
import json, torch, mecefo_kernels as mk
from mecefo_kernels import info
assert mk.__file__.startswith({target!r}), mk.__file__
report = info.collect()
x, w = torch.randn(6, 16), torch.randn(16)
ref = mk.rms_norm(x, w, backend="torch")
result = {{"extension": report["extension"], "auto_cpu": report["families"]["rmsnorm"]["cpu"]["auto"]}}
try:
    torch.testing.assert_close(mk.rms_norm(x, w, backend="cpu"), ref)
    result["cpu_backend"] = "ok"
except mk.BackendUnavailableError as exc:
    result["cpu_backend"] = str(exc)
torch.testing.assert_close(mk.rms_norm(x, w), ref)
print(json.dumps(result))
"""


def install_and_check(tmp_path: Path, wheel_dir: Path) -> dict:
    """Install the wheel into tmp_path/site, import it from there in a fresh interpreter and run RMSNorm on
    every CPU backend against the torch one: what the extension and the cpu backend report."""
    target = tmp_path / "site"
    install_to(wheel_dir, target)
    proc = run_python(CHECK.format(target=str(target)), target, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pinned_versions(requirements: Path) -> dict[str, Version]:
    """name -> version of every `name==version` line of a requirements file (other lines are skipped)."""
    found = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            req = Requirement(line)
            (spec,) = req.specifier
            found[canonicalize_name(req.name)] = Version(spec.version)
    return found
