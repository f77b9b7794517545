"""Model shapes: LLaMA-style presets from a few M parameters (CPU) to the paper's 350M/1B/7B.

The 60M-7B shapes follow the LLaMA configurations used for C4 pre-training in the GaLore
line of work, which MeCeFO's LLaMA-350M/1B/7B experiments share (hidden, FFN width,
layers, heads). The small presets use byte-level vocabularies (256) for the embedded
corpus. Used by the trainer, the kernel benchmarks and the step benchmarks alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_seq_len: int
    num_kv_heads: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self, tied_embeddings: bool = False) -> int:
        d, h, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = (self.num_kv_heads or self.num_heads) * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * h + 2 * d
        return v * d * (1 if tied_embeddings else 2) + self.num_layers * per_layer + d

    def to_llama_config(self, **overrides):
        """A transformers LlamaConfig with these shapes (transformers is an optional dependency)."""
        from transformers import LlamaConfig

        kwargs = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                      num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads or self.num_heads,
                      max_position_embeddings=self.max_seq_len, rms_norm_eps=1e-6, tie_word_embeddings=False)
        kwargs.update(overrides)
        return LlamaConfig(**kwargs)

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelPreset] = {p.name: p for p in (
    ModelPreset("tiny", 128, 352, 4, 4, 256, 256),
    ModelPreset("small", 256, 688, 6, 8, 256, 512),
    ModelPreset("llama-60m", 512, 1376, 8, 8, 32000, 1024),
    ModelPreset("llama-130m", 768, 2048, 12, 12, 32000, 1024),
    ModelPreset("llama-350m", 1024, 2736, 24, 16, 32000, 2048),
    ModelPreset("llama-1b", 2048, 5461, 24, 32, 32000, 2048),
    ModelPreset("llama-7b", 4096, 11008, 32, 32, 32000, 2048),
)}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
