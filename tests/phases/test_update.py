"""The GRPO loss by hand, its gradient against REINFORCE, exact micro-batching, the jitted update
(several iterations on one rollout, sharded == unsharded) and the reference log-probs."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo import optim, sharding
from grpo.models import presets
from grpo.models import transformer as tf
from grpo.phases import update
from grpo.phases.update import LossConfig
from grpo.types import Batch, TrainState
from tests.models.jaxpr_utils import all_eqns

# ---------------------------------------------------------------- the loss from log-probs, by hand
# Two sequences of width 3. Sequence 0 (A = +1) has ratios (1.5, 0.5, 1.0); sequence 1 (A = -2)
# has ratios (0.7, 1.1) and a padding slot holding garbage (inf ratio, inf reference).
# Clipped surrogate per token, eps = 0.2, loss = -min(r A, clip(r, 0.8, 1.2) A):
#   seq 0: r=1.5 -> -min(1.5, 1.2) = -1.2 (clipped high); r=0.5 -> -0.5; r=1.0 -> -1.0
#   seq 1: r=0.7 -> -min(-1.4, -1.6) = 1.6 (clipped low); r=1.1 -> -min(-2.2, -2.2) = 2.2
# Sums: seq 0 -2.7 over 3 tokens, seq 1 3.8 over 2 tokens; 5 valid tokens in all.
RATIOS = np.array([[1.5, 0.5, 1.0], [0.7, 1.1, 1.0]])
MASK = jnp.array([[True, True, True], [True, True, False]])
ADVANTAGES = jnp.array([1.0, -2.0])
LOGPS = jnp.where(MASK, jnp.log(jnp.asarray(RATIOS, jnp.float32)) - 1.0, 7.0)
OLD_LOGPS = jnp.where(MASK, -1.0, -jnp.inf)
# Reference offsets d = ref - logp: ln 2 at (0, 0) and -ln 2 at (1, 1). k3 = e^d - d - 1 gives
# 1 - ln 2 and 0.5 + ln 2 - 1: together exactly 0.5, so the token-mean KL is 0.5 / 5 = 0.1.
REF_LOGPS = jnp.where(MASK, LOGPS + jnp.array([[math.log(2), 0, 0], [0, -math.log(2), 0]]), jnp.inf)
KL_SEQ0, KL_SEQ1 = 1 - math.log(2), math.log(2) - 0.5


@pytest.mark.parametrize(
    "aggregation, max_len, expected",
    [
        ("token_mean", None, (-2.7 + 3.8) / 5),  # 0.22
        ("seq_mean_token_mean", None, (-2.7 / 3 + 3.8 / 2) / 2),  # 0.5
        ("seq_mean_token_sum_norm", 4, (-2.7 / 4 + 3.8 / 4) / 2),  # 0.1375
        ("seq_mean_token_sum_norm", None, (-2.7 / 3 + 3.8 / 3) / 2),  # L defaults to width 3
        ("seq_mean_token_sum", None, (-2.7 + 3.8) / 2),  # 0.55 (LUSPO's sum)
    ],
)
def test_policy_loss_by_hand(aggregation, max_len, expected):
    config = LossConfig(aggregation=aggregation, max_completion_length=max_len)
    loss, aux = update.policy_loss(LOGPS, OLD_LOGPS, None, ADVANTAGES, MASK, config=config)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(aux["clip_frac_low"]), 1 / 5, rtol=1e-6)
    np.testing.assert_allclose(float(aux["clip_frac_high"]), 1 / 5, rtol=1e-6)
    np.testing.assert_allclose(float(aux["ratio_mean"]), (1.5 + 0.5 + 1 + 0.7 + 1.1) / 5, rtol=1e-6)
    abs_logs = sum(abs(math.log(r)) for r in (1.5, 0.5, 1.0, 0.7, 1.1)) / 5
    np.testing.assert_allclose(float(aux["abs_log_ratio_mean"]), abs_logs, rtol=1e-6)
    assert float(aux["kl"]) == 0.0


def test_policy_gradient_by_hand():
    # token_mean: d loss / d logp = -r A / 5 where the ratio is not clipped, 0 where it is:
    #   seq 0: clipped, -0.5/5, -1.0/5;  seq 1: clipped, 2.2/5 (r=1.1 ties at the clip), padding 0.
    # Padding holds garbage (old log-prob -inf) and must neither leak NaN nor receive gradient.
    grad = jax.grad(
        lambda lp: update.policy_loss(lp, OLD_LOGPS, None, ADVANTAGES, MASK, config=LossConfig())[0]
    )(LOGPS)
    np.testing.assert_allclose(grad, [[0.0, -0.1, -0.2], [0.0, 0.44, 0.0]], atol=1e-6)


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        ("token_mean", 0.22 + 0.1 * 0.5 / 5),
        ("seq_mean_token_mean", 0.5 + 0.1 * (KL_SEQ0 / 3 + KL_SEQ1 / 2) / 2),
        ("seq_mean_token_sum_norm", (-2.7 / 3 + 3.8 / 3) / 2 + 0.1 * (KL_SEQ0 + KL_SEQ1) / 3 / 2),
    ],
)
def test_kl_term_by_hand(aggregation, expected):
    config = LossConfig(aggregation=aggregation, beta=0.1)
    loss, aux = update.policy_loss(LOGPS, OLD_LOGPS, REF_LOGPS, ADVANTAGES, MASK, config=config)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(aux["kl"]), 0.1, rtol=1e-6)


@pytest.mark.parametrize(
    "estimator, kl_mean, kl_grad",
    [
        # log r = ref - logp: ln 2 at (0, 0), -ln 2 at (1, 1), 0 elsewhere; 5 valid tokens.
        ("k3", 0.5 / 5, [[1 - 2, 0, 0], [0, 1 - 0.5, 0]]),  # d/dlogp: 1 - r
        ("k2", math.log(2) ** 2 / 5, [[-math.log(2), 0, 0], [0, math.log(2), 0]]),  # -log r
        ("k1", 0.0, [[1, 1, 1], [1, 1, 0]]),  # d/dlogp of -log r: 1 on every valid token
    ],
)
def test_kl_estimators_by_hand(estimator, kl_mean, kl_grad):
    # Zero advantages leave the KL term alone; beta = 1, token_mean: gradient / 5 tokens.
    config = LossConfig(beta=1.0, kl_estimator=estimator)
    zero_adv = jnp.zeros(2)
    loss_fn = lambda lp: update.policy_loss(lp, OLD_LOGPS, REF_LOGPS, zero_adv, MASK, config=config)
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(LOGPS)
    np.testing.assert_allclose([float(loss), float(aux["kl"])], [kl_mean, kl_mean], atol=1e-6)
    np.testing.assert_allclose(grad, np.array(kl_grad) / 5, atol=1e-6)


def test_importance_weighted_kl_by_hand():
    # Each token's k3 times its ratio pi / pi_old (RATIOS): 1.5 (1 - ln 2) at (0, 0) and
    # 1.1 (ln 2 - 0.5) at (1, 1), 0 elsewhere. Its gradient in log pi, ratio x (k3 + 1 -
    # pi_ref / pi) = ratio x log(pi / pi_ref): -1.5 ln 2 and 1.1 ln 2 (unweighted: -1 and 0.5).
    config = LossConfig(beta=1.0, kl_importance_weighted=True)
    zero_adv = jnp.zeros(2)
    loss_fn = lambda lp: update.policy_loss(lp, OLD_LOGPS, REF_LOGPS, zero_adv, MASK, config=config)
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(LOGPS)
    kl_mean = (1.5 * KL_SEQ0 + 1.1 * KL_SEQ1) / 5
    np.testing.assert_allclose([float(loss), float(aux["kl"])], [kl_mean, kl_mean], rtol=1e-6)
    ln2 = math.log(2)
    np.testing.assert_allclose(grad, [[-1.5 * ln2 / 5, 0, 0], [0, 1.1 * ln2 / 5, 0]], atol=1e-6)


@pytest.mark.parametrize(
    "aggregation, expected",
    [
        # Entropies (1, 2, 3) and (4, 5) on the valid tokens; c = 0.1.
        ("token_mean", 0.22 - 0.1 * 15 / 5),
        ("seq_mean_token_mean", 0.5 - 0.1 * (6 / 3 + 9 / 2) / 2),
    ],
)
def test_entropy_bonus_by_hand(aggregation, expected):
    entropy = jnp.where(MASK, jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]), jnp.inf)
    config = LossConfig(aggregation=aggregation, entropy_coeff=0.1)
    loss_fn = lambda e: update.policy_loss(
        LOGPS, OLD_LOGPS, None, ADVANTAGES, MASK, e, config=config
    )
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(entropy)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert float(aux["entropy"]) == pytest.approx(3.0)  # the token mean, whatever the mode
    weights = update.token_weights(MASK, config=config) / update.loss_normaliser(
        MASK, config=config
    )
    np.testing.assert_allclose(grad, -0.1 * weights, atol=1e-7)  # padding: 0


@pytest.mark.parametrize(
    "rho, expected, expected_grad",
    [
        # Entropies (1, 2, 3) and (4, 5): the 0.6 quantile is 3.4, so only seq 1's tokens count;
        # the 0.4 quantile is 2.6, adding seq 0's last (unclipped, r = 1: gradient -1/5).
        (0.4, (1.6 + 2.2) / 5, [[0.0, 0.0, 0.0], [0.0, 0.44, 0.0]]),
        (0.6, (-1.0 + 1.6 + 2.2) / 5, [[0.0, 0.0, -0.2], [0.0, 0.44, 0.0]]),
        (1.0, 0.22, [[0.0, -0.1, -0.2], [0.0, 0.44, 0.0]]),
    ],
)
def test_top_entropy_quantile_by_hand(rho, expected, expected_grad):
    entropy = jnp.where(MASK, jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]), jnp.inf)
    config = LossConfig(top_entropy_quantile=rho)
    loss_fn = lambda lp: update.policy_loss(
        lp, OLD_LOGPS, None, ADVANTAGES, MASK, entropy, config=config
    )
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(LOGPS)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)  # N stays all 5 tokens
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)
    assert float(aux["entropy"]) == pytest.approx(3.0)  # statistics still cover every token


def test_dual_clip_and_asymmetric_epsilons():
    # A = -2, ratios (3.0, 0.5): losses max(6, 2.4) = 6 and max(1, 1.6) = 1.6 (clipped low).
    # Dual clip c = 2.5 caps the first at -c A = 5.
    logps = jnp.log(jnp.array([[3.0, 0.5]]))
    old, mask, adv = jnp.zeros((1, 2)), jnp.ones((1, 2), bool), jnp.array([-2.0])
    plain, aux = update.policy_loss(logps, old, None, adv, mask, config=LossConfig())
    capped, _ = update.policy_loss(logps, old, None, adv, mask, config=LossConfig(dual_clip=2.5))
    np.testing.assert_allclose([float(plain), float(capped)], [3.8, 3.3], rtol=1e-6)
    assert float(aux["clip_frac_low"]) == 0.5
    # DAPO's clip-higher: A = +1, ratio 1.5 clips at 1 + 0.28.
    config = LossConfig(epsilon_high=0.28)
    high, _ = update.policy_loss(
        jnp.log(jnp.array([[1.5]])), old[:, :1], None, jnp.array([1.0]), mask[:, :1], config=config
    )
    np.testing.assert_allclose(float(high), -1.28, rtol=1e-6)


def test_cispo_by_hand():
    # Each token's weight is its ratio clipped to [0.8, 1.2], held constant: seq 0 (A = +1)
    # 1.2, 0.8, 1.0; seq 1 (A = -2) 0.8, 1.1. Loss -w A per token: -1.2 -0.8 -1.0 and 1.6 2.2,
    # token mean 0.8 / 5. Gradient -w A / 5 on every valid token, the clipped ones included.
    def loss_fn(logps, config):
        return update.policy_loss(logps, OLD_LOGPS, None, ADVANTAGES, MASK, config=config)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grad = value_and_grad(LOGPS, LossConfig(objective="cispo"))
    np.testing.assert_allclose(float(loss), 0.8 / 5, rtol=1e-6)
    np.testing.assert_allclose(grad, [[-0.24, -0.16, -0.2], [0.32, 0.44, 0.0]], atol=1e-6)
    # Clipped: any weight that hit a bound, whatever its advantage's sign (0.5 and 0.7; 1.5).
    np.testing.assert_allclose(float(aux["clip_frac_low"]), 2 / 5, rtol=1e-6)
    np.testing.assert_allclose(float(aux["clip_frac_high"]), 1 / 5, rtol=1e-6)
    # No lower bound (epsilon_low = 1, MiniMax-M1's choice): the weights are the ratios below 1.
    _, grad = value_and_grad(LOGPS, LossConfig(objective="cispo", epsilon_low=1.0))
    np.testing.assert_allclose(grad, [[-0.24, -0.1, -0.2], [0.28, 0.44, 0.0]], atol=1e-6)


def _vespo_weight(log_w, k, lam):
    return np.exp(lam + k * log_w - lam * np.exp(log_w))


def test_vespo_by_hand():
    # Each completion's ratio is the product of its tokens': seq 0 (A = +1) 1.5 x 0.5 x 1.0 =
    # 0.75, seq 1 (A = -2) 0.7 x 1.1 = 0.77. Weights phi(w) = e^lam w^k e^(-lam w) with (k,
    # lam) = (2, 3) for A >= 0 and (3, 2) for A < 0: phi_0 = e^0.75 0.75^2 = 1.1908, phi_1 =
    # e^0.46 0.77^3 = 0.7232. Loss -phi A per token, token mean: (-3 phi_0 + 4 phi_1) / 5; the
    # gradient -phi A / 5 on each valid token, whatever its own ratio.
    def loss_and_grad(logps, **knobs):
        config = LossConfig(objective="vespo", **knobs)
        loss_fn = lambda lp: update.policy_loss(
            lp, OLD_LOGPS, None, ADVANTAGES, MASK, config=config
        )
        return jax.value_and_grad(loss_fn, has_aux=True)(logps)

    (loss, aux), grad = loss_and_grad(LOGPS)
    phi = np.array([_vespo_weight(np.log(0.75), 2, 3), _vespo_weight(np.log(0.77), 3, 2)])
    np.testing.assert_allclose(phi, [1.190813, 0.723182], rtol=1e-6)
    np.testing.assert_allclose(float(loss), (-3 * phi[0] + 4 * phi[1]) / 5, rtol=1e-6)
    expected_grad = np.where(MASK, -(phi * np.array([1.0, -2.0]))[:, None] / 5, 0)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)
    weight_mean = (3 * phi[0] + 2 * phi[1]) / 5
    np.testing.assert_allclose(float(aux["vespo_weight_mean"]), weight_mean, rtol=1e-6)
    assert float(aux["clip_frac_low"]) == float(aux["clip_frac_high"]) == 0.0
    # On the policy (w = 1) the weight is 1: GRPO's gradient, -A / 5 per token.
    (_, aux), grad = loss_and_grad(jnp.where(MASK, OLD_LOGPS, 7.0))
    np.testing.assert_allclose(grad, np.where(MASK, [[-0.2], [0.4]], 0), atol=1e-6)
    assert float(aux["vespo_weight_mean"]) == pytest.approx(1.0)
    # Far off the policy either way the weight vanishes, without NaN (log w is clamped to TRL's
    # [log 1e-8, 20])...
    for shift in (60.0, -60.0):
        (loss, aux), grad = loss_and_grad(jnp.where(MASK, OLD_LOGPS + shift, 7.0))
        assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
        assert float(aux["vespo_weight_mean"]) < 1e-12
    # ...and each token's log-ratio is clamped to [-20, 20] before the sum: log-ratios 60 and
    # -45 count as 20 and -20, so that completion's w is 1 (seq 1 stays on the policy too).
    swings = jnp.where(MASK, OLD_LOGPS + jnp.array([[60.0, -45.0, 0.0], [0.0, 0.0, 0.0]]), 7.0)
    (_, aux), _ = loss_and_grad(swings)
    assert float(aux["vespo_weight_mean"]) == pytest.approx(1.0)


def test_entropy_control_by_hand():
    # Target 0.5, steps of 0.1 within [0, 0.2], from 0.05. After each update the coefficient
    # moves up (entropy at or below the target) or down: 0.15, 0.05, 0.15, 0.2 (capped), 0.2
    # (0.5 is at the target), 0.1, 0.0, 0.0 (floored). An update applies it only when the
    # last update's entropy was at or below the target, none before the first.
    loss = LossConfig(
        entropy_target=0.5, entropy_coeff=0.05, entropy_coeff_delta=0.1, entropy_coeff_max=0.2
    )
    control = update.initial_entropy_control(loss)
    applied = []
    for entropy in (0.3, 0.6, 0.4, 0.45, 0.5, 0.9, 0.9, 0.9):
        applied.append(float(update.applied_entropy_coeff(control, loss)))
        control = update.next_entropy_control(control, jnp.float32(entropy), loss)
    np.testing.assert_allclose(applied, [0, 0.15, 0, 0.15, 0.2, 0.2, 0, 0], atol=1e-6)
    assert float(control.coeff) == 0.0 and float(control.last_entropy) == pytest.approx(0.9)
    assert update.initial_entropy_control(LossConfig()) is None  # no target, no state


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_sapo_by_hand():
    # Soft gate f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = 1 for seq 0 (A = +1) and 1.05 for
    # seq 1 (A = -2); loss -f(r) A per token. Seq 0's ratios 1.5, 0.5, 1.0: sigmoid(0.5) +
    # sigmoid(-0.5) = 1, so its losses sum to -(4 + 2) = -6. The gradient in log pi is
    # -4 s (1 - s) r A / 5 (s the token's sigmoid): -A / 5 at r = 1, as GRPO's; for the tokens
    # the clip would leave no gradient (1.5 above, 0.7 below), the unclipped surrogate's
    # -r A / 5 damped by 4 s (1 - s) < 1.
    def loss_and_grad(**taus):
        config = LossConfig(objective="sapo", **taus)
        loss_fn = lambda lp: update.policy_loss(
            lp, OLD_LOGPS, None, ADVANTAGES, MASK, config=config
        )
        return jax.value_and_grad(loss_fn, has_aux=True)(LOGPS)

    (loss, aux), grad = loss_and_grad()
    tau = np.array([[1.0], [1.05]])
    s = _sigmoid(tau * (RATIOS - 1))
    seq1_loss = 2 * (4 / 1.05) * (s[1, 0] + s[1, 1])
    np.testing.assert_allclose(float(loss), (-6.0 + seq1_loss) / 5, rtol=1e-6)
    expected_grad = np.where(MASK, -4 * s * (1 - s) * RATIOS * np.array([[1.0], [-2.0]]) / 5, 0)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)
    assert float(grad[0, 2]) == pytest.approx(-0.2)
    assert 0 > float(grad[0, 0]) > -1.5 / 5 and 0 < float(grad[1, 0]) < 0.7 * 2 / 5
    assert float(aux["clip_frac_low"]) == float(aux["clip_frac_high"]) == 0.0  # none clipped
    # What the gate keeps instead: the mean of 4 s (1 - s) over the 5 valid tokens (1 at r = 1).
    kept = np.where(MASK, 4 * s * (1 - s), 0).sum() / 5
    np.testing.assert_allclose(float(aux["sapo_grad_weight_mean"]), kept, rtol=1e-6)
    assert 0.9 < kept < 1.0
    plain = update.policy_loss(LOGPS, OLD_LOGPS, None, ADVANTAGES, MASK, config=LossConfig())[1]
    assert "sapo_grad_weight_mean" not in plain  # SAPO's alone
    # A larger tau fades faster: the 1.5 token keeps less of its gradient at tau_pos 4.
    _, steep = loss_and_grad(sapo_tau_pos=4.0)
    s = _sigmoid(4.0 * 0.5)
    np.testing.assert_allclose(float(steep[0, 0]), -4 * s * (1 - s) * 1.5 / 5, rtol=1e-5)
    assert abs(float(steep[0, 0])) < abs(float(grad[0, 0]))


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_off_policy_sequence_mask_by_hand(beta):
    # Mean log(pi_old / pi) per completion: seq 0 -(ln 1.5 + ln 0.5) / 3 = 0.0959 (A = +1: never
    # masked), seq 1 -(ln 0.7 + ln 1.1) / 2 = 0.1307 (A = -2). At delta 0.1 seq 1 loses its
    # policy term (1.6 + 2.2) but keeps its KL; N stays 5 tokens. At 0.2 nothing is masked.
    ref = REF_LOGPS if beta else None

    def loss_and_grad(delta):
        config = LossConfig(off_policy_mask_threshold=delta, beta=beta)
        loss_fn = lambda lp: update.policy_loss(lp, OLD_LOGPS, ref, ADVANTAGES, MASK, config=config)
        return jax.value_and_grad(loss_fn, has_aux=True)(LOGPS)

    kl_mean = beta and (KL_SEQ0 + KL_SEQ1) / 5
    (loss, aux), grad = loss_and_grad(0.1)
    np.testing.assert_allclose(float(loss), -2.7 / 5 + beta * kl_mean, rtol=1e-6)
    np.testing.assert_allclose(float(aux["off_policy_masked_frac"]), 2 / 5, rtol=1e-6)
    kl_grad_seq1 = beta * (1 - 0.5) / 5  # k3's d/dlogp at ref/pi = 1/2: 1 - 1/2, at (1, 1) only
    np.testing.assert_allclose(grad[1], [0.0, kl_grad_seq1, 0.0], atol=1e-6)
    (loss, aux), _ = loss_and_grad(0.2)
    np.testing.assert_allclose(float(loss), 0.22 + beta * kl_mean, rtol=1e-6)
    assert float(aux["off_policy_masked_frac"]) == 0.0
    _, plain = update.policy_loss(
        LOGPS, OLD_LOGPS, ref, ADVANTAGES, MASK, config=LossConfig(beta=beta)
    )
    assert "off_policy_masked_frac" not in plain  # a metric only when the mask is on


def test_sequence_level_importance_ratio_by_hand():
    # GSPO: a completion's ratio is the geometric mean of its tokens' ratios,
    #   seq 0: (1.5 * 0.5 * 1.0)^(1/3) = 0.75^(1/3) ~ 0.909;  seq 1: (0.7 * 1.1)^(1/2) ~ 0.877,
    # both inside [0.8, 1.2]: nothing clips (at token level 1.5 and 0.7 clipped).
    s0, s1 = 0.75 ** (1 / 3), 0.77**0.5
    config = LossConfig(importance_sampling_level="sequence")
    loss_fn = lambda lp: update.policy_loss(lp, OLD_LOGPS, None, ADVANTAGES, MASK, config=config)
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(LOGPS)
    np.testing.assert_allclose(float(loss), (3 * -s0 + 2 * 2 * s1) / 5, rtol=1e-6)
    np.testing.assert_allclose(float(aux["ratio_mean"]), (3 * s0 + 2 * s1) / 5, rtol=1e-6)
    assert float(aux["clip_frac_low"]) == float(aux["clip_frac_high"]) == 0.0
    # loss = sum_b |y_b| (-A_b s_b) / 5 and d s_b / d logp_bt = s_b / |y_b|: every token of a
    # completion gets -A_b s_b / 5, the one clipped at token level (ratio 1.5) included.
    np.testing.assert_allclose(
        grad, [[-s0 / 5] * 3, [2 * s1 / 5, 2 * s1 / 5, 0.0]], rtol=1e-5, atol=1e-7
    )
    config = LossConfig(importance_sampling_level="sequence", aggregation="seq_mean_token_mean")
    loss, _ = update.policy_loss(LOGPS, OLD_LOGPS, None, ADVANTAGES, MASK, config=config)
    np.testing.assert_allclose(float(loss), (-s0 + 2 * s1) / 2, rtol=1e-6)


def test_sequence_level_ratio_clips_whole_completions():
    # Ratios (1.1, 1.3), A = +1, epsilon_high 0.15: the token level clips only 1.3. Their
    # geometric mean 1.196 is above 1.15, so the sequence level clips the whole completion:
    # loss -1.15 per token, no gradient on either token, both counted as clipped high.
    logps, old = jnp.log(jnp.array([[1.1, 1.3]])), jnp.zeros((1, 2))
    mask, adv = jnp.ones((1, 2), bool), jnp.array([1.0])
    config = LossConfig(importance_sampling_level="sequence", epsilon_high=0.15)
    loss_fn = lambda lp: update.policy_loss(lp, old, None, adv, mask, config=config)
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(logps)
    np.testing.assert_allclose(float(loss), -1.15, rtol=1e-6)
    assert float(aux["clip_frac_high"]) == 1.0
    np.testing.assert_array_equal(grad, np.zeros((1, 2)))
    config = LossConfig(epsilon_high=0.15)
    token, aux = update.policy_loss(logps, old, None, adv, mask, config=config)
    np.testing.assert_allclose(float(token), -(1.1 + 1.15) / 2, rtol=1e-6)
    assert float(aux["clip_frac_high"]) == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(aggregation="sum"), "aggregation must be one of"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level must be one of"),
        (dict(kl_estimator="mse"), "kl_estimator must be one of"),
        (dict(kl_estimator="k2"), "kl_estimator='k2' needs beta > 0"),  # else unused
        (dict(kl_importance_weighted=True), "kl_importance_weighted needs beta > 0"),
        (dict(epsilon_low=-0.1), "clip epsilons must be >= 0"),
        (dict(dual_clip=1.0), "dual_clip must be > 1"),
        (dict(beta=-1.0), "beta must be >= 0"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(max_completion_length=0), "max_completion_length must be >= 1"),
        (dict(logprob_chunk=0), "logprob_chunk must be >= 1"),
        (dict(top_entropy_quantile=0.0), "top_entropy_quantile must be in"),
        (dict(objective="ppo"), "objective must be one of"),
        (dict(objective="cispo", dual_clip=3.0), "objective='cispo' has none"),
        (dict(objective="cispo", importance_sampling_level="sequence"), "needs 'token'"),
        (dict(objective="sapo", dual_clip=3.0), "objective='sapo' has none"),
        (dict(objective="sapo", importance_sampling_level="sequence"), "needs 'token'"),
        (dict(objective="sapo", epsilon_high=0.28), "weighs the ratio instead of clipping"),
        (dict(objective="sapo", sapo_tau_neg=0.0), "must be > 0, got 1.0 and 0.0"),
        (dict(sapo_tau_neg=2.0), "they need objective='sapo'"),
        (dict(objective="vespo", dual_clip=3.0), "objective='vespo' has none"),
        (dict(objective="vespo", importance_sampling_level="sequence"), "needs 'token'"),
        (dict(objective="vespo", epsilon_low=0.1), "set vespo_k_pos / vespo_lambda_pos"),
        (dict(objective="vespo", vespo_k_neg=-1.0), "must be >= 0, got 2.0 and -1.0"),
        (dict(objective="vespo", vespo_lambda_pos=0.0), "must be > 0, got 0.0 and 2.0"),
        (dict(vespo_lambda_neg=1.0), "are VESPO's: they need objective='vespo'"),
        (dict(entropy_coeff_max=0.5), "steer adaptive entropy control: they need entropy_target"),
        (dict(entropy_target=0.0), "entropy_target and entropy_coeff_delta must be > 0"),
        (dict(entropy_target=1.0, entropy_coeff=2.0), "entropy_coeff .its start. <= entropy"),
        (dict(entropy_target=1.0, top_entropy_quantile=0.2), "use one of the two"),
        (dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold must be >= 0"),
    ],
)
def test_loss_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


# ------------------------------------------------------------------------------ on a tiny model
MODEL = presets.preset("tiny-qwen2", dtype="float32", remat="none")
TEMPERATURE = 0.7
CHUNK = 4  # < C, with a ragged last chunk: exercises the chunked log-softmax
PROMPT_LENS = np.array([5, 3, 4, 1, 5, 2, 4, 3])
COMPLETION_LENS = np.array([6, 3, 1, 5, 2, 6, 4, 0])
P, C = 5, 6


def _loss(**kwargs) -> LossConfig:
    return LossConfig(temperature=TEMPERATURE, logprob_chunk=CHUNK, **kwargs)


def _logps_and_entropy(params, batch):
    return tf.completion_logprobs(
        params,
        batch.prompt_tokens_BxP,
        batch.prompt_mask_BxP,
        batch.completion_tokens_BxC,
        batch.completion_mask_BxC,
        config=MODEL,
        temperature=TEMPERATURE,
        chunk=CHUNK,
    )


_logps = jax.jit(lambda params, batch: _logps_and_entropy(params, batch)[0])


@functools.cache
def _grad_fn(loss: LossConfig, num_micro_batches: int = 1):
    return jax.jit(
        functools.partial(
            update.compute_gradients, model=MODEL, loss=loss, num_micro_batches=num_micro_batches
        )
    )


def _init_params(seed: int):
    """Random weights from numpy (jax.random's eager compiles cost seconds on CPU); norm scales
    near 1, everything else N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def init(path, shape):
        base = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(shape), jnp.float32)

    shapes = tf.param_shapes(MODEL)
    return jax.tree_util.tree_map_with_path(init, shapes, is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def params():
    return _init_params(0)


@pytest.fixture(scope="module")
def batch(params):
    """8 completions; old log-probs = the current policy's, ref = current + noise."""
    rng = np.random.default_rng(1)
    b = len(PROMPT_LENS)
    prompt_mask = np.arange(P)[None] >= (P - PROMPT_LENS)[:, None]
    completion_mask = np.arange(C)[None] < COMPLETION_LENS[:, None]
    prompt = rng.integers(1, MODEL.vocab_size, (b, P), dtype=np.int32)
    completion = rng.integers(1, MODEL.vocab_size, (b, C), dtype=np.int32)
    zeros = jnp.zeros((b, C), jnp.float32)
    batch = Batch(
        prompt_tokens_BxP=jnp.where(prompt_mask, prompt, 0),
        prompt_mask_BxP=jnp.asarray(prompt_mask),
        completion_tokens_BxC=jnp.where(completion_mask, completion, 0),
        completion_mask_BxC=jnp.asarray(completion_mask),
        old_logps_BxC=zeros,
        advantages_B=jnp.asarray(rng.standard_normal(b), jnp.float32),
        truncated_B=jnp.asarray(COMPLETION_LENS == C),  # rows 0 and 5 fill the budget
    )
    logps = _logps(params, batch)
    return batch.replace(old_logps_BxC=jnp.where(completion_mask, logps, 0.0))


def _perturbed(batch, with_ref: bool):
    """Old (and reference) log-probs off the current policy, so that clipping and KL act."""
    rng = np.random.default_rng(2)
    noise = lambda: jnp.asarray(0.3 * rng.standard_normal(batch.old_logps_BxC.shape), jnp.float32)
    old = batch.old_logps_BxC + noise()
    return batch.replace(old_logps_BxC=old, ref_logps_BxC=old + noise() if with_ref else None)


def _assert_trees_close(a, b, atol, rtol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


def test_zero_advantages_give_zero_gradient(params, batch):
    zero = _perturbed(batch, with_ref=False).replace(advantages_B=jnp.zeros(8))
    grads, metrics = _grad_fn(_loss())(params, zero)
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads))
    assert float(metrics["clip_frac_low"]) == 0.0  # no A < 0 token
    assert 0.0 < float(metrics["entropy"]) <= math.log(MODEL.vocab_size)


