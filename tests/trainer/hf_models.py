"""Tiny Hugging Face model directories of the LLaMA family, written by the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

# hidden 64 -> rank 1/32 keeps 2 directions; 2 layers; grouped-query attention (4 heads, 2 kv heads)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, head_dim=16,
            tie_word_embeddings=False)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**TINY, **overrides})


def write_model_dir(directory: Path, family: str = "llama", *, weights: bool = True, seed: int = 1,
                    **overrides) -> Path:
    """A model directory as ``save_pretrained`` writes it: config.json, and model.safetensors with ``weights``
    (random weights drawn from ``seed``, so they differ from what the trainer's --seed would draw)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(directory), safe_serialization=True)
    else:
        config.save_pretrained(str(directory))
    return directory
