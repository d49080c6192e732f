"""Group-relative advantages: each completion's reward against the other samples of its prompt.

Rewards arrive grouped contiguously: rows i*n .. i*n+n-1 are the n samples of prompt i (the
sampler repeats each prompt n times in a row). The spread is the *sample* standard deviation
(ddof=1), as in TRL and verl (`torch.std`), so hand-computed values match theirs. With several
rewards, `decoupled_advantages` normalises each on its own before summing (GDPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none", "rloo")
# How a total of several rewards becomes an advantage: GRPO normalises the weighted sum;
# GDPO (`decoupled_advantages`) normalises each reward, then sums.
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def group_advantages(
    rewards_B: jax.Array, *, group_size: int, scale: str = "group", eps: float = 1e-4
) -> jax.Array:
    """(r - mean of its group) / (std + eps), fp32, shape (B,).

    scale: "group" divides by the std within the group (GRPO), "batch" by the std over the whole
    batch (the mean is still per group; REINFORCE++'s baseline), "none" does not divide (Dr.
    GRPO), "rloo" takes r minus the mean of the group's other rewards, n / (n - 1) times the
    centred reward (RLOO). A group whose rewards are all equal gets exactly zero advantages
    (never NaN, whatever eps is).
    """
    if scale not in SCALES:
        raise ValueError(f"advantage scale must be one of {SCALES}, got {scale!r}")
    (batch,) = rewards_B.shape
    if group_size < 1 or batch % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {batch} rewards")
    rewards_GxN = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    # Compare extremes instead of testing the centred values: the fp mean of equal rewards can
    # differ from them in the last bit.
    flat_Gx1 = rewards_GxN.max(axis=1, keepdims=True) == rewards_GxN.min(axis=1, keepdims=True)
    centred_GxN = jnp.where(flat_Gx1, 0.0, rewards_GxN - rewards_GxN.mean(axis=1, keepdims=True))
    if scale == "none":
        return centred_GxN.reshape(batch)
    if scale == "rloo":
        return (centred_GxN * (group_size / max(group_size - 1, 1))).reshape(batch)
    if scale == "group":
        std = jnp.std(rewards_GxN, axis=1, keepdims=True, ddof=1)
    else:
        std = jnp.std(rewards_GxN, ddof=1)
    # Flat groups (all groups when group_size == 1, where ddof=1 gives NaN) divide by 1 instead,
    # which keeps 0/0 and NaN out.
    return (centred_GxN / jnp.where(flat_Gx1, 1.0, std + eps)).reshape(batch)


def decoupled_advantages(
    rewards_BxF: jax.Array, weights_F: jax.Array, *, group_size: int, eps: float = 1e-4
) -> jax.Array:
    """GDPO's advantages for a total of several rewards (the columns, weighted by `weights_F`):
    each reward normalised within its groups on its own, as `group_advantages` does, so one
    reward's spread does not drown another's; their weighted sum, divided by its std over the
    whole batch, so the scale does not grow with the number of rewards. fp32, shape (B,).

    (GDPO also subtracts the sum's batch mean, which is 0 here by construction: each group's
    normalised rewards sum to 0. Leaving it out keeps a group whose rewards are all equal at
    exactly zero.)"""
    per_reward = lambda r_B: group_advantages(r_B, group_size=group_size, scale="group", eps=eps)
    summed_B = jax.vmap(per_reward, in_axes=1, out_axes=1)(rewards_BxF) @ weights_F
    return summed_B / (jnp.std(summed_B, ddof=1) + eps)
