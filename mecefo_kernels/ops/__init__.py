"""Op families: dispatch to an implementation, autograd Functions, functional API.

Each module registers its family with :mod:`mecefo_kernels.backend`, registers fake
(meta) implementations for the compiled ``torch.ops.mecefo.*`` ops it uses, and exposes
an autograd Function plus the functional entry point re-exported by the package.
"""
