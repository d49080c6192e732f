"""The einsum attention's written backward equals autodiff, with no score-sized reduction."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_utils import all_eqns

from grpo.models.softmax_attention import attend

B, K, G, T, H = 2, 2, 3, 16, 8  # batch, KV heads, query heads per KV head, tokens, head dim


def _autodiff_attend(q, k, v, bias):
    scores = jnp.einsum("bkrh,bskh->bkrs", q, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(B, K, T, G, T) / math.sqrt(H) + bias[:, None, :, None, :]
    weights = jax.nn.softmax(scores.reshape(B, K, T * G, T), axis=-1)
    return jnp.einsum("bkrs,bskh->bkrh", weights.astype(v.dtype), v)


def _inputs(dtype):
    rng = np.random.default_rng(0)
    q, dout = (rng.normal(size=(B, K, T * G, H)) for _ in range(2))
    k, v = (rng.normal(size=(B, T, K, H)) for _ in range(2))
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    mask[1, :, :3] = False  # row 1: left padding, so its first three queries see no key at all
    bias = jnp.where(jnp.asarray(mask), 0.0, -1e30).astype(jnp.float32)
    return [jnp.asarray(a, dtype) for a in (q, k, v, dout)] + [bias]


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_values_and_gradients_equal_autodiff(dtype, tol):
    q, k, v, dout, bias = _inputs(dtype)
    got, got_vjp = jax.vjp(lambda q, k, v: attend(q, k, v, bias), q, k, v)
    want, want_vjp = jax.vjp(lambda q, k, v: _autodiff_attend(q, k, v, bias), q, k, v)
    pairs = [("out", got, want)] + list(zip("qkv", got_vjp(dout), want_vjp(dout), strict=True))
    for name, g, w in pairs:
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max(), err_msg=name)


def test_backward_reduces_no_score_sized_array():
    """Autodiff sums dp * p over the keys, a pass over the scores; the written backward sums
    dout * out over the head dimension instead."""
    q, k, v, dout, bias = _inputs("float32")

    def reduced_sizes(fn):
        _, backward = jax.vjp(lambda *x: fn(*x, bias), q, k, v)
        eqns = all_eqns(jax.make_jaxpr(backward)(dout).jaxpr)
        return [np.prod(e.invars[0].aval.shape) for e in eqns if e.primitive.name == "reduce_sum"]

    score_size = B * K * T * G * T
    assert max(reduced_sizes(_autodiff_attend)) >= score_size  # the test sees the old pass
    assert max(reduced_sizes(attend)) < score_size
