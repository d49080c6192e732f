"""The GRPO update: clipped policy-gradient loss, optional KL to a frozen reference policy, and a
jitted optimizer step with exact micro-batch gradient accumulation.

Every aggregation mode is per-token weights w_bt and one normaliser N for the whole batch:

    token_mean               w = mask             N = valid tokens in the batch    (DAPO)
    seq_mean_token_mean      w = mask / len_b     N = sequences in the batch       (original GRPO)
    seq_mean_token_sum_norm  w = mask / L         N = sequences in the batch       (Dr. GRPO)
    seq_mean_token_sum       w = mask             N = sequences in the batch       (LUSPO)

(L = `max_completion_length`, default the completion width C.) A weight depends on its own
sequence only and N on the whole batch, so summing the micro-batches' gradients of
sum(w * loss) and dividing once by N gives exactly the full-batch gradient. With
`mask_truncated_completions` (DAPO's overlong filtering) the mask leaves out every completion
that hit the token budget; the sequence modes' N still counts them (as TRL does). With
`importance_sampling_level="sequence"` (GSPO) every token of a completion takes the completion's
ratio, exp of its mean token log-ratio, so clipping keeps or drops whole completions.

With `objective="cispo"` (MiniMax-M1's CISPO) the clipped surrogate gives way to a policy gradient
weighted by each token's ratio clipped to [1 - epsilon_low, 1 + epsilon_high] and held constant:
the gradient is -clip(r) A grad log pi for every token, so a token past the clip range still
moves, by a capped weight, where the clipped surrogate would give it no gradient at all.

With `objective="sapo"` (Qwen's SAPO, arXiv 2511.20347) a soft gate replaces the clip: each
token's loss is -f(r) A with f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = `sapo_tau_pos` where
A > 0 and `sapo_tau_neg` where A < 0. Its gradient is -4 s (1 - s) r A grad log pi (s the
sigmoid): the unclipped surrogate's, damped by 4 s (1 - s) <= 1, which is 1 at r = 1 (GRPO's
gradient there) and falls smoothly as r leaves 1, never to zero at a bound; a larger tau falls
faster, and the paper lets the negative advantages' tokens fall faster.

With `objective="vespo"` (VESPO, arXiv 2602.10693) every token of a completion takes a policy
gradient weighted by phi(w) = exp(lambda) w^k exp(-lambda w), held constant, with w the
completion's ratio, the product of its tokens' ratios (TRL's clamps: each token's log-ratio to
[-20, 20], their sum to [log 1e-8, 20]); k and lambda by the sign of the advantage
(`vespo_k_pos`, `vespo_lambda_pos` where A >= 0, `vespo_k_neg`, `vespo_lambda_neg` where A < 0).
phi(1) = 1, so on the policy the gradient is GRPO's; phi peaks at w = k / lambda and fades
smoothly toward 0 at both ends, in place of a hard clip.

LUSPO (arXiv 2602.05261) is GSPO's sequence ratio with `aggregation="seq_mean_token_sum"`: each
completion's token losses summed rather than averaged, so a long completion counts in
proportion to its length.

With `kl_importance_weighted` (DeepSeek-V3.2's unbiased KL estimate) each token's KL estimate is
multiplied by its ratio r = pi / pi_old: the tokens were drawn from the sampler's policy, so on
an update off it the plain estimate averages KL under pi_old's samples, and its gradient is not
KL(pi || pi_ref)'s. Weighted, k3's gradient becomes r log(pi / pi_ref) grad log pi, the exact
KL's under pi's own samples, importance weighted; at r = 1 nothing changes.

With `off_policy_mask_threshold` = delta (DeepSeek-V3.2's off-policy sequence masking) a
completion of negative advantage whose mean log(pi_old / pi) over its tokens exceeds delta
loses its policy term (not its KL term; N is unchanged): the policy has moved so far from the
sampler's on it that pushing it down further mostly adds noise. Positive completions always
count. The mask depends on its own row only, so micro-batching stays exact.

With `entropy_target` = H (adaptive entropy control, Skywork-OR1; TRL's `use_adaptive_entropy`)
the entropy bonus's coefficient c is state (`TrainState.entropy_control`, checkpointed): it
starts at `entropy_coeff`, and after each optimizer update moves by `entropy_coeff_delta`, up
when that update's entropy (the token mean over the batch) was at or below H and down when
above, within [`entropy_coeff_min`, `entropy_coeff_max`]. An update applies c only when the
last update's entropy was at or below H (none before the first), else no bonus: the bonus
switches on as the entropy collapses and grows while it stays low.

With `top_entropy_quantile` = rho < 1 (Wang et al., 2025, "Beyond the 80/20 rule"; TRL's knob of
that name) only the tokens whose policy entropy is in the batch's top rho fraction keep their
loss weight; N is unchanged. The threshold is the (1 - rho) quantile of the entropies of every
valid token of the whole batch, from a forward pass before the gradient pass, so it does not
depend on the micro-batching.

With `width_buckets` = K > 1 the batch's rows are sorted by completion length before the split
into micro-batches, and each micro-batch runs at the smallest of the widths C/K, 2C/K, ..., C
(rounded up) that holds its longest completion: a step whose completions are mostly short no
longer pays C slots for every row, forward and backward. A `lax.switch` picks the width on the
device, so this stays one compiled program (K branches; compile time grows with K). The loss is
a sum over rows, so only the floating-point summation order changes.

With `prompt_group` = G > 1 (TrainConfig.shared_prompt_forward) the rows come in whole groups of
G completions of one prompt: micro-batches hold whole groups, and each prompt runs once for its
group (`transformer.forward_shared_prompts`), its gradient summed over the group's completions;
width buckets then sort whole groups, by their longest completion. Again only the summation
order changes.

`old_logps` are the rollout's log-probs: with several updates on one rollout
(`num_iterations > 1`, or a batch split into `updates_per_batch` mini-batches, each one optimizer
step: verl's ppo_mini_batch_size, TRL's steps_per_generation) the ratio moves away from 1 after
the first update and clipping acts. Each mini-batch holds whole groups and is normalised by its
own N, as a batch of its own would be.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from grpo import knobs, sharding
from grpo.models import lora, transformer
from grpo.models.config import ModelConfig
from grpo.types import Batch, EntropyControl, TrainState

AGGREGATIONS = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
    "seq_mean_token_sum",
)
OBJECTIVES = ("clip", "cispo", "sapo", "vespo")
# VESPO's clamps, TRL's: each token's log-ratio, then the completion's sum (log w).
_VESPO_TOKEN_LOG_RATIO_BOUND = 20.0
_VESPO_LOG_W_RANGE = (math.log(1e-8), 20.0)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
# Token-mean diagnostics: fraction (or mean) over the valid tokens of the batch.
# abs_log_ratio_mean: |log pi - log pi_old| per token (token level, also under GSPO); on a step's
# first update the policy is the sampler's, so it measures how far the trainer's recomputed
# log-probs are from the ones the sampler recorded (verl's rollout_probs_diff).
TOKEN_STATS = ("kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "abs_log_ratio_mean")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static knobs of the GRPO loss (hashable: closed over by the jitted update)."""

    # "clip": PPO's clipped surrogate (GRPO); "cispo": each token's policy gradient weighted by
    # its clipped ratio, held constant (MiniMax-M1's CISPO); "sapo": a soft gate on the ratio
    # instead of a clip (Qwen's SAPO); "vespo": each token's policy gradient weighted by a smooth
    # function of its completion's ratio, held constant (VESPO). See the module docstring.
    objective: str = "clip"
    # SAPO's gate temperatures for tokens of positive and of negative advantage (the paper's
    # 1.0 and 1.05: the negative side fades faster, for stability).
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    # VESPO's weight exp(lambda) w^k exp(-lambda w) for completions of advantage >= 0 and < 0
    # (TRL's defaults): k sets how fast it falls for w < 1, lambda how fast for w > 1.
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    epsilon_low: float = 0.2  # ratio clipped below at 1 - epsilon_low
    epsilon_high: float = 0.2  # ... and above at 1 + epsilon_high (DAPO raises it, e.g. 0.28)
    dual_clip: float | None = None  # c > 1: for A < 0 the token loss is capped at -c * A
    beta: float = 0.0  # KL(policy || reference) weight; 0 holds no reference at all
    # The per-token KL term (Schulman's estimators, with r = pi_ref / pi): "k3" = r - log r - 1
    # (GRPO, TRL; verl's low_var_kl), "k2" = (log r)^2 / 2 (its gradient is the reverse KL's;
    # verl's mse), "k1" = -log r (verl's kl).
    kl_estimator: str = "k3"
    # True: each token's KL estimate is weighted by its ratio pi / pi_old, so that on an update
    # off the sampler's policy it still estimates (and its gradient follows) KL(pi || pi_ref)
    # under pi, not under pi_old (DeepSeek-V3.2's unbiased KL estimate).
    kl_importance_weighted: bool = False
    # c != 0 subtracts c x the policy's entropy (aggregated like the loss) from the loss: an
    # entropy bonus against entropy collapse (verl's entropy_coeff); 0 leaves it a metric.
    entropy_coeff: float = 0.0
    # A float: adaptive entropy control (Skywork-OR1; TRL's use_adaptive_entropy), see the
    # module docstring; entropy_coeff is then the coefficient's start. None: it stays fixed.
    entropy_target: float | None = None
    entropy_coeff_delta: float = 0.005  # the controller's step per optimizer update
    entropy_coeff_min: float = 0.0  # ... and its range
    entropy_coeff_max: float = 1.0
    aggregation: str = "token_mean"
    temperature: float = 1.0  # the sampler's; log-probs are of softmax(logits / temperature)
    max_completion_length: int | None = None  # Dr. GRPO's constant L; None = completion width
    logprob_chunk: int = 128  # sequence chunk for the fp32 log-softmax (memory, not numerics)
    # DAPO's overlong filtering: completions that hit the token budget without an end token
    # count in no loss term or statistic (their rewards still shape their groups' advantages).
    mask_truncated_completions: bool = False
    # "token": each token's own ratio (GRPO); "sequence": every token of a completion takes
    # exp(mean log-ratio over the completion), clipped as one (GSPO; use small epsilons, ~3e-4).
    importance_sampling_level: str = "token"
    # rho < 1: only the batch's top-rho tokens by policy entropy carry loss (the forking tokens);
    # 1: every token. Costs one more forward pass over the batch.
    top_entropy_quantile: float = 1.0
    # delta >= 0: completions of negative advantage whose mean log(pi_old / pi) exceeds delta
    # lose their policy term (DeepSeek-V3.2's off-policy sequence mask); None: off.
    off_policy_mask_threshold: float | None = None

    def __post_init__(self):
        knobs.check_fields(self, "LossConfig")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}"
            )
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective != "clip" and self.dual_clip is not None:
            raise ValueError(
                "dual_clip caps the clipped surrogate's loss: "
                f"objective={self.objective!r} has none"
            )
        if self.objective != "clip" and self.importance_sampling_level != "token":
            raise ValueError(
                "importance_sampling_level='sequence' is GSPO's clipped ratio: "
                f"objective={self.objective!r} needs 'token'"
            )
        self._check_soft_objectives()
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError(
                "off_policy_mask_threshold must be >= 0 (or None), got "
                f"{self.off_policy_mask_threshold}"
            )
        if self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ValueError(
                f"clip epsilons must be >= 0, got low={self.epsilon_low} high={self.epsilon_high}"
            )
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.beta == 0 and self.kl_estimator != "k3":
            raise ValueError(f"kl_estimator={self.kl_estimator!r} needs beta > 0 (else no KL term)")
        if self.beta == 0 and self.kl_importance_weighted:
            raise ValueError("kl_importance_weighted needs beta > 0 (else no KL term)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(
                f"max_completion_length must be >= 1 (or None), got {self.max_completion_length}"
            )
        if self.logprob_chunk < 1:
            raise ValueError(f"logprob_chunk must be >= 1, got {self.logprob_chunk}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(
                f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}"
            )
        self._check_entropy_control()

    def _changed(self, *names: str) -> bool:
        """Whether any of these knobs is set away from its default."""
        default = LossConfig.__dataclass_fields__
        return any(getattr(self, n) != default[n].default for n in names)

    def _check_entropy_control(self) -> None:
        """The controller's knobs are in range, and set only with a target."""
        if self.entropy_target is None:
            if self._changed("entropy_coeff_delta", "entropy_coeff_min", "entropy_coeff_max"):
                raise ValueError(
                    "entropy_coeff_delta / entropy_coeff_min / entropy_coeff_max steer adaptive "
                    "entropy control: they need entropy_target"
                )
            return
        if self.entropy_target <= 0 or self.entropy_coeff_delta <= 0:
            raise ValueError(
                "entropy_target and entropy_coeff_delta must be > 0, got "
                f"{self.entropy_target} and {self.entropy_coeff_delta}"
            )
        if not 0 <= self.entropy_coeff_min <= self.entropy_coeff <= self.entropy_coeff_max:
            raise ValueError(
                "adaptive entropy control needs 0 <= entropy_coeff_min <= entropy_coeff (its "
                f"start) <= entropy_coeff_max, got {self.entropy_coeff_min}, "
                f"{self.entropy_coeff} and {self.entropy_coeff_max}"
            )
        if self.top_entropy_quantile < 1:
            raise ValueError(
                "entropy_target reads the entropy of every token, top_entropy_quantile < 1 "
                "trains only the top ones: use one of the two"
            )

    def _check_soft_objectives(self) -> None:
        """SAPO's and VESPO's knobs are in range and set only for their objective, which has no
        clip range."""
        if min(self.sapo_tau_pos, self.sapo_tau_neg) <= 0:
            raise ValueError(
                "sapo_tau_pos and sapo_tau_neg must be > 0, got "
                f"{self.sapo_tau_pos} and {self.sapo_tau_neg}"
            )
        if min(self.vespo_k_pos, self.vespo_k_neg) < 0:
            raise ValueError(
                f"vespo_k_pos and vespo_k_neg must be >= 0, got {self.vespo_k_pos} and "
                f"{self.vespo_k_neg}"
            )
        if min(self.vespo_lambda_pos, self.vespo_lambda_neg) <= 0:
            raise ValueError(
                "vespo_lambda_pos and vespo_lambda_neg must be > 0, got "
                f"{self.vespo_lambda_pos} and {self.vespo_lambda_neg}"
            )
        knobs_of = {
            "sapo": ("sapo_tau_pos", "sapo_tau_neg"),
            "vespo": ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
        }
        for objective, names in knobs_of.items():
            if self.objective == objective and self._changed("epsilon_low", "epsilon_high"):
                raise ValueError(
                    f"objective={objective!r} weighs the ratio instead of clipping it: set "
                    f"{' / '.join(names)}, not epsilon_low / epsilon_high"
                )
            if self.objective != objective and self._changed(*names):
                raise ValueError(
                    f"{' / '.join(names)} are {objective.upper()}'s: they need "
                    f"objective={objective!r}"
                )


