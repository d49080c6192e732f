"""The log-probability of a target token and the entropy, from logits, with a written backward.

Autodiff of `log_softmax` then `take_along_axis` costs the trainer's log-prob chunks four extra
passes over their fp32 `[rows, chunk, vocab]` logits in the backward: it fills a zero buffer,
scatters the target's cotangent into it, sums that over the vocabulary, and (under the chunk's
`jax.checkpoint`) reduces the logits again for the softmax. The backward written here is one
elementwise pass, given the log-sum-exp and entropy that the forward saves under the names
below:

    d logp / dz    = onehot(target) - p
    d entropy / dz = -p * (log p + entropy)

On a vocabulary slice (`axes`: the mesh axes that split the vocabulary, inside `shard_map`) the
row statistics combine across those axes in the forward, and the backward needs no collective.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

LOGSUMEXP, ENTROPY = "logsumexp", "entropy"
# A `jax.checkpoint` policy that keeps the two row statistics, so the backward recomputes only the
# logits and does not reduce them again.
SAVE_ROW_STATS = jax.checkpoint_policies.save_only_these_names(LOGSUMEXP, ENTROPY)

Axes = str | tuple[str, ...] | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def target_logprob_and_entropy(
    z_BxCxV: jax.Array, target_BxC: jax.Array, axes: Axes = None
) -> tuple[jax.Array, jax.Array]:
    """log softmax(z)[target] and the entropy of softmax(z), fp32, per row.

    With `axes`, z holds this device's slice of the vocabulary and `target` is the target's
    index within the slice (out of range where the target lies in another device's slice).
    """
    return _forward(z_BxCxV, target_BxC, axes)[0]


def _forward(z_BxCxV, target_BxC, axes):
    total = functools.partial(jax.lax.psum, axis_name=axes) if axes else lambda x: x
    peak_BxC = z_BxCxV.max(axis=-1)
    if axes:
        peak_BxC = jax.lax.pmax(peak_BxC, axes)
    # One pass after the max gives both sums (entropy = log s - t / s), not two in a row.
    shifted = z_BxCxV - peak_BxC[..., None]
    exp_shifted = jnp.exp(shifted)
    sum_exp_BxC, sum_exp_shifted_BxC = total(
        (exp_shifted.sum(axis=-1), (exp_shifted * shifted).sum(axis=-1))
    )
    log_sum_exp_BxC = jnp.log(sum_exp_BxC)
    logsumexp_BxC = checkpoint_name(peak_BxC + log_sum_exp_BxC, LOGSUMEXP)
    entropy_BxC = checkpoint_name(log_sum_exp_BxC - sum_exp_shifted_BxC / sum_exp_BxC, ENTROPY)
    slice_size = z_BxCxV.shape[-1]
    here_BxC = (target_BxC >= 0) & (target_BxC < slice_size)
    index_BxCx1 = jnp.clip(target_BxC, 0, slice_size - 1)[..., None]
    picked_BxC = jnp.take_along_axis(z_BxCxV, index_BxCx1, axis=-1)[..., 0]
    logp_BxC = total(jnp.where(here_BxC, picked_BxC, 0.0)) - logsumexp_BxC
    return (logp_BxC, entropy_BxC), (z_BxCxV, target_BxC, logsumexp_BxC, entropy_BxC)


def _backward(axes, residuals, cotangents):
    del axes  # every term is this device's: softmax(z) over the whole vocabulary, sliced
    z_BxCxV, target_BxC, logsumexp_BxC, entropy_BxC = residuals
    d_logp_BxC, d_entropy_BxC = cotangents
    logp_all = z_BxCxV - logsumexp_BxC[..., None]
    p = jnp.exp(logp_all)
    vocab_ids = jax.lax.broadcasted_iota(target_BxC.dtype, z_BxCxV.shape, z_BxCxV.ndim - 1)
    onehot = (vocab_ids == target_BxC[..., None]).astype(z_BxCxV.dtype)
    d_z = d_logp_BxC[..., None] * (onehot - p) - d_entropy_BxC[..., None] * p * (
        logp_all + entropy_BxC[..., None]
    )
    return d_z, None


target_logprob_and_entropy.defvjp(_forward, _backward)

# Where a kept set leaves a logit out: exp() of it minus any real logit is 0, and 0 times it
# is 0 (where -inf would make the entropy's p log p a NaN).
_LEFT_OUT = -1e30


def keep_only(z_BxCxV: jax.Array, kept_BxCxK: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """`z` with every logit but those of each position's kept ids (less `offset`, the slice's
    first id, on a vocabulary slice) pushed out of the softmax; ids outside the slice are
    ignored. Unchanged where K = 0 (no kept set: the whole vocabulary)."""
    if kept_BxCxK.shape[-1] == 0:
        return z_BxCxV
    b, c, v = z_BxCxV.shape
    ids = kept_BxCxK - offset
    ids = jnp.where((ids >= 0) & (ids < v), ids, v)  # out of range: dropped (never wrapped)
    rows, slots = jnp.arange(b)[:, None, None], jnp.arange(c)[None, :, None]
    kept = jnp.zeros((b, c, v), bool).at[rows, slots, ids].set(True, mode="drop")
    return jnp.where(kept, z_BxCxV, _LEFT_OUT)