def test_entropy_bonus_adds_the_entropy_gradient(params, batch):
    # Through the model: the gradient moves by exactly -c x the gradient of the token-mean
    # entropy (its written backward, models/log_softmax.py), computed here on its own.
    perturbed = _perturbed(batch, with_ref=False)
    plain, _ = _grad_fn(_loss())(params, perturbed)
    bonus, metrics = _grad_fn(_loss(entropy_coeff=0.5))(params, perturbed)

    def mean_entropy(p):
        entropy_BxC = _logps_and_entropy(p, batch)[1]
        mask = batch.completion_mask_BxC
        return jnp.where(mask, entropy_BxC, 0.0).sum() / mask.sum()

    entropy, entropy_grad = jax.value_and_grad(mean_entropy)(params)
    assert float(metrics["entropy"]) == pytest.approx(float(entropy), rel=1e-6)
    expected = jax.tree.map(lambda g, e: g - 0.5 * e, plain, entropy_grad)
    _assert_trees_close(bonus, expected, atol=1e-6, rtol=1e-4)
    assert max(float(jnp.abs(e).max()) for e in jax.tree.leaves(entropy_grad)) > 1e-3


def test_masked_tokens_have_no_effect(params, batch):
    batch = _perturbed(batch, with_ref=False)
    c_mask, p_mask = batch.completion_mask_BxC, batch.prompt_mask_BxP
    garbage = batch.replace(
        completion_tokens_BxC=jnp.where(c_mask, batch.completion_tokens_BxC, 17),
        prompt_tokens_BxP=jnp.where(p_mask, batch.prompt_tokens_BxP, 99),
        old_logps_BxC=jnp.where(c_mask, batch.old_logps_BxC, -jnp.inf),
    )
    grads, metrics = _grad_fn(_loss())(params, batch)
    grads_g, metrics_g = _grad_fn(_loss())(params, garbage)
    _assert_trees_close(grads_g, grads, atol=1e-7)
    _assert_trees_close(metrics_g, metrics, atol=1e-7)


