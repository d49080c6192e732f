"""Splash attention (attention_impl='splash', a TPU kernel run here in Pallas' interpreter)
against our einsum attention: same outputs and gradients on every real token, sharded or not."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from grpo import sharding
from grpo.models import presets, splash
from grpo.models import transformer as tf


def _valid(t: int, left_pad: list[int], ends: list[int]) -> jax.Array:
    """Left-padded prompts; slots from `ends` on are padding after the completion."""
    slots = np.arange(t)[None, :]
    return jnp.asarray((slots >= np.array(left_pad)[:, None]) & (slots < np.array(ends)[:, None]))


def _masked_loss(out_BxTxNxH, valid_BxT):
    return jnp.sum(jnp.where(valid_BxT[:, :, None, None], jnp.sin(out_BxTxNxH), 0.0))


@pytest.mark.parametrize(
    "t, s, heads, kv_heads",
    [
        (24, 24, 4, 2),  # shorter than a kernel block: padded to 128 slots inside
        (256, 256, 4, 1),  # one 256-slot block; a single kv head
        (384, 384, 2, 2),  # 384 = 3 x 128 blocks, one query per kv head
        # Queries on the last T of S key slots: the shared-prompt forward's completions, after
        # their left-padded prompt's keys (one block; 256 query and 384 key slots).
        (5, 11, 4, 2),
        (130, 300, 4, 2),
    ],
)
def test_attention_and_gradients_match_einsum_attention(t, s, heads, kv_heads):
    rng = np.random.default_rng(s)
    q = jnp.asarray(rng.normal(size=(2, t, heads, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, s, kv_heads, 16)), jnp.float32) for _ in range(2))
    valid = _valid(s, left_pad=[s // 3, 0], ends=[s, s - min(5, t // 2)])
    mask = tf._causal(t, s)[None] & valid[:, None, :]
    valid_queries = valid[:, s - t :]

    ours = lambda q, k, v: _masked_loss(splash.attention(q, k, v, valid), valid_queries)
    want = lambda q, k, v: _masked_loss(tf._attention_xla(q, k, v, mask), valid_queries)
    value, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(q, k, v)
    expected, expected_grads = jax.value_and_grad(want, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    chex.assert_trees_all_close(grads, expected_grads, atol=2e-5)


def _forward_loss(config, params, tokens, positions, valid):
    hidden, _ = tf.forward(params, tokens, positions, valid, config=config)
    logps = jax.nn.log_softmax(tf.logits(params, hidden, config=config))
    return jnp.sum(jnp.where(valid[..., None], logps, 0.0) * 1e-3)


def _tiny_batch(config):
    tokens = jax.random.randint(jax.random.key(1), (8, 40), 0, config.vocab_size)
    valid = _valid(40, left_pad=[0, 3, 9, 1, 0, 20, 2, 5], ends=[40, 33, 40, 12, 40, 40, 39, 30])
    return tokens, tf.positions_from_mask(valid), valid


@pytest.mark.eight_devices
def test_sharded_model_with_splash_matches_einsum_attention():
    # tiny-qwen2: 4 query heads, 2 kv heads: both split over tp=2, so each shard runs the kernel
    # on 1 kv head with its 2 query heads (and 2 of the 8 rows).
    config = presets.preset("tiny-qwen2", dtype="float32", remat="none")
    params = tf.init_params(config, jax.random.key(0))
    batch = _tiny_batch(config)
    grad_fn = jax.value_and_grad(_forward_loss, argnums=1)
    expected, expected_grads = jax.jit(grad_fn, static_argnums=0)(config, params, *batch)

    mesh = sharding.make_mesh(dp=2, fsdp=2, tp=2)
    params = jax.device_put(params, sharding.tree_shardings(mesh, tf.logical_axes(config), params))
    batch = sharding.shard_batch(mesh, tuple(np.asarray(x) for x in batch))
    splash_config = dataclasses.replace(config, attention_impl="splash")
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(grad_fn, static_argnums=0)(splash_config, params, *batch)
        value, grads = jax.jit(grad_fn, static_argnums=0)(splash_config, params, *batch)
    assert "shard_map" in str(jaxpr)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    chex.assert_trees_all_close(grads, expected_grads, atol=1e-6)


@pytest.mark.eight_devices
@pytest.mark.parametrize(
    "heads, kv_heads, heads_axis",
    [(4, 2, "tp"), (4, 1, None), (6, 3, None)],  # kv heads that tp=2 cannot split: none split
)
def test_shards_keep_query_groups_with_their_kv_head(heads, kv_heads, heads_axis):
    mesh = sharding.make_mesh(dp=2, fsdp=2, tp=2)
    q_spec, kv_spec, valid_spec = splash._specs((8, 128, heads, 16), kv_heads, mesh)
    assert q_spec == kv_spec == PartitionSpec(("dp", "fsdp"), None, heads_axis, None)
    assert valid_spec == PartitionSpec(("dp", "fsdp"), None)


@pytest.mark.parametrize("platform, uses_splash", [("tpu", True), ("cpu", False), ("gpu", False)])
def test_auto_is_splash_on_a_tpu_only(monkeypatch, platform, uses_splash):
    calls = []
    monkeypatch.setattr(splash, "target_platform", lambda: platform)
    monkeypatch.setattr(splash, "attention", lambda q, *_: calls.append(q.shape) or q)
    config = presets.preset("tiny-qwen2", dtype="float32", attention_impl="auto")
    params = tf.init_params(config, jax.random.key(0))
    tokens, positions, valid = _tiny_batch(config)
    tf.forward(params, tokens, positions, valid, config=config)
    assert bool(calls) == uses_splash


def test_refused_on_a_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="on a GPU use 'cudnn'"):
        splash.attention(x, x, x, jnp.ones((1, 8), bool))


def test_unknown_attention_impl_is_rejected():
    with pytest.raises(ValueError, match=re.escape("one of xla|cudnn|auto|splash")):
        presets.preset("tiny-qwen2", attention_impl="flash")
