"""Compile csrc/*.cu with nvcc -c exactly as the extension build would, on any machine.

CPU-only torch wheels ship the c10/cuda headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h; when it is missing, a one-line stand-in (what CUDA
wheels contain) is put on the include path. Nothing else is faked: the sources must
compile against the real torch, CUDA and c10 headers for every listed architecture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = ("80", "90")


def nvcc_path() -> str | None:
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def _shim_dir(workdir: Path) -> list[str]:
    torch_include = Path(cpp_extension.include_paths()[0])
    if (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        return []
    shim = workdir / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [f"-I{workdir / 'shim'}"]


def nvcc_command(source: Path, output: Path, workdir: Path) -> list[str]:
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CSRC}"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    std = "-std=c++20" if torch.__version__ >= "2.12" else "-std=c++17"
    return [nvcc_path(), "-c", str(source), "-o", str(output), std, *_shim_dir(workdir), *includes,
            *cpp_extension.COMMON_NVCC_FLAGS, "-DMECEFO_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
            *gencode]


def compile_cu(source: Path, workdir: Path) -> subprocess.CompletedProcess:
    output = workdir / (source.stem + ".o")
    return subprocess.run(nvcc_command(source, output, workdir), capture_output=True, text=True, timeout=600)
