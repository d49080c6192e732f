"""Group-relative advantages: each completion's reward against the other samples of its prompt.

Rewards arrive grouped contiguously: rows i*n .. i*n+n-1 are the n samples of prompt i (the
sampler repeats each prompt n times in a row). The spread is the *sample* standard deviation
(ddof=1), as in TRL and verl (`torch.std`), so hand-computed values match theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none", "rloo")


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
