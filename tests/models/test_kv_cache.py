"""The decode step writes only its new slots into the stacked KV cache.

Writing each layer's cache back whole (a `[1, B, S, K, H]` update per layer per step) moved the
cache about five times per decode step in the GPU compile (BUILD_NOTES: rollout, KV cache
traffic); the values were the same, so only the jaxpr shows it.
"""

import jax
import jax.numpy as jnp
import pytest
from jaxpr_utils import all_eqns

from grpo.models import transformer as tf
from grpo.models.presets import preset


def _cache_writes(params, config, new_tokens: int, batch: int = 2, slots: int = 12):
    """Update shapes of every dynamic_update_slice into the stacked k or v cache."""
    cache = tf.init_cache(config, batch, slots)
    tokens = jnp.ones((batch, new_tokens), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(new_tokens), (batch, new_tokens))
    valid = jnp.ones((batch, new_tokens), bool)

    def step(params, cache):
        return tf.forward(params, tokens, positions, valid, config=config, cache=cache)

    jaxpr = jax.make_jaxpr(step)(params, cache).jaxpr
    return [
        tuple(eqn.invars[1].aval.shape)
        for eqn in all_eqns(jaxpr)
        if eqn.primitive.name == "dynamic_update_slice"
        and eqn.invars[0].aval.shape == cache.k_LxBxSxKxH.shape
    ]


@pytest.mark.parametrize("unstacked", [False, True], ids=["scanned", "unstacked"])
@pytest.mark.parametrize("new_tokens", [1, 5], ids=["decode", "prefill"])
def test_forward_writes_only_the_new_slots(unstacked, new_tokens):
    config = preset("tiny-qwen2")
    params = tf.init_params(config, jax.random.key(0))
    if unstacked:
        params = tf.unstack_layers(params)
    writes = _cache_writes(params, config, new_tokens)
    one_slab = (1, 2, new_tokens, config.num_kv_heads, config.head_dim)
    # k and v, once per layer when unrolled, once in the scanned body otherwise.
    assert writes == [one_slab] * (2 * config.num_layers if unstacked else 2)
