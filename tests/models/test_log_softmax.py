"""models/log_softmax.py and the trainer's chunked log-probs that use it: the written backward
against autodiff of the plain log-softmax, and what the chunks' backward no longer computes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo import sharding
from grpo.models import log_softmax, presets, vocab_parallel
from grpo.models import transformer as tf
from tests.models.jaxpr_utils import all_eqns

B, T, D, V = 8, 7, 16, 48  # B: one row per device of an 8-device mesh
CHUNK = 3  # < T, with a ragged last chunk
TEMPERATURE = 0.7


def _plain(z_BxTxV, y_BxT):
    logp_all = jax.nn.log_softmax(z_BxTxV, axis=-1)
    logp = jnp.take_along_axis(logp_all, y_BxT[..., None], axis=-1)[..., 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _objective(fn):
    """A scalar that weighs both outputs unevenly, so both cotangents are exercised."""

    def objective(*args):
        logp, entropy = fn(*args)
        weights = jnp.linspace(-1.0, 2.0, logp.size).reshape(logp.shape)
        return jnp.sum(weights * logp) + jnp.sum(jnp.cos(entropy))

    return objective


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    y = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    return h, w, y


def test_values_and_gradient_equal_autodiff_of_the_plain_log_softmax():
    h, w, y = _inputs()
    z = 3.0 * tf.unembed(h, w)  # peaked rows: probabilities from ~1 down to ~1e-20
    got = log_softmax.target_logprob_and_entropy(z, y)
    chex.assert_trees_all_close(got, _plain(z, y), atol=1e-5)
    got_grad = jax.grad(_objective(log_softmax.target_logprob_and_entropy))(z, y)
    want_grad = jax.grad(_objective(_plain))(z, y)
    chex.assert_trees_all_close(got_grad, want_grad, atol=1e-6)


def _token_logprobs(params, h, y):
    config = presets.preset("tiny-qwen2", dtype="float32", vocab_size=V, hidden_size=D)
    return tf.token_logprobs(params, h, y, config=config, temperature=TEMPERATURE, chunk=CHUNK)


def test_chunked_logprobs_equal_the_whole_sequence_at_once():
    h, w, y = _inputs(1)
    params = {"lm_head": w}
    whole = lambda params, h, y: _plain(tf.unembed(h, params["lm_head"]) / TEMPERATURE, y)
    chex.assert_trees_all_close(_token_logprobs(params, h, y), whole(params, h, y), atol=1e-5)
    got = jax.grad(_objective(_token_logprobs), argnums=(0, 1))(params, h, y)
    want = jax.grad(_objective(whole), argnums=(0, 1))(params, h, y)
    chex.assert_trees_all_close(got, want, atol=1e-5)


def _count_in_backward_and_forward(primitive: str) -> tuple[int, int]:
    h, w, y = _inputs()
    grad_jaxpr = jax.make_jaxpr(jax.grad(_objective(_token_logprobs)))({"lm_head": w}, h, y)
    forward_jaxpr = jax.make_jaxpr(_token_logprobs)({"lm_head": w}, h, y)
    count = lambda jaxpr: sum(e.primitive.name == primitive for e in all_eqns(jaxpr.jaxpr))
    return count(grad_jaxpr) - count(forward_jaxpr), count(forward_jaxpr)


@pytest.mark.parametrize("primitive", ["scatter-add", "reduce_max"])
def test_the_chunks_backward_neither_scatters_nor_reduces_the_logits_again(primitive):
    # Autodiff of log_softmax + take_along_axis scattered the target's cotangent into a zero
    # [rows, chunk, vocab] buffer, and the rematerialised chunk reduced its logits again.
    assert _count_in_backward_and_forward(primitive) == (0, primitive == "reduce_max")


@pytest.mark.eight_devices
def test_nor_does_the_vocabulary_parallel_chunks_backward():
    with jax.set_mesh(sharding.make_mesh(fsdp=8)):
        assert vocab_parallel.vocab_axes(V) == "fsdp"
        for primitive, in_forward in (("scatter-add", 0), ("reduce_max", 1), ("pmax", 1)):
            assert _count_in_backward_and_forward(primitive) == (0, in_forward), primitive
