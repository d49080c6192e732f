"""The einsum attention's layout: score-shaped arrays (rows x heads x T x S) are never transposed,
and never built outside the layer loop.

Grouped-query scores laid out `[b, kv_head, group, t, s]` came out of the score matmul as
`[b, kv_head, t, group, s]` and were transposed, and XLA:GPU then moved them between layouts in
the forward, the recompute and the backward (the H200 update roofline in BUILD_NOTES: ~140 ms of
1.32 s at the 1.5B 64 x 1024 shape). With one `(t, group)` row axis only q and the output move.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_utils import all_eqns

from grpo.models import transformer as tf
from grpo.models.presets import preset

B, T = 2, 32  # scores (2 x 4 heads x 32 x 32) outgrow every weight


def _grad_jaxpr(remat: str):
    config = preset("tiny-qwen2", dtype="float32", remat=remat)
    assert config.num_heads > config.num_kv_heads  # grouped-query
    params = tf.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (B, T)))
    valid = jnp.ones((B, T), bool)

    def loss(params):
        hidden, _ = tf.forward(params, tokens, tf.positions_from_mask(valid), valid, config=config)
        return jnp.sum(hidden**2)

    return jax.make_jaxpr(jax.grad(loss))(params).jaxpr, config.num_heads * B * T * T


def test_no_score_sized_transpose_forward_or_backward():
    jaxpr, score_size = _grad_jaxpr("none")
    transposed = [
        e.invars[0].aval.shape for e in all_eqns(jaxpr) if e.primitive.name == "transpose"
    ]
    assert transposed, "the walk should see q's and the output's transposes"
    assert all(np.prod(shape) < score_size for shape in transposed), transposed


@pytest.mark.parametrize("remat", ["dots", "none"])
def test_no_score_sized_array_outside_the_layer_loop(remat):
    """jax hoists a scan's loop-invariant work out of the loop: the attention mask and its fill
    broadcast to the scores' shape once per micro-batch, then read in full by every layer
    (H200 compile, 1.5B 64 x 1024: 24 ms of the 1.14 s update bound)."""
    jaxpr, score_size = _grad_jaxpr(remat)
    assert any(e.primitive.name == "scan" for e in jaxpr.eqns)
    outside = [v.aval for e in jaxpr.eqns if e.primitive.name != "scan" for v in e.outvars]
    assert all(np.prod(aval.shape) < score_size for aval in outside), outside
