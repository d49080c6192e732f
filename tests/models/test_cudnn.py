"""attention_impl='cudnn': the trainer's forward on valid-first rows with cuDNN's own causal +
padding mask, against our einsum attention on every real token.

cuDNN runs only on an NVIDIA GPU. On other backends the tests run jax's XLA reference of the
very call we make (same arguments, `implementation='xla'`), which checks the layout around the
kernel: the valid-first gather, the sequence lengths, and the gather back."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo.models import presets
from grpo.models import transformer as tf

ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture
def cudnn_calls(monkeypatch):
    """The arguments of each cuDNN attention call; off a GPU, run by jax's XLA reference."""
    calls = []
    real = jax.nn.dot_product_attention

    def attention(q, k, v, **kwargs):
        calls.append(kwargs)
        if not ON_GPU:
            kwargs = {**kwargs, "implementation": "xla"}
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", attention)
    return calls


def _batch(vocab_size: int):
    """Left-padded prompts, right-padded completions, and one row with a hole in the middle."""
    t = 40
    slots = np.arange(t)[None, :]
    left_pad = np.array([0, 3, 9, 1, 0, 20, 2, 5])[:, None]
    ends = np.array([40, 33, 40, 12, 40, 40, 39, 30])[:, None]
    valid = (slots >= left_pad) & (slots < ends)
    valid[4, 10:14] = False
    tokens = jax.random.randint(jax.random.key(1), (8, t), 0, vocab_size)
    valid = jnp.asarray(valid)
    return tokens, tf.positions_from_mask(valid), valid


def _loss(config, params, tokens, positions, valid):
    hidden, _ = tf.forward(params, tokens, positions, valid, config=config)
    logps = jax.nn.log_softmax(tf.logits(params, hidden, config=config))
    return jnp.sum(jnp.where(valid[..., None], logps, 0.0) * 1e-3), hidden


def _against_einsum(dtype: str):
    config = presets.preset("tiny-qwen2", dtype=dtype, remat="none")
    params = tf.init_params(config, jax.random.key(0))
    batch = _batch(config.vocab_size)
    grad_fn = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)
    cudnn_config = dataclasses.replace(config, attention_impl="cudnn")
    return grad_fn(cudnn_config, params, *batch), grad_fn(config, params, *batch), batch[2]


def test_cudnn_path_matches_einsum_attention_on_every_real_token(cudnn_calls):
    ((value, hidden), grads), ((want, want_hidden), want_grads), valid = _against_einsum("float32")
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(hidden[valid], want_hidden[valid], atol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-6)
    # cuDNN's own mask, not a T x S bias: a boolean mask= would also make it write a bias grad.
    assert cudnn_calls  # traced once: the layers are scanned
    assert cudnn_calls[0].keys() == {
        "is_causal",
        "query_seq_lengths",
        "key_value_seq_lengths",
        "implementation",
    }
    assert cudnn_calls[0]["is_causal"] and cudnn_calls[0]["implementation"] == "cudnn"


def test_valid_first_order_keeps_real_tokens_in_order():
    valid = jnp.asarray([[False, False, True, True, False], [True, False, True, True, False]])
    order = tf._valid_first_order(valid)
    np.testing.assert_array_equal(order, [[2, 3, 0, 1, 4], [0, 2, 3, 1, 4]])


@pytest.mark.skipif(not ON_GPU, reason="cuDNN's kernel needs an NVIDIA GPU")
def test_cudnn_kernel_matches_einsum_attention_in_bf16(cudnn_calls):
    ((value, hidden), grads), ((want, want_hidden), want_grads), valid = _against_einsum("bfloat16")
    np.testing.assert_allclose(value, want, rtol=2e-2)
    np.testing.assert_allclose(
        np.asarray(hidden[valid], np.float32), np.asarray(want_hidden[valid], np.float32), atol=0.1
    )
    chex.assert_trees_all_close(grads, want_grads, atol=2e-3, rtol=5e-2)
