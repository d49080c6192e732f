"""Log-probs over a vocabulary split across devices (models/vocab_parallel.py) against the plain
log-softmax: same values and gradients, whatever the mesh."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from grpo import sharding
from grpo.models import transformer as tf
from grpo.models import vocab_parallel

B, C, D, V = 8, 6, 16, 64
TEMPERATURE = 0.7


def _plain(h, y, w, kept=None):
    """The log-softmax over the whole vocabulary, or over each position's `kept` ids (distinct,
    the target first) gathered alone."""
    z = tf.unembed(h, w) / TEMPERATURE
    if kept is not None:
        z, y = jnp.take_along_axis(z, kept, axis=-1), jnp.zeros_like(y)
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, y[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _kept_ids(rng, y):
    """Each position's target, then 5 other distinct ids (over every device's slice)."""
    kept = np.empty((*y.shape, 6), np.int32)
    for b, c in np.ndindex(*y.shape):
        others = rng.permutation(np.delete(np.arange(V), y[b, c]))[:5]
        kept[b, c] = [y[b, c], *others]
    return jnp.asarray(kept)


def _loss(fn, h, y, w):
    logp, entropy = fn(h, y, w)
    return jnp.sum(jnp.sin(logp)) + 0.3 * jnp.sum(entropy), (logp, entropy)


@pytest.mark.eight_devices
@pytest.mark.parametrize("kept_ids", [False, True], ids=["whole", "kept"])
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_values_and_gradients_equal_the_plain_log_softmax(mesh_shape, kept_ids):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(B, C, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
    y = jnp.asarray(rng.integers(0, V, (B, C)), jnp.int32)  # targets in every device's slice
    kept = _kept_ids(rng, np.asarray(y)) if kept_ids else None
    grad = jax.value_and_grad(_loss, argnums=(1, 3), has_aux=True)
    plain = lambda h, y, w: _plain(h, y, w, kept)
    (_, want), want_grads = jax.jit(grad, static_argnums=0)(plain, h, y, w)

    mesh = sharding.make_mesh(*mesh_shape)
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    h, y = jax.device_put(h, rows), jax.device_put(y, rows)
    kept = None if kept is None else jax.device_put(kept, rows)
    logits = lambda h, w: tf.unembed(h, w) / TEMPERATURE
    split = lambda h, y, w: vocab_parallel.logprobs_and_entropy(h, y, w, logits, kept)
    with jax.set_mesh(mesh):
        assert vocab_parallel.vocab_axes(V) is not None
        (_, got), got_grads = jax.jit(grad, static_argnums=0)(split, h, y, w)
    chex.assert_trees_all_close(got, want, atol=1e-5)
    chex.assert_trees_all_close(got_grads, want_grads, atol=1e-5)


@pytest.mark.eight_devices
def test_no_split_without_a_mesh_or_a_dividing_one():
    assert vocab_parallel.vocab_axes(V) is None
    with jax.set_mesh(sharding.make_mesh(fsdp=8)):
        assert vocab_parallel.vocab_axes(V) == "fsdp"
        assert vocab_parallel.vocab_axes(V + 1) is None
