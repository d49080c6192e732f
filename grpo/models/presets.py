"""Named model shapes, for random-weight tests, benchmarks and gin (`make_model.preset`)."""

from __future__ import annotations

from grpo.models.config import Llama3RopeScaling, ModelConfig

_TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=512,
)

PRESETS: dict[str, ModelConfig] = {
    "tiny-qwen2": ModelConfig(model_type="qwen2", qkv_bias=True, rope_theta=10000.0, **_TINY),
    "tiny-qwen3": ModelConfig(model_type="qwen3", qk_norm=True, **{**_TINY, "head_dim": 16}),
    "tiny-llama": ModelConfig(
        model_type="llama",
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        **_TINY,
    ),
    # Shapes of the public Qwen2.5 instruct checkpoints (random weights when used by name).
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
        eos_token_ids=(151645, 151643),
    ),
    "qwen2.5-1.5b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
        eos_token_ids=(151645, 151643),
    ),
    "qwen2.5-3b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        head_dim=128,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
        eos_token_ids=(151645, 151643),
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
