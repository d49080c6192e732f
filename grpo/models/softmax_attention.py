"""Grouped-query softmax attention in plain XLA ops, with a written backward.

Autodiff of softmax then the weighted sum gives the scores' gradient as `p * (dp - sum(dp * p))`:
the row sum is one more pass over a score-sized array in every layer's backward (19 ms of the
1.1 s H200 update bound at 1.5B, 64 x 1024). The same row sum is `sum(dout * out)` over the head
dimension, an array S times smaller (FlashAttention's backward), which the backward written here
uses. Its matmuls take the cotangents in the inputs' dtype, as every other layer's backward does.

Shapes: one KV head's query rows are one axis R = T * group (query t, head g at row t * group + g),
so every score-shaped array keeps the score matmul's layout `[B, K, R, S]`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _scores(q_BxKxRxH, k_BxSxKxH, bias_BxTxS):
    """fp32 scaled scores plus the per-query bias, `[B, K, R, S]`."""
    b, kv_heads, r, h = q_BxKxRxH.shape
    t, s = bias_BxTxS.shape[1:]
    scores = jnp.einsum("bkrh,bskh->bkrs", q_BxKxRxH, k_BxSxKxH, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv_heads, t, r // t, s) / math.sqrt(h)
    return (scores + bias_BxTxS[:, None, :, None, :]).reshape(b, kv_heads, r, s)


def _softmax(scores, row_max, row_sum):
    return jnp.exp(scores - row_max) / row_sum


def _forward(q, k, v, bias):
    scores = _scores(q, k, bias)
    # The row max and sum, not their log-sum-exp: in a row with no key, every score is -1e30 and
    # -1e30 + log(S) rounds back to -1e30.
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_sum = jnp.sum(jnp.exp(scores - row_max), axis=-1, keepdims=True)
    weights = _softmax(scores, row_max, row_sum)
    out = jnp.einsum("bkrs,bskh->bkrh", weights.astype(v.dtype), v)
    return out, (q, k, v, scores, row_max, row_sum, out)


@jax.custom_vjp
def attend(
    q_BxKxRxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, bias_BxTxS: jax.Array
) -> jax.Array:
    """softmax(q k^T / sqrt(h) + bias) v, fp32 scores and softmax, output in v's dtype.

    `bias_BxTxS` (fp32, 0 or a large negative number) masks keys per query; no gradient flows
    to it.
    """
    return _forward(q_BxKxRxH, k_BxSxKxH, v_BxSxKxH, bias_BxTxS)[0]


def _attend_bwd(residuals, dout_BxKxRxH):
    q, k, v, scores, row_max, row_sum, out = residuals
    weights = _softmax(scores, row_max, row_sum)
    dv = jnp.einsum("bkrs,bkrh->bskh", weights.astype(v.dtype), dout_BxKxRxH)
    dweights = jnp.einsum("bkrh,bskh->bkrs", dout_BxKxRxH, v).astype(jnp.float32)
    row_dot = jnp.sum(dout_BxKxRxH.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dscores = weights * (dweights - row_dot[..., None]) / math.sqrt(q.shape[-1])
    dscores = dscores.astype(q.dtype)
    dq = jnp.einsum("bkrs,bskh->bkrh", dscores, k)
    dk = jnp.einsum("bkrs,bkrh->bskh", dscores, q)
    return dq, dk, dv, None


attend.defvjp(_forward, _attend_bwd)
