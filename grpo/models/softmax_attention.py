"""Grouped-query softmax attention in plain XLA ops, with a written backward.

Autodiff of softmax then the weighted sum gives the scores' gradient as `p * (dp - sum(dp * p))`:
the row sum is one more pass over a score-sized array in every layer's backward (19 ms of the
1.1 s H200 update bound at 1.5B, 64 x 1024). The same row sum is `sum(dout * out)` over the head
dimension, an array S times smaller (FlashAttention's backward), which the backward written here
uses. Its matmuls take the cotangents in the inputs' dtype, as every other layer's backward does.

`attend_after_prefix` (forward only) is the sampler's decode over a prompt cache shared by the
prompt's samples.

Shapes: one KV head's query rows are one axis R = T * group (query t, head g at row t * group + g),
so every score-shaped array keeps the score matmul's layout `[B, K, R, S]`.
"""

from __future__ import annotations

import functools
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


def attend_after_prefix(
    q_BxKxRxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    bias_BxTxS: jax.Array,
    prefix_k_NxPxKxH: jax.Array,
    prefix_v_NxPxKxH: jax.Array,
    prefix_bias_NxP: jax.Array,
) -> jax.Array:
    """`attend` over a shared prefix's keys, then each row's own: rows n*G ... n*G+G-1
    (B = N x G) all continue prefix n, whose keys and values are read once for the G of them
    instead of once per row (the sampler's decode over a group's prompt). One softmax over both
    parts; forward only. `prefix_bias_NxP` masks prefix slots for every query of its rows."""
    b, kv_heads, r, h = q_BxKxRxH.shape
    n, p = prefix_k_NxPxKxH.shape[:2]
    t, s = bias_BxTxS.shape[1:]
    # KV heads outermost, so that a prefix's G rows are one run of query rows: [K, B, R, X] is
    # a pure reshape of [K, N, G * R, X], and neither part's matmul moves a score-sized array.
    q_KxBxRxH = q_BxKxRxH.transpose(1, 0, 2, 3)
    f32_einsum = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    own = f32_einsum("kbrh,bskh->kbrs", q_KxBxRxH, k_BxSxKxH).reshape(kv_heads, b, t, r // t, s)
    own = (own / math.sqrt(h) + bias_BxTxS[None, :, :, None, :]).reshape(kv_heads, b, r, s)
    q_KxNxMxH = q_KxBxRxH.reshape(kv_heads, n, (b // n) * r, h)
    prefix = f32_einsum("knmh,npkh->knmp", q_KxNxMxH, prefix_k_NxPxKxH) / math.sqrt(h)
    prefix = (prefix + prefix_bias_NxP[None, :, None, :]).reshape(kv_heads, b, r, p)
    # One softmax over both parts, as `attend` over the concatenated keys computes it.
    both = jnp.concatenate([prefix, own], axis=-1)
    row_max = jnp.max(both, axis=-1, keepdims=True)
    row_sum = jnp.sum(jnp.exp(both - row_max), axis=-1, keepdims=True)
    weights = _softmax(both, row_max, row_sum).astype(v_BxSxKxH.dtype)
    # Both weighted sums in fp32, rounded once, as the one matmul over all keys would be.
    out = f32_einsum("kbrs,bskh->kbrh", weights[..., p:], v_BxSxKxH)
    out_prefix = f32_einsum(
        "knmp,npkh->knmh", weights[..., :p].reshape(kv_heads, n, -1, p), prefix_v_NxPxKxH
    )
    out = out + out_prefix.reshape(kv_heads, b, r, h)
    return out.transpose(1, 0, 2, 3).astype(v_BxSxKxH.dtype)
