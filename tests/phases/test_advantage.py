"""Group advantages against hand-computed values (sample std, ddof=1)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo.phases.advantage import decoupled_advantages, group_advantages

# Two groups of 3: [0, 3, 6] (mean 3, sample std sqrt((9+0+9)/2) = 3) and a flat [1, 1, 1].
REWARDS = jnp.array([0.0, 3.0, 6.0, 1.0, 1.0, 1.0])


def test_group_scale():
    got = group_advantages(REWARDS, group_size=3, eps=0.0)
    np.testing.assert_allclose(got, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_group_scale_with_eps_and_uneven_group():
    # [0, 0, 3]: mean 1, deviations (-1, -1, 2), sample var (1+1+4)/2 = 3.
    got = group_advantages(jnp.array([0.0, 0.0, 3.0]), group_size=3, eps=1e-4)
    std = math.sqrt(3.0) + 1e-4
    np.testing.assert_allclose(got, [-1 / std, -1 / std, 2 / std], rtol=1e-6)


def test_batch_scale():
    # Batch mean 2; deviations (-2, 1, 4, -1, -1, -1): sample var 24/5 = 4.8. Centred per group:
    # (-3, 0, 3, 0, 0, 0).
    got = group_advantages(REWARDS, group_size=3, scale="batch", eps=0.0)
    s = math.sqrt(4.8)
    np.testing.assert_allclose(got, [-3 / s, 0.0, 3 / s, 0.0, 0.0, 0.0], rtol=1e-6)


def test_no_scale_is_dr_grpo():
    got = group_advantages(REWARDS, group_size=3, scale="none")
    np.testing.assert_allclose(got, [-3.0, 0.0, 3.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # Group (1, 0, 0, 1): 1 - mean(0, 0, 1) = 2/3, 0 - mean(1, 0, 1) = -2/3.
    got = group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), group_size=4, scale="rloo")
    np.testing.assert_allclose(got, [2 / 3, -2 / 3, -2 / 3, 2 / 3], atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none", "rloo"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_equal_rewards_give_exact_zeros(scale, eps):
    # 0.1 is not exact in binary: the fp mean of three 0.1s is not 0.1 to the last bit.
    rewards = jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    got = np.asarray(group_advantages(rewards, group_size=3, scale=scale, eps=eps))
    assert np.all(got == 0.0), got


@pytest.mark.parametrize("scale", ["group", "batch", "rloo"])
def test_group_of_one_is_zero_not_nan(scale):
    got = np.asarray(group_advantages(jnp.array([1.0, 2.0]), group_size=1, scale=scale))
    assert np.all(got == 0.0), got


def test_jits_and_keeps_contiguous_groups():
    fn = jax.jit(functools.partial(group_advantages, group_size=2, eps=0.0))
    # Groups (1, 3) and (10, 10): sample std of (1, 3) is sqrt(2).
    got = fn(jnp.array([1.0, 3.0, 10.0, 10.0]))
    np.testing.assert_allclose(got, [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0], rtol=1e-6)
    assert got.dtype == jnp.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_size=4 does not divide the batch of 6"):
        group_advantages(REWARDS, group_size=4)
    with pytest.raises(ValueError, match="advantage scale must be one of"):
        group_advantages(REWARDS, group_size=3, scale="global")


# Two groups of 2 and two rewards, weights (1, 0.5): group 1 differs in correctness alone, group
# 2 in format alone. Summed first (GRPO), totals (1.5, 1) and (0.5, 0) both normalise to
# +-1/sqrt(2). Each normalised alone (a pair's sample std is |a - b| / sqrt(2)), then weighted:
# (1/sqrt(2), -1/sqrt(2), 0.5/sqrt(2), -0.5/sqrt(2)); their sample std is sqrt(1.25 / 3).
CORRECTNESS_AND_FORMAT = jnp.array([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
WEIGHTS = jnp.array([1.0, 0.5])


def test_decoupled_advantages_keep_each_rewards_weight():
    got = decoupled_advantages(CORRECTNESS_AND_FORMAT, WEIGHTS, group_size=2, eps=0.0)
    big, small = math.sqrt(6 / 5), math.sqrt(3 / 10)  # 0.5 / sqrt(5/12), 0.125 / ...
    np.testing.assert_allclose(got, [big, -big, small, -small], rtol=1e-6)
    summed = group_advantages(CORRECTNESS_AND_FORMAT @ WEIGHTS, group_size=2, eps=0.0)
    np.testing.assert_allclose(summed, [0.5**0.5, -(0.5**0.5)] * 2, rtol=1e-6)  # collapsed


def test_decoupled_advantages_of_one_reward_are_grpos_over_their_batch_std():
    got = decoupled_advantages(REWARDS[:, None], jnp.array([2.0]), group_size=3)
    weighted = 2.0 * group_advantages(REWARDS, group_size=3)
    np.testing.assert_allclose(got, weighted / (jnp.std(weighted, ddof=1) + 1e-4), rtol=1e-6)


def test_decoupled_advantages_of_equal_rewards_are_exact_zeros():
    flat = jnp.array([[1.0, 0.3], [1.0, 0.3], [0.0, 0.7], [0.0, 0.7]])
    got = decoupled_advantages(flat, WEIGHTS, group_size=2)
    assert np.array_equal(got, np.zeros(4))
    # A flat group beside a varied one stays exactly zero too.
    mixed = flat.at[2, 0].set(1.0)
    got = decoupled_advantages(mixed, WEIGHTS, group_size=2)
    assert np.array_equal(got[:2], np.zeros(2)) and got[2] > 0 > got[3]