def token_stat_names(config: LossConfig) -> tuple[str, ...]:
    """TOKEN_STATS, and `off_policy_masked_frac` (the valid tokens whose completion the
    off-policy mask dropped) when the mask is on, and `sapo_grad_weight_mean` (the gate's
    4 s (1 - s) per token: the share of the unclipped surrogate's gradient it keeps, 1 on the
    policy) under SAPO, whose clip fractions read 0, and `vespo_weight_mean` (each token's
    weight phi(w), 1 on the policy) under VESPO."""
    masked = ("off_policy_masked_frac",) if config.off_policy_mask_threshold is not None else ()
    weighted = {"sapo": ("sapo_grad_weight_mean",), "vespo": ("vespo_weight_mean",)}
    return TOKEN_STATS + masked + weighted.get(config.objective, ())


def token_weights(mask_BxC: jax.Array, *, config: LossConfig) -> jax.Array:
    """Each token's weight in the loss numerator (see the module docstring); 0 where masked."""
    mask = mask_BxC.astype(jnp.float32)
    if config.aggregation in ("token_mean", "seq_mean_token_sum"):
        return mask
    if config.aggregation == "seq_mean_token_mean":
        return mask / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    return mask / float(config.max_completion_length or mask_BxC.shape[1])


def loss_normaliser(mask_BxC: jax.Array, *, config: LossConfig) -> jax.Array:
    """N: the whole batch's valid-token count (token_mean) or sequence count (the others)."""
    if config.aggregation == "token_mean":
        return _token_count(mask_BxC)
    return jnp.asarray(mask_BxC.shape[0], jnp.float32)


