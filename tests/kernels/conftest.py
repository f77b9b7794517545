import pytest
import torch


@pytest.fixture
def allow_tf32():
    """allow_tf32(True | False): whether fp32 matmuls may use TF32, through the switch the Triton
    launchers read (torch.backends.cuda.matmul.fp32_precision); restored after the test."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision

    def allow(on: bool) -> None:
        matmul.fp32_precision = "tf32" if on else "ieee"

    yield allow
    matmul.fp32_precision = saved
