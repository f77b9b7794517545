"""No module in a directory that ends up on sys.path may be named like a module the installed packages import.

A script's directory comes first on sys.path (`python bench/step.py`; the bench scripts also insert bench/
themselves), and pytest puts every test directory there (tests/conftest.py adds tests/). A module in such
a directory replaces the real one for every import in the process: bench/kernels.py replaced Hugging
Face's `kernels` package, which transformers 5.25 imports (`from kernels import CUDAProperties`), so
every benchmark that built a LLaMA failed, and every test after tests/bench had been collected.

Three lists of names, each independent of this repository: the standard library's modules, the top-level
names of every installed distribution (importlib.metadata), and the top-level names that the installed
distributions' own sources import. The last one sees optional imports of packages that are not installed:
transformers 5.23, which requirements/cpu.txt pins, already imports `kernels` when it is available.
Directories count only when they are regular packages (an `__init__.py`): a namespace directory such as
tests/kernels/ never wins over an installed package.
"""

import importlib.metadata as metadata
import re
import sys
from functools import lru_cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the scan reads every installed .py file: ~3-5 s

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_DIRS = ("bench", "examples")  # started as `python DIR/x.py`; tests/ is walked whole below
OWN_DISTRIBUTIONS = {"mecefo-kernels", "mecefo_kernels"}

# `import a.b, c as d` and `from a.b import x` at the start of a line (in code or in a docstring: a false
# alarm names its file, a miss would be silent)
_IMPORT = re.compile(rb"^[ \t]*(?:from[ \t]+([A-Za-z_]\w*)[\w.]*[ \t]+import\b|import[ \t]+([A-Za-z_][\w.]*(?:[ \t]*,[ \t]*[A-Za-z_][\w.]*"
                     rb"(?:[ \t]+as[ \t]+\w+)?)*))", re.M)


def path_directories() -> list[Path]:
    """bench/, examples/, and every directory under tests/ that holds Python files."""
    dirs = [ROOT / d for d in SCRIPT_DIRS if (ROOT / d).is_dir()]
    dirs += sorted({p.parent for p in (ROOT / "tests").rglob("*.py") if "__pycache__" not in p.parts})
    return dirs


def module_names(directory: Path) -> dict[str, Path]:
    """Top-level names a directory on sys.path provides: its .py files and its regular packages."""
    names = {p.stem: p for p in directory.glob("*.py")}
    names |= {p.parent.name: p.parent for p in directory.glob("*/__init__.py")}
    return names


def _distributions():
    return [d for d in metadata.distributions() if d.metadata["Name"] not in OWN_DISTRIBUTIONS]


@lru_cache(maxsize=None)
def imported_names() -> dict[str, str]:
    """Top-level module name -> one installed source file that imports it."""
    found: dict[str, str] = {}
    for dist in _distributions():
        for file in dist.files or ():
            if file.suffix != ".py":
                continue
            try:
                text = Path(dist.locate_file(file)).read_bytes()
            except OSError:
                continue
            for from_name, import_list in _IMPORT.findall(text):
                heads = [from_name] if from_name else [part.split()[0] for part in import_list.split(b",")]
                for head in heads:
                    found.setdefault(head.split(b".")[0].decode(), str(file))
    return found


def taken_names() -> dict[str, str]:
    """Every name a module on sys.path must not have -> why."""
    taken = {name: f"imported by {where}" for name, where in imported_names().items()}
    taken |= {name: f"top-level name of the installed {', '.join(dists)}"
              for name, dists in metadata.packages_distributions().items()
              if not OWN_DISTRIBUTIONS & set(dists)}
    taken |= {name: "a standard-library module" for name in sys.stdlib_module_names}
    return taken


def test_the_scan_sees_the_name_that_broke_the_benchmarks():
    """transformers imports `kernels` (Hugging Face's hub kernels) whether or not it is installed."""
    pytest.importorskip("transformers")
    assert "kernels" in imported_names(), sorted(imported_names())[:50]
    assert "torch" in taken_names() and "json" in taken_names()


def test_no_module_on_sys_path_shadows_an_installed_or_imported_one():
    taken = taken_names()
    checked, clashes = [], []
    for directory in path_directories():
        for name, path in sorted(module_names(directory).items()):
            checked.append(name)
            if name in taken and name != "conftest":  # pytest imports every conftest.py by path
                clashes.append(f"{path.relative_to(ROOT)}: {name!r} is {taken[name]}")
    assert {"kernel_bench", "step", "records", "timing", "numerics"} <= set(checked), checked
    assert not clashes, "rename these modules:\n" + "\n".join(clashes)