def _assert_four_micro_batches_give(grads, metrics, loss, params, batch):
    grads_4, metrics_4 = _grad_fn(loss, 4)(params, batch)
    _assert_trees_close(grads_4, grads, atol=1e-6)
    _assert_trees_close(metrics_4, metrics, atol=1e-6)


@jax.jit
def _reinforce_grad(params, batch, weights_BxC, normaliser):
    """-sum_b A_b grad(sum_t w_bt logp_bt) / N, straight from the model's log-probs."""
    objective = lambda p: jnp.sum(batch.advantages_B[:, None] * weights_BxC * _logps(p, batch))
    return jax.tree.map(lambda g: -g / normaliser, jax.grad(objective)(params))


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("aggregation", update.AGGREGATIONS)
def test_gradient_is_reinforce_when_ratio_is_one(params, batch, aggregation, mask_truncated):
    # Masking truncated completions (rows 0 and 5) drops their tokens from the weights and from
    # token_mean's N; the sequence modes still divide by all 8 sequences.
    kept = ~np.asarray(batch.truncated_B) if mask_truncated else np.ones(8, bool)
    mask = np.asarray(batch.completion_mask_BxC, np.float32) * kept[:, None]
    weights, normaliser = {
        "token_mean": (mask, mask.sum()),
        "seq_mean_token_mean": (mask / np.maximum(mask.sum(1, keepdims=True), 1), 8.0),
        "seq_mean_token_sum_norm": (mask / C, 8.0),
        "seq_mean_token_sum": (mask, 8.0),
    }[aggregation]
    loss = _loss(aggregation=aggregation, mask_truncated_completions=mask_truncated)
    grads, metrics = _grad_fn(loss)(params, batch)
    expected = _reinforce_grad(params, batch, jnp.asarray(weights), normaliser)
    _assert_trees_close(grads, expected, atol=1e-7, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-6)
    assert float(metrics["clip_frac_low"]) == float(metrics["clip_frac_high"]) == 0.0


