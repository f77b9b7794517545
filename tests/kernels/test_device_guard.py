"""Every Triton launch runs inside a device guard for its tensors' device.

Triton launches on the *current* CUDA device and its stream, so a launcher must make the
tensors' GPU current (cuda:1 tensors while cuda:0 is current: HF device_map="auto"). There is
no second GPU here, so the guard is spied on: every kernel launch of every registered Triton op
must happen while a guard entered for the op's device is open. Removing a guard, or launching
a new kernel outside one, fails this test."""

import contextlib

import pytest
import torch
from numerics import live_implementations
from triton_op_cases import launchable_kernels, op_cases, recorded_launches, registered_ops

import mecefo_kernels.triton as triton_package
from mecefo_kernels.triton import launch

pytestmark = pytest.mark.skipif("triton" not in live_implementations("rmsnorm", "cpu"),
                                reason="Triton kernels need TRITON_INTERPRET=1 on CPU")


def triton_modules():
    return [m for m in vars(triton_package).values()
            if getattr(m, "__name__", "").startswith(triton_package.__name__ + ".")]


@pytest.fixture
def guard_spy(monkeypatch):
    """Replaces launch.device_guard wherever the Triton modules use it by a guard that records
    the device it was entered for; yields the stack of devices whose guard is open."""
    open_guards = []

    @contextlib.contextmanager
    def spy(t):
        open_guards.append(t.device)
        try:
            yield
        finally:
            open_guards.pop()

    patched = [m for m in triton_modules() if getattr(m, "device_guard", None) is launch.device_guard]
    assert patched, "no Triton module uses launch.device_guard"
    for module in patched:
        monkeypatch.setattr(module, "device_guard", spy)
    return open_guards


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32-exact", "fp32-tf32"])
def test_every_launch_is_inside_a_guard_for_its_device(guard_spy, tf32, allow_tf32):
    allow_tf32(tf32)
    unguarded = []
    device = torch.device("cpu")

    def check(name):
        if not guard_spy or guard_spy[-1] != device:
            unguarded.append(name)

    cases = {name for dtype in (torch.bfloat16, torch.float32) for name, _ in op_cases("small", dtype)}
    assert cases == registered_ops(), "tests/triton_op_cases.py must have cases for every mecefo_triton op"
    with recorded_launches(check) as launches:
        for dtype in (torch.bfloat16, torch.float32):
            for name, args in op_cases("small", dtype):
                getattr(torch.ops.mecefo_triton, name)(*args)
    assert not unguarded, f"launched outside a device guard: {sorted(set(unguarded))}"
    if tf32:  # every kernel is reached (exact fp32 skips the GEMM kernels: cuBLAS)
        assert set(launches) == launchable_kernels(), f"not launched: {launchable_kernels() - set(launches)}"


def test_guard_makes_the_tensors_gpu_current(monkeypatch):
    """The real guard: torch.cuda.device(t.device) for a CUDA tensor, nothing for a CPU one."""
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)

    class OnSecondGpu:  # what the guard reads of a tensor on cuda:1
        device = torch.device("cuda", 1)

    with launch.device_guard(OnSecondGpu()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch.device_guard(torch.empty(1)):
        pass
    assert entered == [torch.device("cuda", 1)], "a CPU tensor must not touch the CUDA device"
