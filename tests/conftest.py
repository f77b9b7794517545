"""Test session set-up.

Triton kernels run on CPU through the interpreter, which must be switched on before any
kernel is defined, so this happens here, before mecefo_kernels is imported. On a machine
with a GPU the kernels run natively instead.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("MECEFO_BACKEND", None)  # tests choose backends explicitly

sys.path.insert(0, str(Path(__file__).parent))  # tests/numerics.py and friends

import mecefo_kernels  # noqa: E402,F401  (defines the ops with the interpreter set)


def pytest_report_header(config):
    from mecefo_kernels import info

    report = info.collect()
    ext = report["extension"]
    return [f"mecefo_kernels: torch {report['torch']}, triton {report['triton']}, "
            f"TRITON_INTERPRET={report['TRITON_INTERPRET'] or '0'}, _C "
            + (("CUDA" if ext["with_cuda"] else "CPU") if ext["loaded"] else f"missing ({ext['reason']})")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
