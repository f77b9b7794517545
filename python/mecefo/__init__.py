"""mecefo: a fault-tolerant data-parallel trainer (Neighbor-Do-Both with MeCeFO) on torchft."""

__version__ = "0.1.0"
