"""Plain PyTorch implementations of every primitive: the CPU path and the tests' twin.

They mirror the compiled and Triton kernels op for op (same inputs, same outputs, same
accumulation dtype), so any backend can be swapped for any other.
"""