def high_entropy_mask(entropy_BxC: jax.Array, mask_BxC: jax.Array, rho: float) -> jax.Array:
    """The valid tokens whose entropy reaches the (1 - rho) quantile of the valid tokens'
    (linear interpolation, as torch.quantile and TRL)."""
    valid_entropy = jnp.where(mask_BxC, entropy_BxC.astype(jnp.float32), jnp.nan)
    threshold = jnp.nanquantile(valid_entropy, 1.0 - rho)
    return mask_BxC & (entropy_BxC >= threshold)


def _token_count(mask_BxC: jax.Array) -> jax.Array:
    return jnp.maximum(mask_BxC.sum(dtype=jnp.float32), 1.0)


def _log_ratio(logps_BxC, old_logps_BxC, mask_BxC, *, config: LossConfig) -> jax.Array:
    """log(pi / pi_old) of each token, or (sequence level, GSPO) its sequence's token mean.
    Masked slots hold 0 in both log-probs (see `_numerators`), so they add nothing to a mean."""
    log_ratio_BxC = logps_BxC - old_logps_BxC
    if config.importance_sampling_level == "token":
        return log_ratio_BxC
    length_Bx1 = jnp.maximum(mask_BxC.sum(axis=1, keepdims=True, dtype=jnp.float32), 1.0)
    mean_Bx1 = log_ratio_BxC.sum(axis=1, keepdims=True) / length_Bx1
    return jnp.broadcast_to(mean_Bx1, log_ratio_BxC.shape)


