"""Tiny LLaMA models for the layer tests, and LLaMA written out as plain tensor math.

``forward`` is an independent implementation of transformers' LlamaForCausalLM (RoPE, GQA,
causal softmax attention, SwiGLU, RMSNorm, shifted cross-entropy) from the model's
parameters. With ``neighbor_bases`` it computes the MeCeFO neighbour-mode gradients from
their definition (MECEFO.md): the attention branches are evaluated on detached values (the
backward goes through the residual only) and the FFN weight gradients are
dW = dY^T (X V) V^T, built from the gradients autograd delivers at each FFN weight's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYER_PARAMS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                "input_layernorm.weight", "post_attention_layernorm.weight")
FFN_WEIGHTS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
SKIPPED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
           "self_attn.o_proj.weight", "input_layernorm.weight")


def tiny_config(layers: int = 2, **overrides):
    """d 48, FFN 80, 4 heads of 12 with 2 KV heads (GQA), vocab 67: odd sizes, runs in milliseconds."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=67, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attn_implementation="sdpa")
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_model(config=None, dtype=torch.float32, device="cpu", seed=0):
    """A LlamaForCausalLM with norm weights drawn around 1 (so their gradients are exercised)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config or tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.to(device=device, dtype=dtype)


def batch(config, batch_size=2, seq=9, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch_size, seq), generator=g).to(device)


def rms_norm(x, w, eps):
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return w * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention(x, p, config):
    """Causal multi-head attention with RoPE and grouped KV heads; x [B, S, d] -> [B, S, d]."""
    b, s, _ = x.shape
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    hd = config.hidden_size // nh
    theta = config.rope_parameters["rope_theta"]
    # RoPE tables in float32 whatever the model's dtype, as LLaMA defines them
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd)
    freqs = torch.arange(s, dtype=torch.float32, device=x.device)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    q = (x @ p["self_attn.q_proj.weight"].t()).view(b, s, nh, hd).transpose(1, 2)
    k = (x @ p["self_attn.k_proj.weight"].t()).view(b, s, nkv, hd).transpose(1, 2)
    v = (x @ p["self_attn.v_proj.weight"].t()).view(b, s, nkv, hd).transpose(1, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")).float(), dim=-1).to(x.dtype)
    return (probs @ v).transpose(1, 2).reshape(b, s, nh * hd) @ p["self_attn.o_proj.weight"].t()


def forward(params: dict, ids: torch.Tensor, config, neighbor_bases: list | None = None):
    """-> (logits, loss, ffn_grads).

    params: name -> tensor as in model.named_parameters() (leaves; those that require grad get
    .grad from loss.backward()). neighbor_bases: None for the ordinary model; else per layer
    (V_gate, V_up, V_down) and the neighbour graph is built. Then the FFN weights must not
    require grad, and after loss.backward() ``ffn_grads()`` returns {name: low-rank dW}.
    """
    eps = config.rms_norm_eps
    x = params["model.embed_tokens.weight"][ids]
    taps = []
    for i in range(config.num_hidden_layers):
        p = {n: params[f"model.layers.{i}.{n}"] for n in LAYER_PARAMS}
        if neighbor_bases is None:
            h = x + attention(rms_norm(x, p["input_layernorm.weight"], eps), p, config)
        else:
            with torch.no_grad():
                a = attention(rms_norm(x, p["input_layernorm.weight"], eps), p, config)
            h = x + a
        z = rms_norm(h, p["post_attention_layernorm.weight"], eps)
        gate = z @ p["mlp.gate_proj.weight"].t()
        up = z @ p["mlp.up_proj.weight"].t()
        act = F.silu(gate) * up
        out = act @ p["mlp.down_proj.weight"].t()
        if neighbor_bases is not None:
            for t in (gate, up, out):
                t.retain_grad()
            taps.append((i, z, act, gate, up, out, neighbor_bases[i]))
        x = h + out
    x = rms_norm(x, params["model.norm.weight"], eps)
    logits = x @ params["lm_head.weight"].t()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
                           ids[:, 1:].flatten())

    def ffn_grads() -> dict:
        grads = {}
        for i, z, act, gate, up, out, (vg, vu, vd) in taps:
            for name, dy, xin, v in (("gate_proj", gate.grad, z, vg), ("up_proj", up.grad, z, vu),
                                     ("down_proj", out.grad, act, vd)):
                dy2, x2, v2 = dy.flatten(0, 1), xin.detach().flatten(0, 1), v.to(dy.dtype)
                grads[f"model.layers.{i}.mlp.{name}.weight"] = (dy2.t() @ (x2 @ v2)) @ v2.t()
        return grads

    return logits, loss, ffn_grads


def leaf_params(model, dtype=None, ffn_requires_grad=True) -> dict:
    """Detached copies of model's parameters (optionally cast) as fresh leaves."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().to(dtype or p.dtype).clone()
        is_ffn = any(name.endswith(f) for f in FFN_WEIGHTS)
        out[name] = t.requires_grad_(ffn_requires_grad or not is_ffn)
    return out
