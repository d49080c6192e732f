"""State that crosses jit boundaries, as chex dataclasses (built by keyword, updated with .replace).

Shape suffixes name the axes: B = completions (prompts x group size), P = prompt slots
(left-padded), C = completion slots (right-padded).
"""

from __future__ import annotations

from typing import Any

import chex
import jax


@chex.dataclass
class Rollout:
    """What the sampler produced: n completions per prompt, prompts repeated group-contiguously."""

    prompt_tokens_BxP: jax.Array  # int32, left-padded
    prompt_mask_BxP: jax.Array  # bool, True on real prompt tokens
    completion_tokens_BxC: jax.Array  # int32, right-padded (pad id after the end token)
    completion_mask_BxC: jax.Array  # bool, True up to and including the end token
    logps_BxC: jax.Array  # fp32 log-prob of each sampled token under the sampling policy
    lengths_B: jax.Array  # int32, number of True in completion_mask
    truncated_B: jax.Array  # bool, hit the token budget without an end token
    # bool, True on the completion tokens a tool wrote (grpo.tools); None: the model wrote all
    tool_mask_BxC: jax.Array | None = None
    # int32, the ids each token was drawn from (SamplingConfig.keep_sampling_mask), padded with
    # ids past the vocabulary; None: the whole vocabulary
    kept_ids_BxCxK: jax.Array | None = None


@chex.dataclass
class Batch:
    """One update's input: a rollout plus what the reward and advantage phases added."""

    prompt_tokens_BxP: jax.Array
    prompt_mask_BxP: jax.Array
    completion_tokens_BxC: jax.Array
    completion_mask_BxC: jax.Array
    old_logps_BxC: jax.Array  # the rollout's log-probs: the behaviour policy of the ratio
    advantages_B: jax.Array  # fp32
    truncated_B: jax.Array  # bool: the completion hit the token budget without an end token
    ref_logps_BxC: jax.Array | None = None  # frozen reference policy; None when beta == 0
    tool_mask_BxC: jax.Array | None = None  # tokens a tool wrote: attended to, never trained on
    kept_ids_BxCxK: jax.Array | None = None  # each token's support in the log-probs (Rollout's)

    @classmethod
    def from_rollout(cls, rollout: Rollout, advantages_B: jax.Array) -> Batch:
        """The rollout's tokens, with its log-probs as the old (behaviour) policy."""
        return cls(
            prompt_tokens_BxP=rollout.prompt_tokens_BxP,
            prompt_mask_BxP=rollout.prompt_mask_BxP,
            completion_tokens_BxC=rollout.completion_tokens_BxC,
            completion_mask_BxC=rollout.completion_mask_BxC,
            old_logps_BxC=rollout.logps_BxC,
            advantages_B=advantages_B,
            truncated_B=rollout.truncated_B,
            tool_mask_BxC=rollout.tool_mask_BxC,
            kept_ids_BxCxK=rollout.kept_ids_BxCxK,
        )


@chex.dataclass
class EntropyControl:
    """Adaptive entropy control's state (`LossConfig.entropy_target`), carried from one
    optimizer update to the next and checkpointed with the rest."""

    coeff: jax.Array  # fp32 scalar: the entropy bonus's coefficient
    last_entropy: jax.Array  # fp32 scalar: the last update's entropy (+inf before the first)


@chex.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # typed PRNG key
    entropy_control: EntropyControl | None = None  # None: a fixed entropy coefficient
