"""Low-rank bases of row-sharded weights (``--shard fsdp``): the same V on every rank of every group.

MeCeFO's basis V ``[in, r]`` is the top-r right singular vectors of an FFN weight ``M [out, in]``
(or of its AdamW first moment). Under FSDP2 rank ``i`` of a group holds rows ``M_i`` of ``M`` and
never the whole. :class:`ShardedBasis` computes V from the shards, with the group's collectives,
and hands it to ``mecefo_kernels.refresh_bases(..., basis_fn=...)``.

**Which algorithm, and why.** ``method="randomized"`` (the trainer's, mecefo_kernels' default) is a
sharded randomized SVD, the same algorithm as ``mecefo_kernels.lowrank_basis``'s on the whole
weight, with the same sketch (its fixed-seed Gaussian ``Omega [out, k]``, ``k = r + 8``, every rank
drawing it whole and using its own rows):

    Y = sum_i M_i^T Omega_i                  (all-reduce of [in, k])      Q = qr(Y)
    power_iters times: Z = sum_i M_i^T (M_i Q)   (all-reduce of [in, k])  Q = qr(Z)
    Rayleigh-Ritz: R_i = qr(M_i Q).R, gathered; R = qr([R_1; ...; R_G]).R  (so M Q = Q_blk R)
    V = Q (top-r right singular vectors of R)

In exact arithmetic every subspace equals the unsharded one's (its alternating QRs of ``M Q`` and
``M^T Q`` span ``(M^T M)^j M^T Omega`` as ours do), and the Ritz vectors are the right singular
vectors of ``M Q`` either way, so the bases agree to rounding (tested against the unsharded basis).
It moves ``in x k`` numbers per product (the 7B down projection: 11008 x 352 floats, 15 MB) and
holds nothing larger than ``[in, k]``. The alternative, the group's Gram matrix
``sum_i M_i^T M_i``, is exact but ``in x in``: 485 MB in fp32 for the 7B down projection
(``in = 11008``), all-reduced whole, then an O(in^3) eigendecomposition (~1.3 TFLOP) per
refresh, and squaring the matrix squares its condition number. It is used only where the
randomized path has nothing to gain or cannot serve: ``method="svd"`` (the exact vectors asked
for), ``r >= min(out, in)``, and a rank-deficient sketch (an all-zero matrix), as the unsharded
code falls back to an exact SVD.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .sharding import shard_rows
from .sync import local_shard

SKETCH_SEED = 0x6D6563  # mecefo_kernels.reference.lowrank's default sketch seed: the same Omega


class ShardedBasis:
    """``basis_fn`` for ``mecefo_kernels.refresh_bases`` over row-sharded matrices (module docstring).

    ``rank``, ``world_size``: this process's place in the group; ``process_group``: the group's.
    Called with a matrix sharded by rows (a DTensor, or this rank's rows as a plain tensor with
    ``rows=`` the whole matrix's row count), returns V ``[in, r]`` (orthonormal columns), the same on
    every rank.
    """

    def __init__(self, rank: int, world_size: int, process_group=None, *, oversample: int = 8, power_iters: int = 4):
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.oversample = oversample
        self.power_iters = power_iters

    def __call__(self, matrix: torch.Tensor, rank: int, *, method: str = "randomized",
                 dtype: torch.dtype | None = None, rows: int | None = None) -> torch.Tensor:
        local = local_shard(matrix)
        out_f = matrix.shape[0] if rows is None else rows
        in_f = local.shape[1]
        start, count = shard_rows(out_f, self.world_size, self.rank)
        if local.shape[0] != count:
            raise ValueError(f"rank {self.rank} holds {local.shape[0]} rows of a {out_f}-row matrix; FSDP2's "
                             f"row shards of {self.world_size} ranks give it {count}")
        if not 1 <= rank <= in_f:
            raise ValueError(f"rank={rank} is out of range for a matrix with in_features={in_f}")
        compute = torch.float64 if local.dtype == torch.float64 else torch.float32
        m = local.detach().to(compute)
        basis = None
        if method == "randomized" and rank < min(out_f, in_f):
            basis = self._randomized(m, out_f, start, rank)
        elif method not in ("randomized", "svd"):
            raise ValueError(f"method={method!r} is not supported; expected randomized or svd")
        if basis is None:
            basis = self._gram(m, rank)
        return basis.to(dtype or compute)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, group=self.process_group)
        return t

    def _randomized(self, m: torch.Tensor, out_f: int, start: int, rank: int) -> torch.Tensor | None:
        """The sharded randomized SVD; None if the sketch is rank-deficient (the caller uses the Gram)."""
        in_f = m.shape[1]
        k = min(rank + self.oversample, min(out_f, in_f))
        generator = torch.Generator(device=m.device).manual_seed(SKETCH_SEED)
        omega = torch.randn(out_f, k, generator=generator, device=m.device, dtype=m.dtype)[start:start + m.shape[0]]
        q, _ = torch.linalg.qr(self._sum(m.t() @ omega))  # [in, k]
        for _ in range(self.power_iters):
            q, _ = torch.linalg.qr(self._sum(m.t() @ (m @ q)))
        _, r_local = torch.linalg.qr(m @ q)  # [min(rows, k), k]
        padded = torch.zeros(k, k, dtype=m.dtype, device=m.device)
        padded[:r_local.shape[0]] = r_local
        if self.world_size > 1:
            gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(gathered, padded, group=self.process_group)
            _, r = torch.linalg.qr(torch.cat(gathered))
        else:
            r = padded
        _, _, vh = torch.linalg.svd(r)
        basis = (q @ vh[:rank].t()).contiguous()
        gram = basis.t() @ basis
        if (gram - torch.eye(rank, dtype=gram.dtype, device=gram.device)).abs().max() > 1e-3:
            return None  # the same test and fallback as the unsharded randomized basis (an all-zero matrix)
        return basis

    def _gram(self, m: torch.Tensor, rank: int) -> torch.Tensor:
        """Top-``rank`` eigenvectors of the group's ``sum_i M_i^T M_i`` (the exact right singular vectors; past
        the matrix's rank, null-space directions)."""
        _, vectors = torch.linalg.eigh(self._sum(m.t() @ m))  # ascending eigenvalues
        return vectors.flip(1)[:, :rank].contiguous()
