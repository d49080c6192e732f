"""The KV cache is one buffer per layer, and a forward call writes only its new slots into each.

A stacked [L, B, S, K, H] cache, sliced per layer and written back whole, moved the cache several
times per decode step in the GPU compile (BUILD_NOTES: KV cache traffic); the values were the
same, so only the jaxpr shows it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
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


def test_decode_after_a_shared_prefix_equals_decode_over_the_repeated_prompt():
    # Two left-padded prompts, three samples each: decoding over each prompt's cache once (the
    # prefix) and the samples' own slots must give the hidden states of decoding over a cache
    # holding a copy of the prompt per sample. fp32, so the two agree to rounding.
    config = preset("tiny-qwen2")
    params = tf.unstack_layers(tf.init_params(config, jax.random.key(0)))
    prompts, group, p, steps = 2, 3, 7, 4
    rows = prompts * group
    prompt = jax.random.randint(jax.random.key(1), (prompts, p), 0, config.vocab_size)
    prompt_valid = jnp.arange(p)[None, :] >= jnp.array([[0], [2]])  # the second has 2 pads
    forward = functools.partial(tf.forward, params, config=config)
    _, prefix = forward(
        prompt,
        tf.positions_from_mask(prompt_valid),
        prompt_valid,
        cache=tf.init_cache(config, prompts, p),
    )
    repeat = functools.partial(jnp.repeat, repeats=group, axis=0)
    full = tf.init_cache(config, rows, p + steps)
    with_prompt = lambda layers, prompt_layers: tuple(
        a.at[:, :p].set(repeat(b)) for a, b in zip(layers, prompt_layers, strict=True)
    )
    full = full.replace(
        k_layers=with_prompt(full.k_layers, prefix.k_layers),
        v_layers=with_prompt(full.v_layers, prefix.v_layers),
        valid_BxS=full.valid_BxS.at[:, :p].set(repeat(prompt_valid)),
        index=jnp.asarray(p, jnp.int32),
    )
    own = tf.init_cache(config, rows, steps)
    tokens = jax.random.randint(jax.random.key(2), (rows, steps), 0, config.vocab_size)
    lengths = repeat(prompt_valid.sum(axis=1))
    one = jnp.ones((rows, 1), bool)
    for t in range(steps):
        token, position = tokens[:, t : t + 1], (lengths + t)[:, None]
        want, full = forward(token, position, one, cache=full)
        got, own = forward(token, position, one, cache=own, prefix=prefix)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
    # And the decode's attention reads the prompts' keys and values once per prompt, never a
    # copy per sample.
    step = lambda own: forward(token, position, one, cache=own, prefix=prefix)
    operands = [
        v.aval.shape
        for e in all_eqns(jax.make_jaxpr(step)(own).jaxpr)
        if e.primitive.name == "dot_general"
        for v in e.invars
    ]
    kv = (config.num_kv_heads, config.head_dim)
    assert operands.count((prompts, p, *kv)) == 2 * config.num_layers  # scores and sum
    assert (rows, p, *kv) not in operands