def test_tool_tokens_are_read_but_not_trained_on(params, batch):
    # Tokens a tool wrote (grpo.tools) stay in the context the policy's log-probs are computed
    # from, but carry no weight and no count: REINFORCE over the model's own tokens alone. Their
    # old log-probs (0 in a rollout) are ignored whatever they hold.
    mask = np.asarray(batch.completion_mask_BxC)
    tool = np.zeros(mask.shape, bool)
    tool[:, 1:3] = True
    tool &= mask
    with_tools = batch.replace(
        tool_mask_BxC=jnp.asarray(tool),
        old_logps_BxC=jnp.where(jnp.asarray(tool), 5.0, batch.old_logps_BxC),
    )
    grads, metrics = _grad_fn(_loss())(params, with_tools)
    trained = (mask & ~tool).astype(np.float32)
    expected = _reinforce_grad(params, batch, jnp.asarray(trained), trained.sum())
    _assert_trees_close(grads, expected, atol=1e-7, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-6)
    plain, _ = _grad_fn(_loss())(params, batch)
    assert (
        max(
            float(jnp.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain), strict=True)
        )
        > 1e-4
    ), "the tool tokens' weight should have moved the gradient"
    # Width buckets cut the tool mask with the completions (4 micro-batches at widths <= C).
    bucketed, _ = _bucketed_grad_fn(_loss(), 4, 3)(params, with_tools)
    _assert_trees_close(bucketed, grads, atol=1e-6)


