"""Parity with TRL: on the same per-token log-probs, our GRPO loss, its gradient and its token
statistics equal those of TRL's `GRPOTrainer._compute_loss` (trl pinned in setup.py's test
extra), for every loss both trainers ship.

TRL's method takes the policy's log-probs and entropies from a model forward; here it takes
fixed tensors instead, so the whole loss path between the log-probs and the scalar (clipping,
masks, KL, aggregation, normalisers) is TRL's own code, run in float64. The gradient with
respect to the log-probs (and entropies) fixes the gradient with respect to any parameters, by
the chain rule, so equal gradients here mean equal updates given equal forwards (those are
checked against transformers in tests/models).

If TRL changes a formula, a case fails: read TRL's change, then decide whether ours should
follow (and say so in BUILD_NOTES) or the case should map to other knobs.
"""

from __future__ import annotations

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo.phases import update

torch = pytest.importorskip("torch")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

B, C = 6, 7
LENGTHS = (7, 5, 1, 0, 3, 6)  # a one-token and an empty completion among them
ADVANTAGES = (1.2, -0.7, 0.4, -1.1, 0.0, -0.3)


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(15)  # a seed whose ratios reach every bound (see the last test)
    mask = np.arange(C)[None, :] < np.array(LENGTHS)[:, None]
    logps = rng.uniform(-3.0, -0.05, (B, C))
    # Old log-probs 0.4 nats off on average: ratios from about 0.4 to 2.5.
    old = logps + rng.normal(0.0, 0.4, (B, C))
    ref = logps + rng.normal(0.0, 0.2, (B, C))
    pad = ~mask
    old[pad], ref[pad], logps[pad] = 7.0, -9.0, 3.0  # padding holds junk; both must ignore it
    return dict(
        logps=logps,
        old=old,
        ref=ref,
        mask=mask,
        advantages=np.array(ADVANTAGES),
        entropy=rng.uniform(0.1, 2.5, (B, C)),
    )


class _OneProcess:
    """The slice of accelerate's Accelerator that `_compute_loss` touches, for one process."""

    num_processes = 1
    sync_gradients = True
    is_main_process = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction):
        return x

    def pad_across_processes(self, x, dim, pad_index):
        return x


def _trl(data: dict, loss_type: str, **knobs) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """TRL's loss, its gradients with respect to the log-probs and entropies, and its metrics."""
    return _trl_loss(_trl_trainer(loss_type, **knobs), data)


def _trl_trainer(loss_type: str, **knobs):
    """A GRPOTrainer holding just what `_compute_loss` reads. `knobs`: GRPOTrainer attributes
    (beta, epsilon_high, use_adaptive_entropy, ...) and GRPOConfig fields (delta,
    use_bias_correction_kl, sapo_*, vespo_*, entropy_*), over TRL's defaults."""
    config_defaults = dict(
        use_bias_correction_kl=False,
        delta=None,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        entropy_target=0.2,
        entropy_coef_delta=0.005,
        entropy_coef_min=0.0,
        entropy_coef_max=1.0,
    )
    args = types.SimpleNamespace(
        **{name: knobs.pop(name, value) for name, value in config_defaults.items()},
        steps_per_generation=1,
    )
    attributes = dict(
        loss_type=loss_type,
        beta=0.0,
        epsilon_low=0.2,
        epsilon_high=0.2,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        max_completion_length=C,
        entropy_coef=0.0,
        use_adaptive_entropy=False,
    )
    attributes.update(knobs)
    trainer = trl_grpo.GRPOTrainer.__new__(trl_grpo.GRPOTrainer)
    vars(trainer).update(
        attributes,
        args=args,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=attributes["entropy_coef"] != 0.0
        or attributes["use_adaptive_entropy"],
        _last_world_entropy=float("inf"),
        _entropy_window_stats=None,
        current_gradient_accumulation_steps=1,
        model=types.SimpleNamespace(training=True),
        accelerator=_OneProcess(),
        _metrics={"train": collections.defaultdict(list)},
    )
    return trainer