def _per_token(
    logps_BxC, old_logps_BxC, ref_logps_BxC, advantages_B, mask_BxC, *, config: LossConfig
):
    """The policy loss (+ beta * KL estimate) per token, and the per-token diagnostics."""
    adv_Bx1 = advantages_B.astype(jnp.float32)[:, None]
    log_ratio_BxC = _log_ratio(logps_BxC, old_logps_BxC, mask_BxC, config=config)
    objective = {"clip": _clipped_surrogate, "cispo": _cispo, "sapo": _sapo, "vespo": _vespo}
    loss_BxC, stats = objective[config.objective](logps_BxC, log_ratio_BxC, adv_Bx1, config)
    stats["ratio_mean"] = jnp.exp(log_ratio_BxC)
    stats["abs_log_ratio_mean"] = jnp.abs(logps_BxC - old_logps_BxC)
    if config.off_policy_mask_threshold is not None:
        drifted_Bx1 = _drifted_negatives(logps_BxC, old_logps_BxC, adv_Bx1, mask_BxC, config)
        loss_BxC = jnp.where(drifted_Bx1, 0.0, loss_BxC)
        stats["off_policy_masked_frac"] = jnp.broadcast_to(drifted_Bx1, loss_BxC.shape)
    stats["kl"] = jnp.zeros_like(loss_BxC)
    if config.beta > 0:
        stats["kl"] = _kl(ref_logps_BxC - logps_BxC, config.kl_estimator)
        if config.kl_importance_weighted:
            stats["kl"] = jnp.exp(logps_BxC - old_logps_BxC) * stats["kl"]
        loss_BxC = loss_BxC + config.beta * stats["kl"]
    return loss_BxC, stats


def _drifted_negatives(logps_BxC, old_logps_BxC, adv_Bx1, mask_BxC, config: LossConfig):
    """The completions the off-policy mask drops: negative advantage, and a mean log(pi_old / pi)
    over their valid tokens above the threshold (masked slots hold 0 in both log-probs)."""
    length_Bx1 = jnp.maximum(mask_BxC.sum(axis=1, keepdims=True, dtype=jnp.float32), 1.0)
    drift_BxC = jax.lax.stop_gradient(old_logps_BxC - logps_BxC)
    drift_Bx1 = drift_BxC.sum(axis=1, keepdims=True) / length_Bx1
    return (adv_Bx1 < 0) & (drift_Bx1 > config.off_policy_mask_threshold)


def _clipped_surrogate(logps_BxC, log_ratio_BxC, adv_Bx1, config: LossConfig):
    """PPO's clipped surrogate per token (capped by the dual clip), and its stats: the tokens
    whose gradient the clip removed, below and above the range."""
    del logps_BxC  # the ratio carries the gradient
    ratio_BxC = jnp.exp(log_ratio_BxC)
    low, high = 1.0 - config.epsilon_low, 1.0 + config.epsilon_high
    loss_BxC = -jnp.minimum(ratio_BxC * adv_Bx1, jnp.clip(ratio_BxC, low, high) * adv_Bx1)
    if config.dual_clip is not None:
        cap_Bx1 = jnp.where(adv_Bx1 < 0, -config.dual_clip * adv_Bx1, jnp.inf)
        loss_BxC = jnp.minimum(loss_BxC, cap_Bx1)
    return loss_BxC, _clip_fracs(
        (adv_Bx1 < 0) & (ratio_BxC < low), (adv_Bx1 > 0) & (ratio_BxC > high)
    )


def _cispo(logps_BxC, log_ratio_BxC, adv_Bx1, config: LossConfig):
    """CISPO per token, -sg(clip(r)) A (1 + log pi - sg(log pi)): the value -clip(r) A, which
    averages near 0 as the clipped surrogate's does, and CISPO's gradient -clip(r) A grad log pi
    (no division by a ratio, which can underflow); and its stats: the weights held at each
    bound."""
    low, high = 1.0 - config.epsilon_low, 1.0 + config.epsilon_high
    ratio_BxC = jnp.exp(log_ratio_BxC)
    weight_BxC = jax.lax.stop_gradient(jnp.clip(ratio_BxC, low, high))
    step_BxC = 1.0 + logps_BxC - jax.lax.stop_gradient(logps_BxC)
    return -weight_BxC * adv_Bx1 * step_BxC, _clip_fracs(ratio_BxC < low, ratio_BxC > high)


def _sapo(logps_BxC, log_ratio_BxC, adv_Bx1, config: LossConfig):
    """SAPO per token, -f(r) A with the soft gate f(r) = sigmoid(tau (r - 1)) 4 / tau, tau by
    the sign of A; and its stats: nothing clipped, and the gate's slope 4 s (1 - s), the share
    of the unclipped surrogate's gradient each token keeps."""
    del logps_BxC  # the ratio carries the gradient
    tau_Bx1 = jnp.where(adv_Bx1 > 0, config.sapo_tau_pos, config.sapo_tau_neg)
    s_BxC = jax.nn.sigmoid(tau_Bx1 * (jnp.exp(log_ratio_BxC) - 1.0))
    unclipped = jnp.zeros(log_ratio_BxC.shape, bool)
    stats = _clip_fracs(unclipped, unclipped)
    stats["sapo_grad_weight_mean"] = 4.0 * s_BxC * (1.0 - s_BxC)
    return -s_BxC * (4.0 / tau_Bx1) * adv_Bx1, stats