def test_cispo_gradient_is_reinforce_weighted_by_the_clipped_ratio(params, batch):
    # Off the policy, so ratios leave [0.9, 1.1] on both sides: those tokens keep a gradient,
    # with the bound as their weight.
    batch = _perturbed(batch, with_ref=False)
    grads, metrics = _grad_fn(_loss(objective="cispo", epsilon_low=0.1, epsilon_high=0.1))(
        params, batch
    )
    assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0
    mask = np.asarray(batch.completion_mask_BxC, np.float32)
    ratio = np.exp(np.asarray(_logps(params, batch)) - np.asarray(batch.old_logps_BxC))
    weights = jnp.asarray(mask * np.clip(ratio, 0.9, 1.1))
    expected = _reinforce_grad(params, batch, weights, mask.sum())
    _assert_trees_close(grads, expected, atol=1e-7, rtol=1e-4)


def test_sapo_gradient_is_reinforce_weighted_by_the_gates_slope(params, batch):
    # Off the policy: each token's REINFORCE term weighted by 4 s (1 - s) r, s = sigmoid(tau
    # (r - 1)) with tau by the sign of its advantage; four micro-batches sum to the same.
    batch = _perturbed(batch, with_ref=False)
    loss = _loss(objective="sapo", sapo_tau_pos=2.0, sapo_tau_neg=3.0)
    grads, metrics = _grad_fn(loss)(params, batch)
    mask = np.asarray(batch.completion_mask_BxC, np.float32)
    ratio = np.exp(np.asarray(_logps(params, batch)) - np.asarray(batch.old_logps_BxC))
    assert np.abs(np.log(ratio))[mask > 0].max() > 0.3  # far enough off the policy to fade
    tau = np.where(np.asarray(batch.advantages_B) > 0, 2.0, 3.0)[:, None]
    s = _sigmoid(tau * (ratio - 1))
    weights = jnp.asarray(mask * 4 * s * (1 - s) * ratio)
    expected = _reinforce_grad(params, batch, weights, mask.sum())
    _assert_trees_close(grads, expected, atol=1e-7, rtol=1e-4)
    kept = (mask * 4 * s * (1 - s)).sum() / mask.sum()  # the metric: the slope's token mean
    np.testing.assert_allclose(float(metrics["sapo_grad_weight_mean"]), kept, rtol=1e-5)
    _assert_four_micro_batches_give(grads, metrics, loss, params, batch)


def test_vespo_gradient_is_reinforce_weighted_by_its_completions_weight(params, batch):
    # Off the policy: every token of a completion takes the REINFORCE term weighted by phi(w),
    # w the product of the completion's token ratios; four micro-batches sum to the same.
    batch = _perturbed(batch, with_ref=False)
    loss = _loss(objective="vespo")
    grads, metrics = _grad_fn(loss)(params, batch)
    mask = np.asarray(batch.completion_mask_BxC, np.float32)
    log_ratio = np.asarray(_logps(params, batch)) - np.asarray(batch.old_logps_BxC)
    log_w = (mask * log_ratio).sum(1, keepdims=True)
    nonneg = np.asarray(batch.advantages_B)[:, None] >= 0
    phi = _vespo_weight(log_w, np.where(nonneg, 2.0, 3.0), np.where(nonneg, 3.0, 2.0))
    assert np.ptp(phi[mask.sum(1) > 0]) > 0.3  # far enough off the policy to weigh rows apart
    expected = _reinforce_grad(params, batch, jnp.asarray(mask * phi), mask.sum())
    _assert_trees_close(grads, expected, atol=1e-7, rtol=1e-4)
    weight_mean = (mask * phi).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["vespo_weight_mean"]), weight_mean, rtol=1e-5)
    _assert_four_micro_batches_give(grads, metrics, loss, params, batch)


