"""What a sequence costs to run, exactly or in MeCeFO's neighbour mode: the step-time model of the plans.

A step of synchronous data parallelism lasts as long as its slowest replica. The plans
(:mod:`mecefo.membership`) predict a replica's compute time as the sum over its work of
``sequences x cost(mode) / m`` in units of a normal step's compute (own shard, exact = 1): a
sequence costs ``exact`` (1) or ``neighbour`` (the ratio of a neighbour-mode micro-batch's
forward + backward to a normal one's). The model is linear in sequences: it leaves out that small
micro-batches use an accelerator less well, and the per-step costs that no work assignment
changes (all-reduce, optimizer step), which :mod:`bench/cluster.py` adds.

Where ``neighbour`` comes from, in the trainer: ``--neighbour-cost`` if given (e.g. the
``neighbor`` / ``normal`` ratio of ``bench/step.py``'s model scope on the target GPU), else the
analytic FLOP ratio of the model at the run's sequence length and rank
(:func:`neighbour_flop_ratio`; MECEFO.md's count: ~0.70 at LLaMA-1B, seq 2048, rank 1/32). It
must be the same number on every replica (the plans must agree), so it is never measured
per replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flops import model_flops

EXACT_COST = 1.0
DEFAULT_NEIGHBOUR_COST = 0.70  # the FLOP floor of a neighbour-mode micro-batch at LLaMA-1B, seq 2048, rank 1/32


@dataclass(frozen=True)
class WorkCosts:
    """Per-sequence compute cost by mode, relative to an exact sequence."""

    exact: float = EXACT_COST
    neighbour: float = DEFAULT_NEIGHBOUR_COST

    def __post_init__(self):
        for name in ("exact", "neighbour"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"WorkCosts.{name} must be > 0, got {value}")

    def of(self, mode: str) -> float:
        if mode == "exact":
            return self.exact
        if mode == "neighbour":
            return self.neighbour
        raise ValueError(f"unknown work mode {mode!r}; expected 'exact' or 'neighbour'")


def resolve_rank(rank: int | float, in_features: int) -> int:
    """mecefo_kernels' rule: an int as is, a fraction of in_features rounded (at least 1)."""
    return rank if isinstance(rank, int) else max(1, round(rank * in_features))


def neighbour_flop_ratio(preset, seq_len: int, rank: int | float) -> float:
    """FLOPs of a neighbour-mode micro-batch over a normal one's, whole model (a :class:`ModelPreset`)."""
    d, h = preset.hidden_size, preset.intermediate_size
    kv = (preset.num_kv_heads or preset.num_heads) * preset.head_dim
    ranks = (resolve_rank(rank, d), resolve_rank(rank, d), resolve_rank(rank, h))
    shape = (1, seq_len, d, h, kv, preset.num_layers, preset.vocab_size)
    return model_flops(*shape, ranks) / model_flops(*shape)
