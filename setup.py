"""Build script for mecefo_kernels (kernel package) and mecefo (trainer package, python/).

The compiled part, ``mecefo_kernels._C``, is optional and never breaks the install:

* torch with CUDA and nvcc present -> CUDAExtension from csrc/*.cpp + csrc/*.cu
  (architectures from TORCH_CUDA_ARCH_LIST, default "8.0;9.0": A100 and H100/H200);
* CPU-only torch (or no nvcc)      -> CppExtension from csrc/*.cpp (CPU kernels);
* MECEFO_SKIP_EXT=1                -> pure Python, the Triton and PyTorch backends only.

A failed build is reported and skipped unless MECEFO_REQUIRE_EXT=1 (the project's
Makefile and CI set it, so a broken C++/CUDA source can never land). Whatever
happens, the build writes mecefo_kernels/_build_info.json, which
``python -m mecefo_kernels.info`` and the backend errors quote.

Build with ``pip install --no-build-isolation .`` so the extension is compiled
against the torch you run with.
"""

import glob
import json
import os
import sys
import traceback

from setuptools import setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py as _setuptools_build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "mecefo_kernels._C"
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _rel(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def _plan():
    """Decide what to build. Returns (ext_modules, build_ext base class, status dict)."""
    status = {"requested": True, "built": False, "with_cuda": False, "reason": ""}
    if _flag("MECEFO_SKIP_EXT"):
        status.update(requested=False, reason="MECEFO_SKIP_EXT=1 at install time")
        return [], _setuptools_build_ext, status
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing from an isolated build env, or broken
        status.update(reason=f"torch was not importable at build time ({exc!r}); "
                             "install with `pip install --no-build-isolation .`")
        return [], _setuptools_build_ext, status

    status["torch"] = torch.__version__
    cpp = _rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))))
    cu = _rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))))
    cxx_flags = ["-O3"]
    if torch.version.cuda is not None and CUDA_HOME is not None and not _flag("MECEFO_CPU_ONLY_EXT"):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        status.update(with_cuda=True, cuda=torch.version.cuda, arch_list=os.environ["TORCH_CUDA_ARCH_LIST"])
        ext = CUDAExtension(
            EXT_NAME, cpp + cu,
            define_macros=[("MECEFO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        )
    else:
        if torch.version.cuda is None:
            status["cpu_only_reason"] = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None:
            status["cpu_only_reason"] = "CUDA torch but no nvcc/CUDA_HOME found"
        else:
            status["cpu_only_reason"] = "MECEFO_CPU_ONLY_EXT=1"
        ext = CppExtension(EXT_NAME, cpp, extra_compile_args={"cxx": cxx_flags})
    return [ext], BuildExtension, status


EXT_MODULES, BUILD_BASE, BUILD_STATUS = _plan()


def _write_status(pkg_dir, status):
    os.makedirs(pkg_dir, exist_ok=True)
    with open(os.path.join(pkg_dir, "_build_info.json"), "w") as f:
        json.dump(status, f, indent=2, sort_keys=True)


class build_py(_setuptools_build_py):
    """Records the build plan when no extension is built at all (build_ext never runs then)."""

    def run(self):
        super().run()
        if not EXT_MODULES:
            in_place = getattr(self, "editable_mode", False)
            _write_status(os.path.join(ROOT if in_place else self.build_lib, "mecefo_kernels"), BUILD_STATUS)


class build_ext(BUILD_BASE):
    """Builds _C if planned, tolerates failure unless MECEFO_REQUIRE_EXT=1, records the outcome."""

    def run(self):
        status = dict(BUILD_STATUS)
        if self.extensions:
            try:
                super().run()
                status.update(built=True, reason="")
            except Exception as exc:
                if _flag("MECEFO_REQUIRE_EXT"):
                    raise
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                status.update(built=False, with_cuda=False, reason=f"build failed: {detail}")
                print("\n" + "!" * 78 + f"\nmecefo_kernels: building {EXT_NAME} FAILED; installing "
                      "without it (Triton/PyTorch backends only).\n" + detail + "\nSet "
                      "MECEFO_REQUIRE_EXT=1 to make this an error.\n" + "!" * 78 + "\n", file=sys.stderr)
        # Next to where _C lands: the source tree for --inplace/editable, build_lib otherwise.
        _write_status(os.path.dirname(self.get_ext_fullpath(EXT_NAME)), status)

    def get_outputs(self):
        pkg_dir = os.path.dirname(self.get_ext_fullpath(EXT_NAME))
        return super().get_outputs() + [os.path.join(pkg_dir, "_build_info.json")]


setup(ext_modules=EXT_MODULES, cmdclass={"build_py": build_py, "build_ext": build_ext})
