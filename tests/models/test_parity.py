"""Logits parity with transformers (PyTorch, CPU, fp32) on tiny random models of each family.

The reference models are built by transformers from its own configs; their weights go through
`params_from_hf_state_dict` and `ModelConfig.from_hf`, so these tests cover the name/shape mapping,
the config translation and the forward pass together. Every weight (norms and biases included)
is random with std 0.3 so that a swapped or mis-shaped tensor moves the logits well past the
tolerance. Tolerance: |ours - reference| <= 1e-4 + 1e-4 |reference| (fp32 both sides).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from grpo.models.config import ModelConfig
from grpo.models.loading import params_from_hf_state_dict
from grpo.models.transformer import (
    forward,
    init_cache,
    logits,
    positions_from_mask,
    unstack_layers,
)
from tests.hf_models import TINY_DIMS

ATOL = RTOL = 1e-4
_SMALL = dict(vocab_size=96, **TINY_DIMS, rms_norm_eps=1e-6)
# Llama, head_dim 16, theta 1e4: rotary wavelengths 6.3 ... 19869 fall in every branch of llama3
# scaling with original context 256 (kept below 64, smoothed at 199, divided by 8 above 256).
CASES = {
    "qwen2_bias_untied": lambda: transformers.Qwen2Config(
        **_SMALL, rope_theta=10000.0, tie_word_embeddings=False
    ),
    "qwen3_qknorm_tied": lambda: transformers.Qwen3Config(
        **_SMALL, head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True
    ),
    "llama_rope_scaling_tied": lambda: transformers.LlamaConfig(
        **{**_SMALL, "hidden_size": 64, "max_position_embeddings": 1024},
        rope_theta=10000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
        tie_word_embeddings=True,
    ),
    "llama_untied": lambda: transformers.LlamaConfig(
        **_SMALL, rope_theta=500000.0, tie_word_embeddings=False
    ),
    "mistral_untied": lambda: transformers.MistralConfig(
        **_SMALL, head_dim=16, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False
    ),
}


def _reference(case: str) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """A random transformers model, our config for it, and our params from its state_dict."""
    torch.manual_seed(0)
    hf_config = CASES[case]()
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = ModelConfig.from_hf(hf_config.to_dict(), dtype="float32", param_dtype="float32")
    return model, config, params_from_hf_state_dict(state, config)


@functools.partial(jax.jit, static_argnames="config")
def _logits(params, tokens, valid, *, config):
    hidden, _ = forward(params, tokens, positions_from_mask(valid), valid, config=config)
    return logits(params, hidden, config=config)


def _left_padded_batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = [12, 9, 5, 1]
    t = max(lengths)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, size=(len(lengths), t))
    valid = np.arange(t)[None, :] >= (t - np.array(lengths))[:, None]
    return np.where(valid, tokens, 0), valid


def _torch_logits(model, tokens, valid) -> np.ndarray:
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens),
            attention_mask=torch.from_numpy(valid.astype(np.int64)),
            position_ids=torch.from_numpy(positions),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_on_left_padded_batch(case):
    model, config, params = _reference(case)
    tokens, valid = _left_padded_batch(config.vocab_size)
    expected = _torch_logits(model, tokens, valid)
    ours = np.asarray(_logits(params, jnp.asarray(tokens), jnp.asarray(valid), config=config))

    assert np.abs(expected[valid]).max() > 1.0, "reference logits too small to test anything"
    np.testing.assert_allclose(ours[valid], expected[valid], atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(ours[valid].argmax(-1), expected[valid].argmax(-1))


def test_config_translation_of_each_family():
    _, qwen2, _ = _reference("qwen2_bias_untied")
    _, qwen3, _ = _reference("qwen3_qknorm_tied")
    _, llama, _ = _reference("llama_rope_scaling_tied")
    assert (qwen2.qkv_bias, qwen2.qk_norm, qwen2.tie_word_embeddings) == (True, False, False)
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.tie_word_embeddings) == (False, True, True)
    assert (qwen3.head_dim, qwen3.rope_theta) == (16, 1000000.0)
    assert llama.rope_scaling is not None and llama.rope_scaling.factor == 8.0
    assert (llama.qkv_bias, llama.head_dim, llama.rope_theta) == (False, 16, 10000.0)
    _, mistral, _ = _reference("mistral_untied")
    assert (mistral.model_type, mistral.qkv_bias, mistral.head_dim) == ("mistral", False, 16)
    sliding = {**transformers.MistralConfig(**_SMALL).to_dict(), "sliding_window": 4096}
    with pytest.raises(ValueError, match="sliding-window attention .* is not supported"):
        ModelConfig.from_hf(sliding)
    qwen2_window_off = {**transformers.Qwen2Config(**_SMALL).to_dict(), "sliding_window": 4096}
    assert not qwen2_window_off["use_sliding_window"]
    ModelConfig.from_hf(qwen2_window_off)  # Qwen2.5's configs name a window they do not use


@pytest.mark.parametrize("case", ["qwen2_bias_untied", "llama_rope_scaling_tied"])
def test_kv_cache_decode_equals_full_forward(case):
    """Left-padded prompts of different lengths, prefill, then single-token greedy steps."""
    _, config, params = _reference(case)
    prompt, prompt_valid = _left_padded_batch(config.vocab_size)
    batch, p = prompt.shape
    steps = 5

    @jax.jit
    def step(params, tokens, positions, valid, cache):
        hidden, cache = forward(params, tokens, positions, valid, config=config, cache=cache)
        return logits(params, hidden[:, -1:], config=config), cache

    cache = init_cache(config, batch, p + steps)
    positions = positions_from_mask(jnp.asarray(prompt_valid))
    full_params, params = params, unstack_layers(params)  # as the sampler runs a cache
    next_logits, cache = step(params, prompt, positions, prompt_valid, cache)
    decoded_logits, generated = [next_logits], []
    for _ in range(steps - 1):
        token = jnp.argmax(next_logits, axis=-1)  # B,1
        generated.append(token)
        positions = positions[:, -1:] + 1
        next_logits, cache = step(params, token, positions, jnp.ones_like(token, bool), cache)
        decoded_logits.append(next_logits)
    decoded = np.concatenate(decoded_logits, axis=1)  # B,steps,V: predictions after slot p-1...

    tokens = np.concatenate([prompt, *map(np.asarray, generated)], axis=1)
    valid = np.concatenate([prompt_valid, np.ones((batch, steps - 1), bool)], axis=1)
    full = np.asarray(_logits(full_params, jnp.asarray(tokens), jnp.asarray(valid), config=config))
    np.testing.assert_allclose(decoded, full[:, p - 1 :], atol=ATOL, rtol=RTOL)
    assert int(cache.index) == p + steps - 1


def test_unstacked_layers_equal_stacked_exactly():
    """Unrolled layers match the scanned ones bit for bit (the trainer's full-sequence pass)."""
    _, config, params = _reference("qwen3_qknorm_tied")
    prompt, prompt_valid = _left_padded_batch(config.vocab_size)
    positions = positions_from_mask(jnp.asarray(prompt_valid))

    @jax.jit
    def full_pass(params):
        return forward(params, prompt, positions, prompt_valid, config=config)[0]

    unstacked = unstack_layers(params)
    assert len(unstacked["layers"]) == config.num_layers
    np.testing.assert_array_equal(full_pass(unstacked), full_pass(params))
    cache = init_cache(config, *prompt.shape)
    with pytest.raises(ValueError, match="needs per-layer params"):
        forward(params, prompt, positions, prompt_valid, config=config, cache=cache)
    with pytest.raises(ValueError, match="already unstacked"):
        unstack_layers(unstacked)
