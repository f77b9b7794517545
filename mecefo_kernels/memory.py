"""What autograd keeps for backward: the activation memory a micro-batch holds after its forward.

    from mecefo_kernels.memory import SavedTensors

    with SavedTensors(exclude=model.parameters()) as saved:
        loss = model(input_ids=ids, labels=ids).loss
    saved.bytes    # distinct storages saved for backward, parameters left out
    saved.tensors  # every saved tensor, in the order autograd saved them

Works on any device (it uses torch.autograd.graph.saved_tensors_hooks), which makes it the
memory measure the CPU tests and benchmarks rely on. It is blind to what
torch.utils.checkpoint keeps: checkpoint's own hooks take precedence inside its region.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SavedTensors:
    """Context manager recording the tensors autograd saves for backward inside it.

    Args:
        exclude: tensors whose storages are not activations (parameters, buffers, bases);
            tensors sharing their storage are recorded in `tensors` but not counted in `bytes`.

    Attributes (valid after entering):
        tensors: the saved tensors (kept alive by this object).
        bytes: total bytes of the distinct non-excluded storages among them (views of one
            storage count once, whole storage counted).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}
        self.tensors: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.tensors.append(t)
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    @property
    def activations(self) -> list[torch.Tensor]:
        """The saved tensors that are not views of an excluded storage."""
        return [t for t in self.tensors if t.untyped_storage().data_ptr() not in self._excluded]

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