def test_off_policy_mask_drops_the_drifted_negatives_policy_term(params, batch):
    # Off the policy: the masked completions' policy term is gone, exactly as if their advantage
    # were 0 (the clipped surrogate of A = 0 is 0); four micro-batches sum to the same.
    batch = _perturbed(batch, with_ref=False)
    loss = _loss(off_policy_mask_threshold=0.02)
    grads, metrics = _grad_fn(loss)(params, batch)
    mask = np.asarray(batch.completion_mask_BxC)
    drift = np.asarray(batch.old_logps_BxC) - np.asarray(_logps(params, batch))
    drift = np.where(mask, drift, 0).sum(1) / np.maximum(mask.sum(1), 1)
    masked = (np.asarray(batch.advantages_B) < 0) & (drift > 0.02)
    assert 0 < masked.sum() < (np.asarray(batch.advantages_B) < 0).sum()  # the test has power
    frac = (mask * masked[:, None]).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["off_policy_masked_frac"]), frac, rtol=1e-6)
    zeroed = batch.replace(advantages_B=jnp.where(masked, 0.0, batch.advantages_B))
    expected, _ = _grad_fn(_loss())(params, zeroed)
    _assert_trees_close(grads, expected, atol=1e-7, rtol=1e-5)
    _assert_four_micro_batches_give(grads, metrics, loss, params, batch)


def test_masked_truncated_completions_have_no_effect(params, batch):
    # Whatever the truncated rows hold (advantages, old and reference log-probs), neither the
    # gradient nor any statistic moves; micro-batching stays exact with the mask.
    batch = _perturbed(batch, with_ref=True)
    truncated = batch.truncated_B[:, None]
    garbage = batch.replace(
        advantages_B=jnp.where(batch.truncated_B, 50.0, batch.advantages_B),
        old_logps_BxC=jnp.where(truncated, -30.0, batch.old_logps_BxC),
        ref_logps_BxC=jnp.where(truncated, 30.0, batch.ref_logps_BxC),
    )
    loss = _loss(beta=0.05, mask_truncated_completions=True)
    grads, metrics = _grad_fn(loss)(params, batch)
    grads_g, metrics_g = _grad_fn(loss, 2)(params, garbage)
    _assert_trees_close(grads_g, grads, atol=1e-6)
    _assert_trees_close(metrics_g, metrics, atol=1e-6)
    # ...while without the mask the same garbage dominates (the check has power).
    unmasked, _ = _grad_fn(_loss(beta=0.05))(params, garbage)
    assert optax.global_norm(unmasked) > 10 * optax.global_norm(grads)


@pytest.mark.parametrize(
    "aggregation, objective",
    [
        ("token_mean", "clip"),
        ("seq_mean_token_mean", "clip"),
        ("seq_mean_token_sum_norm", "clip"),
        ("seq_mean_token_mean", "gspo"),
        ("token_mean", "cispo"),
    ],
)
def test_micro_batches_match_full_batch(params, batch, aggregation, objective):
    # 4 micro-batches of 2 rows; M = 2 (with the KL term) is checked in the sharded test.
    batch = _perturbed(batch, with_ref=False)
    loss = _loss(aggregation=aggregation, objective="cispo" if objective == "cispo" else "clip")
    if (
        objective == "gspo"
    ):  # sequence-level ratios average the noise out: GSPO's small epsilons still clip
        loss = _loss(
            aggregation=aggregation,
            importance_sampling_level="sequence",
            epsilon_low=3e-4,
            epsilon_high=4e-4,
        )
    grads, metrics = _grad_fn(loss)(params, batch)
    assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0
    _assert_four_micro_batches_give(grads, metrics, loss, params, batch)


def test_bucket_widths():
    assert update.bucket_widths(1024, 4) == (256, 512, 768, 1024)
    assert update.bucket_widths(6, 3) == (2, 4, 6)
    assert update.bucket_widths(5, 4) == (2, 3, 4, 5)  # rounded up
    assert update.bucket_widths(2, 4) == (1, 2)  # no width twice
    assert update.bucket_widths(6, 1) == (6,)
    with pytest.raises(ValueError, match="width_buckets must be >= 1, got 0"):
        update.bucket_widths(6, 0)


def test_length_sorted_micro_batches_hold_runs_of_similar_lengths():
    mask = np.arange(6)[None] < COMPLETION_LENS[:, None]
    mask[2, 3] = True  # a hole: row 2 needs 4 slots, not its 2 valid ones
    used = update._used_width_B(jnp.asarray(mask))
    np.testing.assert_array_equal(used, [6, 3, 4, 5, 2, 6, 4, 0])
    rows, order = update._length_sorted(jnp.arange(8), used, 4)
    np.testing.assert_array_equal(rows, order)  # new row i is old row order[i]
    # Sorted by used width: rows 7 1 | 4 1... stable: 7(0) 4(2) 1(3) 2(4) 6(4) 3(5) 0(6) 5(6).
    np.testing.assert_array_equal(update.split_rows(rows, 4), [[7, 4], [1, 2], [6, 3], [0, 5]])
    # In whole groups of 2, ranked by their longest row: groups 3 (4 slots) 1 (5) 0 (6) 2 (6).
    rows, _ = update._length_sorted(jnp.arange(8), used, 2, group_size=2)
    np.testing.assert_array_equal(update.split_rows(rows, 2, 2), [[6, 7, 2, 3], [0, 1, 4, 5]])


def _bucketed_grad_fn(loss: LossConfig, num_micro_batches: int, width_buckets: int):
    return jax.jit(
        functools.partial(
            update.compute_gradients,
            model=MODEL,
            loss=loss,
            num_micro_batches=num_micro_batches,
            width_buckets=width_buckets,
        )
    )


@pytest.mark.parametrize(
    "loss_kwargs",
    [
        # L stays the batch's width; truncated rows leave the loss mask, and so the widths.
        {
            "aggregation": "seq_mean_token_sum_norm",
            "beta": 0.05,
            "mask_truncated_completions": True,
        },
        {
            "importance_sampling_level": "sequence",
            "epsilon_low": 3e-4,
            "epsilon_high": 4e-4,
            "top_entropy_quantile": 0.3,
            "entropy_coeff": 0.01,
        },
    ],
    ids=["dr_grpo_kl_truncated", "gspo_top_entropy"],
)  # token_mean with the KL term: the sharded test below
def test_width_buckets_give_the_full_width_gradient(params, batch, loss_kwargs):
    # Lengths 6 3 1 5 2 6 4 0 in 4 micro-batches of 2 sorted rows need widths 1 2 4 6 (of
    # buckets 2 4 6); with truncated rows 0 and 5 masked out, 0 1 3 4.
    loss = _loss(**loss_kwargs)
    batch = _perturbed(batch, with_ref=loss.beta > 0)
    expected_grads, expected = _grad_fn(loss, 4)(params, batch)
    grads, metrics = _bucketed_grad_fn(loss, 4, 3)(params, batch)
    _assert_trees_close(grads, expected_grads, atol=1e-6)
    _assert_trees_close(metrics, expected, atol=1e-6)


def test_width_buckets_run_each_micro_batch_at_its_own_width(params, batch):
    # The switch's branches run the model on P + 2, P + 4 and P + 6 slots: a narrower micro-batch
    # takes a narrower forward and backward, not a masked full-width one.
    jaxpr = jax.make_jaxpr(_bucketed_grad_fn(_loss(), 4, 3))(params, batch).jaxpr
    switches = [e for e in all_eqns(jaxpr) if e.primitive.name == "cond"]
    assert [len(e.params["branches"]) for e in switches] == [3]
    slots = set()
    for branch in switches[0].params["branches"]:
        for eqn in all_eqns(branch.jaxpr):
            shape = eqn.outvars[0].aval.shape if eqn.outvars else ()
            if eqn.primitive.name == "concatenate" and shape[:1] == (2,) and len(shape) == 2:
                slots.add(shape[1])
    assert slots == {P + 2, P + 4, P + 6}


