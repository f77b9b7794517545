"""Matmul FLOP counts of the LLaMA pieces (MECEFO.md, "What a neighbour step costs").

Used by the trainer (:mod:`mecefo.costs`: the cost of a neighbour-mode sequence when none is
measured), bench/kernel_bench.py (achieved TFLOP/s of each op) and bench/step.py (the analytic floor
of a neighbour step). Elementwise work (norms, SiLU, softmax) is left out: it is memory-bound and
measured in GB/s instead.
"""

from __future__ import annotations


def linear_flops(tokens: int, out_features: int, in_features: int) -> int:
    """y = x W^T, and equally each of its two gradients (dx = dy W, dW = dy^T x)."""
    return 2 * tokens * out_features * in_features


def lowrank_weight_grad_flops(tokens: int, out_features: int, in_features: int, rank: int) -> int:
    """dW ~= dy^T (x V) V^T: x V, dy^T (x V) and the product with V^T."""
    return 2 * tokens * rank * in_features + 2 * tokens * rank * out_features + 2 * rank * out_features * in_features


def ffn_forward_flops(tokens: int, d: int, h: int) -> int:
    """SwiGLU FFN: gate and up [h, d], down [d, h]."""
    return 3 * linear_flops(tokens, h, d)


def ffn_backward_flops(tokens: int, d: int, h: int, ranks: tuple[int, int, int] | None = None) -> int:
    """Exact (ranks None): input and weight gradients of the three projections. Neighbour mode (ranks of
    the gate, up and down bases): the gate and up recompute, the exact input gradients and the
    low-rank weight gradients."""
    input_grads = 3 * linear_flops(tokens, h, d)
    if ranks is None:
        return 2 * input_grads
    recompute = 2 * linear_flops(tokens, h, d)
    shapes = ((h, d), (h, d), (d, h))
    return recompute + input_grads + sum(lowrank_weight_grad_flops(tokens, o, i, r) for (o, i), r in zip(shapes, ranks))


def attention_forward_flops(batch: int, seq: int, d: int, kv: int) -> int:
    """Projections (q, o: [d, d]; k, v: [kv, d]) and causal attention (QK^T and PV, half of S^2 each)."""
    tokens = batch * seq
    return 2 * tokens * d * (2 * d + 2 * kv) + 2 * batch * seq ** 2 * d


def layer_forward_flops(batch: int, seq: int, d: int, h: int, kv: int) -> int:
    """One decoder layer's forward: projections, causal attention (half of S^2), SwiGLU."""
    return attention_forward_flops(batch, seq, d, kv) + ffn_forward_flops(batch * seq, d, h)


def layer_flops(batch: int, seq: int, d: int, h: int, kv: int, ranks: tuple[int, int, int] | None = None) -> int:
    """Forward + backward of one layer. Normal (ranks None): 3F. Neighbour mode (the bases' ranks): F,
    plus the FFN recompute (gate, up), the exact FFN input gradients and MeCeFO's low-rank weight
    gradients; no attention backward."""
    f = layer_forward_flops(batch, seq, d, h, kv)
    if ranks is None:
        return 3 * f
    return f + ffn_backward_flops(batch * seq, d, h, ranks)


def model_flops(batch: int, seq: int, d: int, h: int, kv: int, layers: int, vocab: int,
                ranks: tuple[int, int, int] | None = None) -> int:
    """Forward + backward of a micro-batch through the whole model: the layers and the LM head (its
    forward, input and weight gradients are exact in both modes)."""
    return layers * layer_flops(batch, seq, d, h, kv, ranks) + 6 * batch * seq * d * vocab
