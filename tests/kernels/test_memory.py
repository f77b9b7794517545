"""SavedTensors, the activation-memory meter the other tests and the benchmarks rely on."""

import torch

from mecefo_kernels.memory import SavedTensors


def test_counts_distinct_activation_storages_and_leaves_out_excluded():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensors(exclude=[w]) as saved:
        h = x @ w  # saves x and w
        y = h * h  # saves h twice (same storage)
    assert saved.bytes == x.nbytes + h.nbytes
    assert any(t is w or t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for t in saved.tensors)
    assert all(t.untyped_storage().data_ptr() != w.untyped_storage().data_ptr() for t in saved.activations)
    y.sum().backward()  # what was recorded is what backward uses: unchanged


def test_sees_nothing_without_autograd():
    with SavedTensors() as saved, torch.no_grad():
        torch.randn(4, 4).exp()
    assert saved.tensors == [] and saved.bytes == 0