def test_top_entropy_quantile_uses_the_whole_batch_threshold(params, batch):
    # The reference: the whole batch's log-probs and entropies through policy_loss, which takes
    # the quantile over them; compute_gradients must agree with any micro-batching.
    batch = _perturbed(batch, with_ref=False)
    loss = _loss(top_entropy_quantile=0.3)

    def reference(p):
        logps, entropy = _logps_and_entropy(p, batch)
        mask = batch.completion_mask_BxC
        args = (logps, batch.old_logps_BxC, None, batch.advantages_B, mask, entropy)
        return update.policy_loss(*args, config=loss)

    (expected_loss, _), expected = jax.value_and_grad(reference, has_aux=True)(params)
    for micro_batches in (1, 4):
        grads, metrics = _grad_fn(loss, micro_batches)(params, batch)
        _assert_trees_close(grads, expected, atol=1e-6)
        np.testing.assert_allclose(float(metrics["loss"]), float(expected_loss), rtol=1e-5)
    all_tokens, _ = _grad_fn(_loss())(params, batch)
    assert not np.allclose(all_tokens["final_norm"], expected["final_norm"])  # the mask acts


def test_batch_errors(params, batch):
    with pytest.raises(ValueError, match="num_micro_batches=3 does not divide the batch of 8"):
        update.compute_gradients(params, batch, model=MODEL, loss=_loss(), num_micro_batches=3)
    shared = functools.partial(update.compute_gradients, params, batch, model=MODEL, loss=_loss())
    with pytest.raises(ValueError, match="8 micro-batches do not split the batch of 8 .* of 2"):
        shared(num_micro_batches=8, prompt_group=2)
    with pytest.raises(ValueError, match="beta > 0 needs reference log-probs"):
        update.compute_gradients(params, batch, model=MODEL, loss=_loss(beta=0.1))
    with pytest.raises(ValueError, match="reference log-probs given but loss beta == 0"):
        update.compute_gradients(params, _perturbed(batch, True), model=MODEL, loss=_loss())


def _state(params, tx):
    params = jax.tree.map(jnp.copy, params)  # the update donates the state
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key(0),
    )


def test_second_iteration_on_a_rollout_moves_the_ratio(params, batch):
    schedule = optim.make_lr_schedule(10, type="constant", peak_value=0.02, warmup_steps=0)
    tx = optim.make_optimizer(schedule, name="lion")
    step = update.make_update_fn(model=MODEL, tx=tx, loss=_loss(), lr_schedule=schedule)
    state, first = step(_state(params, tx), batch)
    state, second = step(state, batch)  # same rollout: old_logps are still the sampler's
    assert int(state.step) == 2
    assert all(v.dtype == jnp.float32 and v.shape == () for v in first.values())
    np.testing.assert_allclose(float(first["ratio_mean"]), 1.0, atol=1e-6)
    assert float(first["clip_frac_low"]) == float(first["clip_frac_high"]) == 0.0
    assert abs(float(second["ratio_mean"]) - 1.0) > 1e-2
    # The first update scores the sampler's own policy: no log-prob gap; the second sees one.
    assert float(first["abs_log_ratio_mean"]) < 1e-6 < 1e-3 < float(second["abs_log_ratio_mean"])
    assert float(second["clip_frac_low"]) + float(second["clip_frac_high"]) > 0
    np.testing.assert_allclose(float(first["learning_rate"]), 0.02, rtol=1e-6)
    # grad_norm is the norm of the raw (unclipped) gradient.
    grads, _ = _grad_fn(_loss())(params, batch)
    np.testing.assert_allclose(first["grad_norm"], optax.global_norm(grads), rtol=1e-5)


def test_adaptive_entropy_bonus_is_the_fixed_one_at_the_controllers_coefficient(params, batch):
    # A target above the tiny model's entropy (about log V): every update reads as collapsed.
    # The first applies no bonus (no entropy measured yet), the second start + delta = 0.15;
    # two mini-batch updates in one call carry the controller through the scan, and each must
    # equal a fixed-coefficient update at what the controller applied.
    schedule = optim.make_lr_schedule(10, type="constant", peak_value=0.5, warmup_steps=0)
    tx = optim.make_optimizer(schedule, name="sgd")
    adaptive = _loss(entropy_target=100.0, entropy_coeff=0.05, entropy_coeff_delta=0.1)
    start = _state(params, tx).replace(entropy_control=update.initial_entropy_control(adaptive))
    state, metrics = update.make_update_fn(
        model=MODEL, tx=tx, loss=adaptive, updates_per_batch=2, group_size=2
    )(start, batch)
    no_bonus = update.make_update_fn(model=MODEL, tx=tx, loss=_loss())
    bonus = update.make_update_fn(model=MODEL, tx=tx, loss=_loss(entropy_coeff=0.15))
    rows = lambda *index: jax.tree.map(lambda x: x[np.array(index)], batch)
    after_first, _ = no_bonus(_state(params, tx), rows(0, 1, 4, 5))
    unchanged = jax.tree.map(jnp.copy, after_first)
    expected, second = bonus(after_first, rows(2, 3, 6, 7))
    _assert_trees_close(state.params, expected.params, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["entropy_coeff"]), (0.0 + 0.15) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(state.entropy_control.coeff), 0.25, rtol=1e-6)
    last = float(state.entropy_control.last_entropy)
    np.testing.assert_allclose(last, float(second["entropy"]), rtol=1e-5)
    # The bonus moved the second update (the check has power).
    without, _ = no_bonus(unchanged, rows(2, 3, 6, 7))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), without.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-4
    with pytest.raises(ValueError, match="needs the state's entropy_control"):
        update.make_update_fn(model=MODEL, tx=tx, loss=adaptive)(_state(params, tx), batch)


def test_split_groups_keeps_groups_whole_and_strides_them():
    rows = np.arange(12)  # 6 groups of 2: part u takes the groups u, u + 2, u + 4
    parts = update.split_rows(rows, 2, 2)
    np.testing.assert_array_equal(parts, [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]])
    np.testing.assert_array_equal(update.split_rows(rows, 3, 2)[1], [2, 3, 8, 9])

    for parts, group in ((2, 2), (3, 2), (4, 1), (12, 1)):  # merge_rows undoes the split
        split = update.split_rows(rows.reshape(12, 1), parts, group)
        np.testing.assert_array_equal(update.merge_rows(split, group), rows.reshape(12, 1))


def test_mini_batches_are_sequential_updates_on_whole_groups(params, batch):
    # 8 rows = 4 groups of 2; 2 updates per batch must equal one update on groups 0 and 2, then
    # one on groups 1 and 3 (each normalised by its own N), with their metrics averaged. SGD
    # with momentum: the second update also depends on the first's optimizer state.
    schedule = optim.make_lr_schedule(10, type="constant", peak_value=0.5, warmup_steps=0)
    tx = optim.make_optimizer(schedule, name="sgd")
    kwargs = dict(model=MODEL, tx=tx, loss=_loss(), lr_schedule=schedule)
    state, metrics = update.make_update_fn(updates_per_batch=2, group_size=2, **kwargs)(
        _state(params, tx), batch
    )
    one = update.make_update_fn(**kwargs)
    rows = lambda *index: jax.tree.map(lambda x: x[np.array(index)], batch)
    expected, first = one(_state(params, tx), rows(0, 1, 4, 5))
    expected, second = one(expected, rows(2, 3, 6, 7))
    assert int(state.step) == int(expected.step) == 2
    _assert_trees_close(state.params, expected.params, atol=1e-6, rtol=1e-5)
    _assert_trees_close(state.opt_state, expected.opt_state, atol=1e-6, rtol=1e-5)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, first, second)
    _assert_trees_close(metrics, mean, atol=1e-6, rtol=1e-5)
    # The first mini-batch is on-policy; the second is scored after the first's step.
    np.testing.assert_allclose(float(first["ratio_mean"]), 1.0, atol=1e-6)
    assert abs(float(second["ratio_mean"]) - 1.0) > 1e-3
    with pytest.raises(ValueError, match="updates_per_batch=2 does not split the batch of 8 "):
        update.make_update_fn(updates_per_batch=2, group_size=3, **kwargs)(
            _state(params, tx), batch
        )