def _vespo(logps_BxC, log_ratio_BxC, adv_Bx1, config: LossConfig):
    """VESPO per token, -sg(phi(w)) A (1 + log pi - sg(log pi)): the value -phi(w) A and the
    gradient -phi(w) A grad log pi, w the completion's ratio (masked slots hold a log-ratio of
    0); and its stats: nothing clipped, and phi(w) itself."""
    bound = _VESPO_TOKEN_LOG_RATIO_BOUND
    token_BxC = jnp.clip(jax.lax.stop_gradient(log_ratio_BxC), -bound, bound)
    log_w_Bx1 = jnp.clip(token_BxC.sum(axis=1, keepdims=True), *_VESPO_LOG_W_RANGE)
    nonneg_Bx1 = adv_Bx1 >= 0
    k_Bx1 = jnp.where(nonneg_Bx1, config.vespo_k_pos, config.vespo_k_neg)
    lam_Bx1 = jnp.where(nonneg_Bx1, config.vespo_lambda_pos, config.vespo_lambda_neg)
    phi_Bx1 = jnp.exp(lam_Bx1 + k_Bx1 * log_w_Bx1 - lam_Bx1 * jnp.exp(log_w_Bx1))
    step_BxC = 1.0 + logps_BxC - jax.lax.stop_gradient(logps_BxC)
    unclipped = jnp.zeros(log_ratio_BxC.shape, bool)
    stats = _clip_fracs(unclipped, unclipped)
    stats["vespo_weight_mean"] = jnp.broadcast_to(phi_Bx1, log_ratio_BxC.shape)
    return -phi_Bx1 * adv_Bx1 * step_BxC, stats


def _clip_fracs(low_BxC: jax.Array, high_BxC: jax.Array) -> dict[str, jax.Array]:
    return {"clip_frac_low": low_BxC, "clip_frac_high": high_BxC}


def _kl(log_r_BxC: jax.Array, estimator: str) -> jax.Array:
    """KL(pi || pi_ref) per token from log r = log pi_ref - log pi of the sampled token."""
    if estimator == "k1":
        return -log_r_BxC
    if estimator == "k2":
        return 0.5 * jnp.square(log_r_BxC)
    return jnp.exp(log_r_BxC) - log_r_BxC - 1.0  # k3: unbiased, always >= 0


def _check_reference(ref_logps_BxC: jax.Array | None, config: LossConfig) -> None:
    if config.beta > 0 and ref_logps_BxC is None:
        raise ValueError("loss beta > 0 needs reference log-probs (ref_logps_BxC is None)")
    if config.beta == 0 and ref_logps_BxC is not None:
        raise ValueError("reference log-probs given but loss beta == 0: drop the reference")


def _masked_sum(x_BxC: jax.Array, mask_BxC: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask_BxC, x_BxC.astype(jnp.float32), 0.0))


def _numerators(
    logps_BxC,
    old_logps_BxC,
    ref_logps_BxC,
    advantages_B,
    mask_BxC,
    entropy_BxC=None,
    keep_BxC=None,
    *,
    config,
    entropy_coeff=None,
):
    """Un-normalised sums over a (micro-)batch: sum(w * loss) and the TOKEN_STATS sums (and the
    entropy's, given the policy's per-token entropy). `keep_BxC`: the tokens whose loss counts
    (top_entropy_quantile), None: every valid one; the statistics cover every valid token.
    `entropy_coeff`: the bonus's coefficient (an fp32 scalar under adaptive entropy control),
    None: `config.entropy_coeff`."""
    _check_reference(ref_logps_BxC, config)
    # Padding may hold any value (e.g. -inf old log-probs): zero it before exp, so neither the
    # loss nor its gradient can pick up inf * 0.
    clean = lambda x: None if x is None else jnp.where(mask_BxC, x.astype(jnp.float32), 0.0)
    loss_BxC, stats = _per_token(
        clean(logps_BxC),
        clean(old_logps_BxC),
        clean(ref_logps_BxC),
        advantages_B,
        mask_BxC,
        config=config,
    )
    sums = {name: _masked_sum(value, mask_BxC) for name, value in stats.items()}
    weights_BxC = token_weights(mask_BxC, config=config)
    if keep_BxC is not None:
        weights_BxC = jnp.where(keep_BxC, weights_BxC, 0.0)
    sums["loss"] = jnp.sum(weights_BxC * loss_BxC)
    if entropy_BxC is not None:
        entropy_BxC = clean(entropy_BxC)
        sums["entropy"] = _masked_sum(jax.lax.stop_gradient(entropy_BxC), mask_BxC)
        if entropy_coeff is not None or config.entropy_coeff:
            coeff = config.entropy_coeff if entropy_coeff is None else entropy_coeff
            sums["loss"] -= coeff * jnp.sum(weights_BxC * entropy_BxC)
    return sums


def _normalise(sums: dict[str, jax.Array], loss_norm: jax.Array, token_count: jax.Array):
    return {name: v / (loss_norm if name == "loss" else token_count) for name, v in sums.items()}


