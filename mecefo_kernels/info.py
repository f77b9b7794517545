"""`python -m mecefo_kernels.info`: which backends are live here, and why the others are not.

Prints versions (torch, triton, CUDA), how mecefo_kernels._C was built, and for every op
family the implementation ``backend="auto"`` picks for CPU and for CUDA tensors.
``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from . import __version__
from . import backend as _backend


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:
        return f"not importable ({exc.__class__.__name__})"
    return triton.__version__


def collect() -> dict:
    ext, ext_reason = _backend._load_extension()
    report = {
        "mecefo_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        _backend.ENV_VAR: os.environ.get(_backend.ENV_VAR, ""),
        "extension": {
            "loaded": ext is not None,
            "with_cuda": bool(ext is not None and ext.with_cuda),
            "reason": ext_reason,
            "build": _backend.build_info(),
        },
        "families": {},
    }
    for name in sorted(_backend.families()):
        per_device = {}
        for device_type in ("cpu", "cuda"):
            try:
                chosen = _backend.resolve(name, device_type, "auto")
            except Exception as exc:  # report, never crash the report
                chosen = f"error: {exc}"
            per_device[device_type] = {
                "auto": chosen,
                "implementations": {impl: {"ok": a.ok, "reason": a.reason}
                                    for impl, a in _backend.explain(name, device_type).items()},
            }
        report["families"][name] = per_device
    return report


def format_report(report: dict) -> str:
    ext = report["extension"]
    lines = [
        f"mecefo_kernels {report['mecefo_kernels']}  (python {report['python']})",
        f"torch   {report['torch']}  (CUDA build: {report['torch_cuda'] or 'no'})",
        f"triton  {report['triton']}" + ("  [TRITON_INTERPRET=1]" if report["TRITON_INTERPRET"] == "1" else ""),
        f"GPUs    {', '.join(report['gpus']) or 'none visible'}",
        "_C      " + ("loaded, " + ("with CUDA kernels" if ext["with_cuda"] else "CPU kernels only")
                      if ext["loaded"] else f"not loaded: {ext['reason']}"),
    ]
    if ext["loaded"] and not ext["with_cuda"] and ext["build"].get("cpu_only_reason"):
        lines.append(f"        (no CUDA kernels because {ext['build']['cpu_only_reason']})")
    if report[_backend.ENV_VAR]:
        lines.append(f"{_backend.ENV_VAR}={report[_backend.ENV_VAR]} (default request for every call)")
    lines.append("")
    lines.append(f"{'op family':<16}{'CPU tensors':<14}{'CUDA tensors':<14}")
    for name, per_device in report["families"].items():
        lines.append(f"{name:<16}{per_device['cpu']['auto']:<14}{per_device['cuda']['auto']:<14}")
    lines.append("")
    lines.append("why not the others:")
    for name, per_device in report["families"].items():
        for device_type, entry in per_device.items():
            for impl, a in entry["implementations"].items():
                if not a["ok"]:
                    lines.append(f"  {name}/{impl} on {device_type}: {a['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mecefo_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
