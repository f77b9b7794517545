"""Which collective library a replica group uses inside itself and across groups (a pure choice, tested on CPU).

On CPU everything is gloo. With ``--device cuda`` gradients, FSDP2's all-gathers and
reduce-scatters and the state a healing group receives are CUDA tensors: gloo would stage each of
them through host memory, so CUDA jobs use NCCL.

* **Inside a group**: torch.distributed's NCCL (``cpu:gloo,cuda:nccl``: gloo still carries the
  few CPU-side collectives, e.g. a sharded checkpoint's coordination). A group is restarted as a
  whole when one of its ranks dies, so its collectives need no recovery of their own.
* **Across groups**: torchft's reconfigurable process groups, whose collectives must *fail* (not
  hang) when a peer group dies, so the survivors discard the step and go on. torchft 0.2.0 has two:

  - ``ProcessGroupNCCL``: NCCL in this process with non-blocking communicators; a collective
    that outlives the timeout is aborted with ``ncclCommAbort`` from a Python-side watchdog
    (``context_timeout`` / ``stream_timeout``), and ``errored()`` reports it. Needs NCCL >= 2.25
    (torchft checks ``torch.cuda.nccl.version() >= (2, 25)``); with older NCCL it does not abort
    at all and, as its docstring warns, may deadlock.
  - ``ProcessGroupBabyNCCL``: NCCL in a child process; a hung collective times out in the parent
    (``pipe.recv(timeout)``) and the child is killed when the group is reconfigured, which always
    works, at the price of a second CUDA context (~1 GB of GPU memory per rank) and no overlap of
    communication with compute (the two contexts time-share the GPU). Its ``abort()`` is a no-op.

  The choice: ``ProcessGroupNCCL`` where its abort works (NCCL >= 2.25: no extra memory, overlap
  kept), ``ProcessGroupBabyNCCL`` with older NCCL (killing the child is the only reliable abort).
"""

from __future__ import annotations

from dataclasses import dataclass

NCCL_ABORT_MIN = (2, 25)  # torchft's ProcessGroupNCCL uses ncclCommAbort from this NCCL version on


@dataclass(frozen=True)
class Backends:
    """``intra``: torch.distributed's backend string inside a group; ``cross``: which torchft process group
    across groups (``gloo``, ``nccl``, ``baby-nccl``); ``device``: where cross-group tensors and the heal's
    transfers live; ``why``: one line for the logs."""

    intra: str
    cross: str
    device: str
    why: str


def choose_backends(device_type: str, nccl_version: tuple[int, ...] | None = None) -> Backends:
    """The collective libraries for ``device_type`` (``cpu`` or ``cuda``), given the NCCL version torch was
    built with (``torch.cuda.nccl.version()``; None: no NCCL)."""
    if device_type == "cpu":
        return Backends("gloo", "gloo", "cpu", "CPU tensors: gloo inside and across groups")
    if device_type != "cuda":
        raise ValueError(f"device must be cpu or cuda, got {device_type!r}")
    if nccl_version is None:
        raise ValueError("--device cuda: this torch has no NCCL (torch.cuda.nccl.version() failed); a CUDA job "
                         "needs a CUDA build of torch")
    version = ".".join(map(str, nccl_version))
    if tuple(nccl_version) >= NCCL_ABORT_MIN:
        return Backends("cpu:gloo,cuda:nccl", "nccl", "cuda",
                        f"NCCL {version}: torchft's ProcessGroupNCCL across groups (ncclCommAbort on a hung collective)")
    return Backends("cpu:gloo,cuda:nccl", "baby-nccl", "cuda",
                    f"NCCL {version} < {'.'.join(map(str, NCCL_ABORT_MIN))} cannot abort a hung collective: torchft's "
                    "ProcessGroupBabyNCCL across groups (NCCL in a child process, killed on a hang; ~1 GB more GPU "
                    "memory per rank)")


def local_backends(device_type: str) -> Backends:
    """:func:`choose_backends` for this process's torch."""
    version = None
    if device_type == "cuda":
        import torch

        try:
            version = torch.cuda.nccl.version()
        except Exception:  # noqa: BLE001 - a build without NCCL
            version = None
        if isinstance(version, int):  # old torch: one integer, e.g. 2708 for 2.7.8
            version = (version // 1000, version // 100 % 10, version % 100)
    return choose_backends(device_type, version)
