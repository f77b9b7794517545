"""Drop-in modules built on the mecefo_kernels ops."""

from .rmsnorm import RMSNorm

__all__ = ["RMSNorm"]