@pytest.mark.eight_devices
@pytest.mark.parametrize("width_buckets", [1, 2])
def test_sharded_micro_batched_update_matches_unsharded_gradient(params, batch, width_buckets):
    # (dp=2, fsdp=2, tp=2) mesh, 2 micro-batches, KL on: one SGD step must equal
    # params - lr * (the unsharded full-batch gradient), with the same metrics. With 2 width
    # buckets the rows are sorted across devices first and the short micro-batch runs at 3.
    batch = _perturbed(batch, with_ref=True)
    loss = _loss(beta=0.05)
    grads, expected = _grad_fn(loss)(params, batch)
    assert float(expected["kl"]) > 0

    mesh = sharding.make_mesh(dp=2, fsdp=2, tp=2)
    shardings = sharding.tree_shardings(mesh, tf.logical_axes(MODEL), params)
    tx = optax.sgd(0.5, momentum=0.9)  # first step: momentum trace = gradient
    state = _state(jax.device_put(params, shardings), tx)
    replicated = sharding.replicated(mesh)
    state_sharding = state.replace(
        step=replicated,
        params=shardings,
        opt_state=jax.tree.map(lambda x: x.sharding, state.opt_state),
        rng=replicated,
    )
    state = jax.device_put(state, state_sharding)
    step = update.make_update_fn(
        model=MODEL,
        tx=tx,
        loss=loss,
        num_micro_batches=2,
        width_buckets=width_buckets,
        state_sharding=state_sharding,
    )
    with jax.set_mesh(mesh):  # as grpo.train runs it: the log-probs split the vocabulary
        got_state, got = step(state, sharding.shard_batch(mesh, jax.tree.map(np.asarray, batch)))

    for leaf, expected_sharding in zip(
        jax.tree.leaves(got_state), jax.tree.leaves(state_sharding), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(expected_sharding, leaf.ndim)
    expected_params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
    _assert_trees_close(got_state.params, expected_params, atol=1e-6, rtol=1e-5)
    del got["grad_norm"]
    _assert_trees_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.eight_devices
@pytest.mark.parametrize("dp, fsdp, tp", [(1, 8, 1), (2, 4, 1)])
def test_sharded_update_gathers_or_sums_nothing_vocabulary_sized(params, batch, dp, fsdp, tp):
    # With the output projection's model dimension split (fsdp), every log-prob chunk gathered
    # the whole projection or summed partial [rows, chunk, vocab] logits, and summed the
    # projection's whole gradient, across devices (transformer.token_logprobs). dp replicates
    # the params: a device's shard of a vocabulary-sized gradient is summed over dp, no more.
    # (With tp > 1 XLA:CPU gathers the whole projection in the optimizer's update, XLA:TPU does
    # not: BUILD_NOTES, "Pitfalls".)
    mesh = sharding.make_mesh(dp=dp, fsdp=fsdp, tp=tp)
    shardings = sharding.tree_shardings(mesh, tf.logical_axes(MODEL), params)
    tx = optax.sgd(0.1)
    state = _state(jax.device_put(params, shardings), tx)
    step = update.make_update_fn(model=MODEL, tx=tx, loss=_loss(), num_micro_batches=1)
    with jax.set_mesh(mesh):  # as grpo.train runs it
        lowered = step.lower(state, sharding.shard_batch(mesh, jax.tree.map(np.asarray, batch)))
    hlo = lowered.compile().as_text()
    shapes = lambda op: [
        tuple(map(int, dims.split(",")))
        for result in re.findall(rf"= (.*?) {op}(?:-start)?\(", hlo)
        for dims in re.findall(r"\[([\d,]+)\]", result)
    ]
    gathered, summed = shapes("all-gather"), shapes("all-reduce")
    vocabulary_sized = lambda shape: MODEL.vocab_size in shape
    assert gathered and not any(map(vocabulary_sized, gathered)), gathered
    shard = MODEL.vocab_size * MODEL.hidden_size // (fsdp * tp)
    assert all(math.prod(s) <= shard for s in filter(vocabulary_sized, summed)), summed


def _grouped(batch, group: int = 2):
    """The batch with every group of `group` rows continuing its first row's prompt."""
    first = np.repeat(np.arange(0, len(PROMPT_LENS), group), group)
    return batch.replace(
        prompt_tokens_BxP=batch.prompt_tokens_BxP[first],
        prompt_mask_BxP=batch.prompt_mask_BxP[first],
    )


@pytest.mark.parametrize("micro_batches, width_buckets", [(1, 1), (2, 1), (4, 3)])
def test_shared_prompts_give_the_per_completion_gradient(
    params, batch, micro_batches, width_buckets
):
    # Groups of 2 rows share a prompt (4 prompts of different lengths); with the prompts run
    # once per group, the gradient, the KL term and the whole-batch entropy threshold must be
    # those of running each completion's prompt. With 2 micro-batches each holds 2 whole groups;
    # with width buckets 2 4 6, one group each, sorted by its longest completion: group 3 at
    # width 4, then groups 1 (5 slots), 0 and 2 (6) at 6.
    grouped = _perturbed(_grouped(batch), with_ref=True)
    loss = _loss(beta=0.05, top_entropy_quantile=0.5)
    expected_grads, expected = _grad_fn(loss)(params, grouped)
    shared = functools.partial(
        update.compute_gradients,
        model=MODEL,
        loss=loss,
        num_micro_batches=micro_batches,
        width_buckets=width_buckets,
        prompt_group=2,
    )
    grads, metrics = jax.jit(shared)(params, grouped)
    _assert_trees_close(grads, expected_grads, atol=1e-6, rtol=1e-5)
    _assert_trees_close(metrics, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("width_buckets", [1, 6])
def test_shared_prompt_reference_logps_come_back_in_row_order(params, batch, width_buckets):
    # 2 micro-batches of whole groups: rows 0 1 4 5, then 2 3 6 7; with width buckets 1 to 6,
    # groups sorted by their longest completion: rows 6 7 2 3 at width 5, then 0 1 4 5 at 6.
    grouped = _grouped(batch)
    ref_params = _init_params(5)
    got = update.make_reference_logps_fn(
        MODEL, _loss(beta=0.1), num_micro_batches=2, width_buckets=width_buckets, prompt_group=2
    )(ref_params, grouped)
    valid = lambda x: jnp.where(grouped.completion_mask_BxC, x, 0.0)
    np.testing.assert_allclose(valid(got), valid(_logps(ref_params, grouped)), atol=1e-6)


def test_reference_logps(params, batch):
    ref_params = _init_params(5)
    fn = update.make_reference_logps_fn(MODEL, _loss(beta=0.1), num_micro_batches=2)
    got = fn(ref_params, batch)
    expected = _logps(ref_params, batch)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Length-sorted chunks at their own widths, back in the batch's row order.
    bucketed = update.make_reference_logps_fn(
        MODEL, _loss(beta=0.1), num_micro_batches=4, width_buckets=3
    )(ref_params, batch)
    valid = lambda x: jnp.where(batch.completion_mask_BxC, x, 0.0)
    np.testing.assert_allclose(valid(bucketed), valid(expected), atol=1e-6)
    with pytest.raises(ValueError, match="beta == 0 uses no reference policy"):
        update.make_reference_logps_fn(MODEL, _loss())


def test_a_reference_held_in_the_compute_dtype_gives_the_same_bits(batch):
    # The trainer holds a frozen reference in `frozen_dtype`: bf16 under bf16 compute.
    bf16 = MODEL.replace(dtype="bfloat16")
    assert (bf16.frozen_dtype, MODEL.frozen_dtype) == ("bfloat16", "float32")
    assert MODEL.replace(param_dtype="bfloat16").frozen_dtype == "bfloat16"
    fp32_params = _init_params(5)
    narrow = jax.tree.map(lambda w: w.astype(bf16.frozen_dtype), fp32_params)
    fn = update.make_reference_logps_fn(bf16, _loss(beta=0.1))
    np.testing.assert_array_equal(fn(narrow, batch), fn(fp32_params, batch))
