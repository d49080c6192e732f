"""DAPO's dynamic sampling, on the host: fill a step with groups whose rewards differ.

A group whose completions all score the same has zero advantages, so it teaches nothing: under
token_mean it only dilutes the step, and with beta > 0 it only pulls toward the reference. With
`TrainConfig.max_sampling_rounds > 1` the trainer samples further rounds of prompts until the
step holds `prompts_per_step` groups whose rewards differ, or the rounds run out (then
equal-reward groups fill the rest, so the step's shape never changes).

These helpers work on host (numpy) rows of every process, so every process picks the same
groups. Rows are group-contiguous: group g is rows g*n .. g*n+n-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from grpo.phases.rollout import NOT_KEPT
from grpo.types import Rollout


def informative_groups(rewards_B: np.ndarray, group_size: int) -> np.ndarray:
    """bool [G]: whether the rewards within each group differ."""
    groups_GxN = np.asarray(rewards_B).reshape(-1, group_size)
    return groups_GxN.max(axis=1) != groups_GxN.min(axis=1)


def pick_groups(informative_G: np.ndarray, count: int) -> np.ndarray:
    """`count` group indices: the informative groups first, then the others, each in sampling
    order (earlier rounds first)."""
    if count > len(informative_G):
        raise ValueError(f"cannot pick {count} groups from {len(informative_G)}")
    order = np.concatenate([np.flatnonzero(informative_G), np.flatnonzero(~informative_G)])
    return order[:count]


def group_rows(groups: np.ndarray, group_size: int) -> np.ndarray:
    """The row indices of `groups`, each group's rows contiguous and in order."""
    return (np.asarray(groups)[:, None] * group_size + np.arange(group_size)).reshape(-1)


def concat_rollouts(rollouts: Sequence[Rollout], *, pad_id: int) -> Rollout:
    """Host rollouts stacked by row, prompts left-padded and completions right-padded to the
    widest (pad_id tokens, False masks, 0 log-probs: what the sampler itself writes)."""
    prompt_width = max(r.prompt_tokens_BxP.shape[1] for r in rollouts)
    completion_width = max(r.completion_tokens_BxC.shape[1] for r in rollouts)

    def stack(field: str, width: int, value, left: bool) -> np.ndarray:
        def pad(x: np.ndarray) -> np.ndarray:
            extra = width - x.shape[1]
            rest = ((0, 0),) * (x.ndim - 2)  # a token's kept ids
            return np.pad(
                x, ((0, 0), (extra, 0) if left else (0, extra), *rest), constant_values=value
            )

        return np.concatenate([pad(np.asarray(getattr(r, field))) for r in rollouts])

    return Rollout(
        prompt_tokens_BxP=stack("prompt_tokens_BxP", prompt_width, pad_id, left=True),
        prompt_mask_BxP=stack("prompt_mask_BxP", prompt_width, False, left=True),
        completion_tokens_BxC=stack("completion_tokens_BxC", completion_width, pad_id, left=False),
        completion_mask_BxC=stack("completion_mask_BxC", completion_width, False, left=False),
        logps_BxC=stack("logps_BxC", completion_width, 0.0, left=False),
        lengths_B=np.concatenate([np.asarray(r.lengths_B) for r in rollouts]),
        truncated_B=np.concatenate([np.asarray(r.truncated_B) for r in rollouts]),
        tool_mask_BxC=None
        if rollouts[0].tool_mask_BxC is None
        else stack("tool_mask_BxC", completion_width, False, left=False),
        kept_ids_BxCxK=None
        if rollouts[0].kept_ids_BxCxK is None
        else stack("kept_ids_BxCxK", completion_width, NOT_KEPT, left=False),
    )