def policy_loss(
    logps_BxC: jax.Array,
    old_logps_BxC: jax.Array,
    ref_logps_BxC: jax.Array | None,
    advantages_B: jax.Array,
    mask_BxC: jax.Array,
    entropy_BxC: jax.Array | None = None,
    *,
    config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss of one whole batch from log-probs (and the policy's per-token entropy,
    for `entropy_coeff` and `top_entropy_quantile`), and its TOKEN_STATS (token means; the
    entropy's too, given it)."""
    keep_BxC = None
    if config.top_entropy_quantile < 1:
        stopped = jax.lax.stop_gradient(entropy_BxC)
        keep_BxC = high_entropy_mask(stopped, mask_BxC, config.top_entropy_quantile)
    sums = _numerators(
        logps_BxC,
        old_logps_BxC,
        ref_logps_BxC,
        advantages_B,
        mask_BxC,
        entropy_BxC,
        keep_BxC,
        config=config,
    )
    metrics = _normalise(sums, loss_normaliser(mask_BxC, config=config), _token_count(mask_BxC))
    return metrics.pop("loss"), metrics


def split_rows(tree: Any, num_parts: int, group_size: int = 1) -> Any:
    """(B, ...) -> (U, B/U, ...), part u holding the groups u, u+U, u+2U, ... whole (group g:
    rows gG to gG+G-1; G = 1: rows u, u+U, ...).

    Strided rather than contiguous so that, with the batch sharded in contiguous blocks over
    devices, every part takes rows from every device (that holds U or more groups) and the
    split moves no data.
    """
    u, g = num_parts, group_size
    return jax.tree.map(
        lambda x: x.reshape(-1, u, g, *x.shape[1:]).swapaxes(0, 1).reshape(u, -1, *x.shape[1:]),
        tree,
    )


def merge_rows(x_UxbX: jax.Array, group_size: int = 1) -> jax.Array:
    """`split_rows`' inverse for one array: (U, B/U, ...) -> (B, ...), rows back in order."""
    u, g, rest = x_UxbX.shape[0], group_size, x_UxbX.shape[2:]
    x_UxnxGX = x_UxbX.reshape(u, -1, g, *rest)
    return x_UxnxGX.swapaxes(0, 1).reshape(-1, *rest)


# The Batch fields with a completion axis: what a micro-batch of a narrower width cuts.
_COMPLETION_FIELDS = (
    "completion_tokens_BxC",
    "completion_mask_BxC",
    "old_logps_BxC",
    "ref_logps_BxC",
    "tool_mask_BxC",
    "kept_ids_BxCxK",
)


def bucket_widths(width: int, buckets: int) -> tuple[int, ...]:
    """The widths a micro-batch may run at: ceil(width x k / buckets) for k = 1..buckets."""
    if buckets < 1:
        raise ValueError(f"width_buckets must be >= 1, got {buckets}")
    return tuple(sorted({-(-width * k // buckets) for k in range(1, buckets + 1)}))


def _used_width_B(mask_BxC: jax.Array) -> jax.Array:
    """The slots each row needs: up to and including its last True (0 for an empty row)."""
    slots = jnp.arange(1, mask_BxC.shape[1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(mask_BxC, slots, 0), axis=1)


def _length_sorted(
    tree: Any, used_B: jax.Array, num_micro_batches: int, group_size: int = 1
) -> tuple[Any, jax.Array]:
    """The rows reordered so that `split_rows`'s micro-batch m holds the m-th run of B/M rows by
    used width, shortest first, in whole groups of `group_size` rows ranked by their longest
    row; and the order (new row i is old row order[i]).

    The reordered batch keeps the batch sharding, so each micro-batch still spreads its rows
    over every device."""
    m, g = num_micro_batches, group_size
    used_groups = jnp.max(used_B.reshape(-1, g), axis=1)
    groups = jnp.argsort(used_groups, stable=True).reshape(m, -1).T.reshape(-1)
    order = (groups[:, None] * g + jnp.arange(g)).reshape(-1)
    take = lambda x: sharding.constrain(x[order], ("batch",) + (None,) * (x.ndim - 1))
    return jax.tree.map(take, tree), order


def _at_fitting_width(
    widths: tuple[int, ...], mask_bxC: jax.Array, run_at: Callable[[int], Any]
) -> Any:
    """run_at(w) for the smallest w in `widths` that holds every row of `mask_bxC`."""
    if len(widths) == 1:
        return run_at(widths[0])
    # The count of widths too narrow (a sum, not searchsorted: that is a loop on the device).
    index = jnp.sum(jnp.asarray(widths) < jnp.max(_used_width_B(mask_bxC)))
    return jax.lax.switch(index, [functools.partial(run_at, w) for w in widths])


def _cut(mb: Batch, width: int) -> Batch:
    """The micro-batch's first `width` completion slots."""
    cut = {f: getattr(mb, f)[:, :width] for f in _COMPLETION_FIELDS if getattr(mb, f) is not None}
    return mb.replace(**cut)


def _logps_and_entropy(
    params: Any, mb: Batch, *, model: ModelConfig, loss: LossConfig, prompt_group: int = 1
) -> tuple[jax.Array, jax.Array]:
    """The policy's log-probs and entropies of a (micro-)batch's completion tokens (fp32), over
    the ids each was drawn from where the batch has them (the keep sampling mask).
    `prompt_group` > 1: the rows are whole groups of that many, and each group's prompt runs
    once (`transformer.forward_shared_prompts`)."""
    every = slice(None, None, prompt_group)  # a group's rows share its prompt: take the first
    return transformer.completion_logprobs(
        params,
        mb.prompt_tokens_BxP[every],
        mb.prompt_mask_BxP[every],
        mb.completion_tokens_BxC,
        mb.completion_mask_BxC,
        config=model,
        temperature=loss.temperature,
        chunk=loss.logprob_chunk,
        prompt_group=prompt_group,
        kept_BxCxK=mb.kept_ids_BxCxK,
    )


def _padded_to(x_bxW: jax.Array, width: int) -> jax.Array:
    return jnp.pad(x_bxW, ((0, 0), (0, width - x_bxW.shape[1])))


def loss_mask(batch: Batch, *, config: LossConfig) -> jax.Array:
    """The tokens the loss counts: the completions' own, less the tools' (the policy did not
    sample those), less truncated completions if masked."""
    mask_BxC = batch.completion_mask_BxC
    if batch.tool_mask_BxC is not None:
        mask_BxC = mask_BxC & ~batch.tool_mask_BxC
    if config.mask_truncated_completions:
        mask_BxC = mask_BxC & ~batch.truncated_B[:, None]
    return mask_BxC


def _check_micro_batches(rows: int, num_micro_batches: int, prompt_group: int = 1) -> None:
    if num_micro_batches < 1 or rows % num_micro_batches:
        raise ValueError(
            f"num_micro_batches={num_micro_batches} does not divide the batch of {rows} completions"
        )
    if prompt_group > 1 and rows % (num_micro_batches * prompt_group):
        raise ValueError(
            f"shared prompts: {num_micro_batches} micro-batches do not split the batch of {rows} "
            f"completions into whole groups of {prompt_group}"
        )


def _check_batch(
    batch: Batch, *, loss: LossConfig, num_micro_batches: int, prompt_group: int
) -> None:
    rows = batch.completion_mask_BxC.shape[0]
    _check_micro_batches(rows, num_micro_batches, prompt_group)
    _check_reference(batch.ref_logps_BxC, loss)  # before any forward pass


def compute_gradients(
    params: Any,
    batch: Batch,
    *,
    model: ModelConfig,
    loss: LossConfig,
    num_micro_batches: int = 1,
    width_buckets: int = 1,
    prompt_group: int = 1,
    frozen: Any = None,
    entropy_coeff: jax.Array | None = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradient of the GRPO loss over the whole batch, accumulated over micro-batches under
    `lax.scan`, and the metrics loss / TOKEN_STATS / entropy (fp32 scalars).

    `params` are the trainable ones: the whole model, or LoRA adapters on the `frozen` base
    (models/lora.py), which gets no gradient. `entropy_coeff`: the entropy bonus's coefficient
    this update (adaptive entropy control), None: `loss.entropy_coeff`.

    Micro-batch m holds rows m, m+M, ... (see `split_rows`), of the batch sorted by length when
    `width_buckets` > 1 (each micro-batch then runs at the narrowest bucket width that holds
    it); the sums are normalised once, by the whole batch's N, so any num_micro_batches dividing
    B and any width_buckets give the same gradient. With `prompt_group` = G > 1 (rows in whole
    groups of G that share a prompt) micro-batch m holds groups m, m+M, ... (`split_rows`)
    and each prompt runs once per micro-batch; the gradient is the same.
    """
    _check_batch(batch, loss=loss, num_micro_batches=num_micro_batches, prompt_group=prompt_group)
    width = batch.completion_mask_BxC.shape[1]
    widths = bucket_widths(width, width_buckets)
    # Cut micro-batches keep the batch's width as Dr. GRPO's default L.
    loss = dataclasses.replace(loss, max_completion_length=loss.max_completion_length or width)
    mask_BxC = loss_mask(batch, config=loss)
    if len(widths) > 1:  # by the loss mask: slots it leaves out count in no term
        used_B = _used_width_B(mask_BxC)
        (batch, mask_BxC), _ = _length_sorted(
            (batch, mask_BxC), used_B, num_micro_batches, prompt_group
        )

    def logps_and_entropy(p, mb: Batch) -> tuple[jax.Array, jax.Array]:
        return _logps_and_entropy(
            lora.attach(frozen, p), mb, model=model, loss=loss, prompt_group=prompt_group
        )

    def numerators(p, mb: Batch, keep_BxC: jax.Array | None):
        logps_BxC, entropy_BxC = logps_and_entropy(p, mb)
        sums = _numerators(
            logps_BxC,
            mb.old_logps_BxC,
            mb.ref_logps_BxC,
            mb.advantages_B,
            loss_mask(mb, config=loss),
            entropy_BxC,
            keep_BxC,
            config=loss,
            entropy_coeff=entropy_coeff,
        )
        return sums["loss"], sums

    grad_fn = jax.grad(numerators, has_aux=True)

    def accumulate(carry, xs):
        mb, keep = xs
        grads_at = lambda w: grad_fn(params, _cut(mb, w), None if keep is None else keep[:, :w])
        grads, sums = _at_fitting_width(widths, loss_mask(mb, config=loss), grads_at)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    def entropy(_, mb: Batch):
        entropy_at = lambda w: _padded_to(logps_and_entropy(params, _cut(mb, w))[1], width)
        return None, _at_fitting_width(widths, loss_mask(mb, config=loss), entropy_at)

    split = functools.partial(split_rows, num_parts=num_micro_batches, group_size=prompt_group)
    micro_batches = split(batch)
    keep = None
    if loss.top_entropy_quantile < 1:  # the whole batch's entropies set the threshold
        _, entropy_MxRxC = jax.lax.scan(entropy, None, micro_batches)
        # A quantile ignores the order of its values, so the split layout serves as it is.
        keep = high_entropy_mask(
            jax.lax.stop_gradient(entropy_MxRxC),
            split(mask_BxC),
            loss.top_entropy_quantile,
        )
    zero_grads = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    stat_names = ("loss", "entropy", *token_stat_names(loss))
    zero_sums = {name: jnp.zeros((), jnp.float32) for name in stat_names}
    (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), (micro_batches, keep))
    loss_norm = loss_normaliser(mask_BxC, config=loss)
    grads = jax.tree.map(lambda g, p: (g / loss_norm).astype(p.dtype), grads, params)
    return grads, _normalise(sums, loss_norm, _token_count(mask_BxC))


def make_update_fn(
    *,
    model: ModelConfig,
    tx: optax.GradientTransformation,
    loss: LossConfig,
    num_micro_batches: int = 1,
    width_buckets: int = 1,
    updates_per_batch: int = 1,
    group_size: int = 1,
    prompt_group: int = 1,
    lr_schedule: optax.Schedule | None = None,
    state_sharding: TrainState | None = None,
):
    """A jitted `update(state, batch, frozen=None) -> (state, metrics)` that donates `state`;
    `frozen`: the base params under LoRA adapters (`state.params`), else None.

    The batch makes `updates_per_batch` optimizer steps, one per mini-batch of whole groups of
    `group_size` rows (see `split_rows`), in order; each accumulates its gradient over
    `num_micro_batches` micro-batches, of `width_buckets` possible widths (`compute_gradients`).
    `prompt_group` > 1 (the group size): each group's prompt runs once per micro-batch.

    metrics (fp32 scalars, each the mean over the batch's updates): loss, entropy, TOKEN_STATS,
    grad_norm (before clipping), and learning_rate when `lr_schedule` is given.
    state_sharding: the state's shardings (a TrainState of NamedShardings), pinned on the new
    state; without it XLA may pick other layouts for the outputs (e.g. a norm scale sharded
    like its reduce-scattered gradient), which defeats donation and drifts from step to step.
    """

    def one_update(
        state: TrainState, batch: Batch, frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        control = state.entropy_control
        coeff = None if control is None else applied_entropy_coeff(control, loss)
        grads, metrics = compute_gradients(
            state.params,
            batch,
            model=model,
            loss=loss,
            num_micro_batches=num_micro_batches,
            width_buckets=width_buckets,
            prompt_group=prompt_group,
            frozen=frozen,
            entropy_coeff=coeff,
        )
        metrics["grad_norm"] = optax.global_norm(grads).astype(jnp.float32)
        if lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        if control is not None:
            metrics["entropy_coeff"] = coeff
            new_state = new_state.replace(
                entropy_control=next_entropy_control(control, metrics["entropy"], loss)
            )
        if state_sharding is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_sharding)
        return new_state, metrics

    def update(
        state: TrainState, batch: Batch, frozen: Any = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        if (state.entropy_control is None) != (loss.entropy_target is None):
            raise ValueError(
                "adaptive entropy control (loss entropy_target) needs the state's "
                "entropy_control (initial_entropy_control), and only it"
            )
        if updates_per_batch == 1:
            return one_update(state, batch, frozen)
        _check_updates(batch.completion_mask_BxC.shape[0], updates_per_batch, group_size)
        parts = split_rows(batch, updates_per_batch, group_size)
        state, metrics_U = jax.lax.scan(lambda s, b: one_update(s, b, frozen), state, parts)
        return state, jax.tree.map(lambda m: m.mean(axis=0), metrics_U)

    return jax.jit(update, donate_argnums=0)


def initial_entropy_control(loss: LossConfig) -> EntropyControl | None:
    """The controller's state before the first update; None without a target."""
    if loss.entropy_target is None:
        return None
    return EntropyControl(
        coeff=jnp.asarray(loss.entropy_coeff, jnp.float32),
        last_entropy=jnp.asarray(jnp.inf, jnp.float32),
    )


def applied_entropy_coeff(control: EntropyControl, loss: LossConfig) -> jax.Array:
    """The coefficient an update's bonus uses: the controller's where the last update's
    entropy was at or below the target, else 0."""
    return jnp.where(control.last_entropy <= loss.entropy_target, control.coeff, 0.0)


def next_entropy_control(
    control: EntropyControl, entropy: jax.Array, loss: LossConfig
) -> EntropyControl:
    """The controller after an update whose entropy was `entropy`: the coefficient one step up
    where it was at or below the target, one step down above it, kept in range."""
    delta = loss.entropy_coeff_delta
    step = jnp.where(entropy <= loss.entropy_target, delta, -delta)
    coeff = jnp.clip(control.coeff + step, loss.entropy_coeff_min, loss.entropy_coeff_max)
    return EntropyControl(coeff=coeff, last_entropy=entropy.astype(jnp.float32))


def _check_updates(rows: int, updates_per_batch: int, group_size: int) -> None:
    if updates_per_batch < 1 or group_size < 1 or rows % (updates_per_batch * group_size):
        raise ValueError(
            f"updates_per_batch={updates_per_batch} does not split the batch of {rows} "
            f"completions into whole groups of {group_size}"
        )


def make_reference_logps_fn(
    model: ModelConfig,
    loss: LossConfig,
    *,
    num_micro_batches: int = 1,
    width_buckets: int = 1,
    prompt_group: int = 1,
):
    """A jitted `fn(ref_params, batch) -> ref_logps_BxC` (fp32, meaningful on completion tokens
    only), for loss.beta > 0 only.

    Runs the policy's own forward and temperature on the frozen reference parameters, in
    `num_micro_batches` sequential chunks to bound activation memory; with `width_buckets` > 1
    the chunks are of similar lengths, each at the narrowest bucket width that holds it (as the
    update's micro-batches, `compute_gradients`); with `prompt_group` > 1, of whole groups, each
    prompt run once.
    """
    if loss.beta == 0:
        raise ValueError("loss beta == 0 uses no reference policy: build no reference log-probs")

    def ref_logps(ref_params: Any, batch: Batch) -> jax.Array:
        rows, width = batch.completion_tokens_BxC.shape
        _check_micro_batches(rows, num_micro_batches, prompt_group)
        widths = bucket_widths(width, width_buckets)
        order = None
        if len(widths) > 1:
            used_B = _used_width_B(batch.completion_mask_BxC)
            batch, order = _length_sorted(batch, used_B, num_micro_batches, prompt_group)

        def one(mb: Batch) -> jax.Array:
            logps_at = lambda w: _padded_to(
                _logps_and_entropy(
                    ref_params, _cut(mb, w), model=model, loss=loss, prompt_group=prompt_group
                )[0],
                width,
            )
            return _at_fitting_width(widths, mb.completion_mask_BxC, logps_at)

        logps_MxbxC = jax.lax.map(one, split_rows(batch, num_micro_batches, prompt_group))
        logps_BxC = merge_rows(logps_MxbxC, prompt_group)
        if order is None:
            return logps_BxC
        return sharding.constrain(logps_BxC[jnp.argsort(order)], ("batch", None))

    return jax.jit(ref_logps)
