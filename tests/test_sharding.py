"""Mesh construction, logical-axis rules, and sharded forward == unsharded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from grpo import sharding
from grpo.models import presets
from grpo.models import transformer as tf


def test_mesh_fills_minus_one():
    mesh = sharding.make_mesh(dp=2, fsdp=-1, tp=2)
    assert dict(mesh.shape) == {"dp": 2, "fsdp": 2, "tp": 2}


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, -1, 1), "does not divide"),
        ((2, 2, 4), "needs 16 devices"),
        ((-1, -1, 1), "at most one"),
        ((0, 2, 4), "sizes must be >= 1"),
        ((-2, 2, -1), "sizes must be >= 1"),
    ],
)
def test_mesh_rejects_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(*sizes)


def test_rules_drop_axes_that_do_not_divide():
    mesh = sharding.make_mesh(dp=2, fsdp=2, tp=2)
    # 3 KV heads cannot split over tp=2: replicated; embed 32 splits over fsdp.
    spec = sharding.logical_to_spec(
        ("layers", "embed", "kv_heads", "head_dim"), (2, 32, 3, 8), mesh
    )
    assert spec == PartitionSpec(None, "fsdp", None, None)
    spec = sharding.logical_to_spec(("batch", None), (8, 5), mesh)
    assert spec == PartitionSpec(("dp", "fsdp"), None)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_sharded_forward_equals_unsharded(name):
    config = presets.preset(name, dtype="float32")
    params = tf.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, config.vocab_size)
    valid = jnp.arange(12)[None, :] >= jnp.array([0, 3, 5, 1])[:, None]
    positions = tf.positions_from_mask(valid)

    def run(p, t, pos, v):
        hidden, _ = tf.forward(p, t, pos, v, config=config)
        return tf.logits(p, hidden, config=config)

    expected = jax.jit(run)(params, tokens, positions, valid)

    mesh = sharding.make_mesh(dp=2, fsdp=2, tp=2)
    shardings = sharding.tree_shardings(mesh, tf.logical_axes(config), params)
    sharded_params = jax.device_put(params, shardings)
    assert sharded_params["layers"]["q"].sharding.spec == PartitionSpec(None, "fsdp", "tp", None)
    batch = sharding.shard_batch(
        mesh, (np.asarray(tokens), np.asarray(positions), np.asarray(valid))
    )
    got = jax.jit(run)(sharded_params, *batch)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)
