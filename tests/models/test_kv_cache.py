"""The KV cache is one buffer per layer, and a forward call writes only its new slots into each.

A stacked [L, B, S, K, H] cache, sliced per layer and written back whole, moved the cache several
times per decode step in the GPU compile (BUILD_NOTES: KV cache traffic); the values were the
same, so only the jaxpr shows it.
"""

import jax
import jax.numpy as jnp
import pytest
from jaxpr_utils import all_eqns

from grpo.models import transformer as tf
from grpo.models.presets import preset

BATCH, SLOTS = 2, 12


@pytest.mark.parametrize("new_tokens", [1, 5], ids=["decode", "prefill"])
def test_forward_writes_only_the_new_slots_of_each_layer_buffer(new_tokens):
    config = preset("tiny-qwen2")
    params = tf.unstack_layers(tf.init_params(config, jax.random.key(0)))
    cache = tf.init_cache(config, BATCH, SLOTS)
    layer_shape = (BATCH, SLOTS, config.num_kv_heads, config.head_dim)
    assert [k.shape for k in cache.k_layers] == [layer_shape] * config.num_layers
    tokens = jnp.ones((BATCH, new_tokens), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(new_tokens), (BATCH, new_tokens))

    def step(params, cache):
        valid = jnp.ones((BATCH, new_tokens), bool)
        return tf.forward(params, tokens, positions, valid, config=config, cache=cache)

    eqns = list(all_eqns(jax.make_jaxpr(step)(params, cache).jaxpr))
    writes = [
        tuple(e.invars[1].aval.shape)
        for e in eqns
        if e.primitive.name == "dynamic_update_slice" and e.invars[0].aval.shape == layer_shape
    ]
    new_slots = (BATCH, new_tokens, config.num_kv_heads, config.head_dim)
    assert writes == [new_slots] * (2 * config.num_layers)  # k and v of every layer
    # Nothing stacks the layers' caches (slicing a stack copies on the GPU).
    stacked = [e for e in eqns if any(v.aval.shape[1:] == layer_shape for v in e.outvars)]
    assert stacked == []