def _trl_loss(trainer, data: dict) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """One `_compute_loss` of `trainer` on `data`: the loss, its gradients with respect to the
    log-probs and entropies, and the metrics it logged."""
    as_torch = lambda x: torch.tensor(x, dtype=torch.float64)
    logps = as_torch(data["logps"]).requires_grad_()
    entropy = as_torch(data["entropy"]).requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropy, None)
    mask = torch.tensor(data["mask"], dtype=torch.long)
    inputs = {
        "prompt_ids": torch.zeros((B, 1), dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": torch.zeros((B, C), dtype=torch.long),
        "completion_mask": mask,
        "advantages": as_torch(data["advantages"]),
        "old_per_token_logps": as_torch(data["old"]),
        "ref_per_token_logps": as_torch(data["ref"]),
        "num_items_in_batch": mask.sum().double(),
    }
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    entropy_grad = np.zeros((B, C)) if entropy.grad is None else entropy.grad.numpy()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.item(), logps.grad.numpy(), entropy_grad, metrics


def _ours(data: dict, **loss_knobs) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """Our loss (float32), its gradients with respect to the log-probs and entropies, and its
    token statistics."""
    config = update.LossConfig(**loss_knobs)
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    def loss_fn(logps, entropy):
        return update.policy_loss(
            logps,
            f32(data["old"]),
            f32(data["ref"]) if config.beta > 0 else None,
            f32(data["advantages"]),
            jnp.asarray(data["mask"]),
            entropy,
            config=config,
        )

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (loss, stats), (logps_grad, entropy_grad) = grad_fn(f32(data["logps"]), f32(data["entropy"]))
    stats = {name: float(value) for name, value in stats.items()}
    return float(loss), np.asarray(logps_grad), np.asarray(entropy_grad), stats


# (case, our LossConfig knobs, TRL's loss_type, TRL's knobs, whether the loss values compare).
# TRL's "grpo" is the original sequence mean of token means; "bnpo" and "dapo" are token means
# (over the micro-batch and over the whole generation batch, one and the same here); "dr_grpo"
# sums each completion's tokens over a constant length, "luspo" sums them.
CASES = [
    ("grpo", dict(aggregation="seq_mean_token_mean"), "grpo", {}, True),
    ("bnpo", dict(aggregation="token_mean"), "bnpo", {}, True),
    ("dapo_clip_higher", dict(epsilon_high=0.28), "dapo", dict(epsilon_high=0.28), True),
    (
        "dr_grpo",
        dict(aggregation="seq_mean_token_sum_norm", max_completion_length=10),
        "dr_grpo",
        dict(max_completion_length=10),
        True,
    ),
    # TRL's delta caps the ratio before the min, which caps a negative advantage's loss at
    # -delta A: our dual clip.
    ("dual_clip", dict(dual_clip=1.5), "bnpo", dict(delta=1.5), True),
    (
        "gspo",
        dict(
            aggregation="seq_mean_token_mean",
            importance_sampling_level="sequence",
            epsilon_low=0.05,
            epsilon_high=0.08,
        ),
        "grpo",
        dict(importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.08),
        True,
    ),
    (
        "luspo",
        dict(
            aggregation="seq_mean_token_sum",
            importance_sampling_level="sequence",
            epsilon_low=0.05,
            epsilon_high=0.08,
        ),
        "luspo",
        dict(importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.08),
        True,
    ),
    ("kl_k3", dict(aggregation="seq_mean_token_mean", beta=0.04), "grpo", dict(beta=0.04), True),
    (
        "kl_importance_weighted",
        dict(beta=0.1, kl_importance_weighted=True),
        "bnpo",
        dict(beta=0.1, use_bias_correction_kl=True),
        True,
    ),
    # TRL's CISPO bounds the ratio from above only, at epsilon_high (a ratio, e.g. 5); ours
    # clips to [1 - epsilon_low, 1 + epsilon_high], so epsilon_low = 1 leaves no lower bound.
    # Its value is -clip(r) A log pi, ours -clip(r) A: the gradients agree, the values do not.
    (
        "cispo",
        dict(objective="cispo", epsilon_low=1.0, epsilon_high=0.5),
        "cispo",
        dict(epsilon_high=1.5),
        False,
    ),
    (
        "sapo",
        dict(objective="sapo", aggregation="seq_mean_token_mean", sapo_tau_neg=2.0),
        "sapo",
        dict(sapo_temperature_neg=2.0),
        True,
    ),
    # VESPO's value is -phi(w) A log pi in TRL, -phi(w) A here: the gradients agree.
    (
        "vespo",
        dict(objective="vespo", vespo_lambda_pos=2.0, vespo_k_neg=2.5),
        "vespo",
        dict(vespo_lambda_pos=2.0, vespo_k_neg=2.5),
        False,
    ),
    (
        "off_policy_mask",
        dict(off_policy_mask_threshold=0.05),
        "bnpo",
        dict(off_policy_mask_threshold=0.05),
        True,
    ),
    ("top_entropy", dict(top_entropy_quantile=0.4), "bnpo", dict(top_entropy_quantile=0.4), True),
    # TRL's entropy bonus is a token mean whatever the loss type; ours is aggregated like the
    # loss (verl's): the two agree under token means.
    ("entropy_bonus", dict(entropy_coeff=0.05), "bnpo", dict(entropy_coef=0.05), True),
]


@pytest.mark.parametrize(
    "our_knobs, loss_type, trl_knobs, values_compare",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_loss_and_gradient_match_trl(our_knobs, loss_type, trl_knobs, values_compare):
    data = _inputs()
    trl_loss, trl_logps_grad, trl_entropy_grad, trl_metrics = _trl(data, loss_type, **trl_knobs)
    loss, logps_grad, entropy_grad, stats = _ours(data, **our_knobs)
    if values_compare:
        np.testing.assert_allclose(loss, trl_loss, rtol=2e-5, atol=1e-7)
    # Padding slots get no gradient in either.
    assert not np.any(logps_grad[~data["mask"]]) and not np.any(trl_logps_grad[~data["mask"]])
    np.testing.assert_allclose(logps_grad, trl_logps_grad, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(entropy_grad, trl_entropy_grad, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(stats["entropy"], trl_metrics["entropy"], rtol=2e-5)
    if "kl" in trl_metrics:
        np.testing.assert_allclose(stats["kl"], trl_metrics["kl"], rtol=2e-5)
    # TRL counts clipped sequences under GSPO, where ours counts their tokens.
    if "clip_ratio/low_mean" in trl_metrics and our_knobs.get("importance_sampling_level") != (
        "sequence"
    ):
        np.testing.assert_allclose(stats["clip_frac_low"], trl_metrics["clip_ratio/low_mean"])
        np.testing.assert_allclose(stats["clip_frac_high"], trl_metrics["clip_ratio/high_mean"])


def test_the_inputs_reach_every_bound():
    """Guards the inputs: each bound and mask the cases name must act on them (change the
    gradient, or clip tokens on both sides), or its case would not test it."""
    data = _inputs()
    _, _, _, stats = _ours(data)
    assert stats["clip_frac_low"] > 0 and stats["clip_frac_high"] > 0
    assert 0 < _ours(data, off_policy_mask_threshold=0.05)[3]["off_policy_masked_frac"] < 0.5
    assert abs(_ours(data, objective="vespo")[3]["vespo_weight_mean"] - 1) > 0.1
    cispo = dict(objective="cispo", epsilon_low=1.0)
    for knobs, without in [
        (dict(dual_clip=1.5), {}),
        (dict(cispo, epsilon_high=0.5), dict(cispo, epsilon_high=100.0)),
        (dict(top_entropy_quantile=0.4), {}),
    ]:
        assert not np.allclose(_ours(data, **knobs)[1], _ours(data, **without)[1]), knobs


def test_adaptive_entropy_control_matches_trl():
    # One trainer, one update after another, each with every token's entropy at the given
    # value: TRL's applied coefficient (read off the loss's gradient in the entropies) and its
    # coefficient after the update, against our controller's (update.py).
    entropies = (0.3, 0.6, 0.4, 0.45, 0.5, 0.9, 0.9, 0.9)
    trainer = _trl_trainer(
        "bnpo",
        use_adaptive_entropy=True,
        entropy_coef=0.05,
        entropy_target=0.5,
        entropy_coef_delta=0.1,
        entropy_coef_max=0.2,
    )
    loss = update.LossConfig(
        entropy_target=0.5, entropy_coeff=0.05, entropy_coeff_delta=0.1, entropy_coeff_max=0.2
    )
    control = update.initial_entropy_control(loss)
    data = _inputs()
    valid = data["mask"]
    for entropy in entropies:
        data["entropy"] = np.full((B, C), entropy)
        _, _, entropy_grad, _ = _trl_loss(trainer, data)
        trl_applied = -entropy_grad[valid][0] * valid.sum()  # d(-c mean(H)) / dH_t = -c / n
        applied = float(update.applied_entropy_coeff(control, loss))
        np.testing.assert_allclose(applied, trl_applied, atol=1e-6, err_msg=f"H = {entropy}")
        control = update.next_entropy_control(control, jnp.float32(entropy), loss)
        np.testing.assert_allclose(float(control.coeff), trainer.entropy_coef, atol=1e-6)
