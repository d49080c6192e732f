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


def _qwen25(*, hidden: int, mlp: int, layers: int, heads: int, head_dim: int) -> ModelConfig:
    """What the small Qwen2.5 instruct models share: vocab, 2 KV heads, q/k/v bias, tied."""
    return ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=2,
        head_dim=head_dim,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        qkv_bias=True,
        eos_token_ids=(151645, 151643),
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
    "tiny-mistral": ModelConfig(model_type="mistral", rope_theta=1000000.0, **_TINY),
    # Shapes of the public Qwen2.5 instruct checkpoints (random weights when used by name).
    "qwen2.5-0.5b": _qwen25(hidden=896, mlp=4864, layers=24, heads=14, head_dim=64),
    "qwen2.5-1.5b": _qwen25(hidden=1536, mlp=8960, layers=28, heads=12, head_dim=128),
    "qwen2.5-3b": _qwen25(hidden=2048, mlp=11008, layers=36, heads=16, head_dim=128),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
