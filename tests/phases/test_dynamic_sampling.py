"""Dynamic sampling's host helpers: which groups count as informative, which are kept, and how
rounds of different widths are stacked."""

import numpy as np
import pytest

from grpo.phases import dynamic_sampling
from grpo.types import Rollout

PAD = 9


def test_informative_groups_are_those_whose_rewards_differ():
    rewards = np.array([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5, 2, 2, 2.5], np.float32)
    np.testing.assert_array_equal(
        dynamic_sampling.informative_groups(rewards, 3), [False, True, False, True]
    )


def test_pick_groups_takes_informative_ones_first_in_sampling_order():
    informative = np.array([False, True, False, True, True])
    np.testing.assert_array_equal(dynamic_sampling.pick_groups(informative, 2), [1, 3])
    # Too few informative groups: the earliest equal-reward ones fill the rest.
    np.testing.assert_array_equal(dynamic_sampling.pick_groups(informative, 4), [1, 3, 4, 0])
    with pytest.raises(ValueError, match="cannot pick 6 groups from 5"):
        dynamic_sampling.pick_groups(informative, 6)


def test_group_rows_keeps_groups_contiguous():
    np.testing.assert_array_equal(
        dynamic_sampling.group_rows(np.array([2, 0]), 3), [6, 7, 8, 0, 1, 2]
    )


def _rollout(prompts: list[list[int]], completions: list[list[int]], width_p: int, width_c: int):
    """A host rollout as the sampler writes it: prompts left-padded, completions right-padded."""
    rows = len(prompts)
    out = dict(
        prompt_tokens_BxP=np.full((rows, width_p), PAD, np.int32),
        prompt_mask_BxP=np.zeros((rows, width_p), bool),
        completion_tokens_BxC=np.full((rows, width_c), PAD, np.int32),
        completion_mask_BxC=np.zeros((rows, width_c), bool),
        logps_BxC=np.zeros((rows, width_c), np.float32),
    )
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        out["prompt_tokens_BxP"][row, width_p - len(p) :] = p
        out["prompt_mask_BxP"][row, width_p - len(p) :] = True
        out["completion_tokens_BxC"][row, : len(c)] = c
        out["completion_mask_BxC"][row, : len(c)] = True
        out["logps_BxC"][row, : len(c)] = -0.5
    lengths = np.array([len(c) for c in completions], np.int32)
    return Rollout(**out, lengths_B=lengths, truncated_B=lengths == width_c)


def test_concat_rollouts_pads_to_the_widest_as_the_sampler_does():
    first = _rollout([[1, 2]], [[3]], width_p=2, width_c=2)
    second = _rollout([[4, 5, 6]], [[7, 8, 1, 2]], width_p=4, width_c=4)
    stacked = dynamic_sampling.concat_rollouts([first, second], pad_id=PAD)
    # The first round re-padded to the second's widths is what the sampler writes at them.
    expected = _rollout([[1, 2], [4, 5, 6]], [[3], [7, 8, 1, 2]], width_p=4, width_c=4)
    for field in expected.keys():
        if expected[field] is None:  # no tools: no tool mask
            assert stacked[field] is None, field
            continue
        np.testing.assert_array_equal(stacked[field], expected[field], err_msg=field)
        assert stacked[field].dtype == expected[field].dtype, field
    assert stacked.truncated_B.tolist() == [False, True]


def test_concat_rollouts_pads_the_tool_masks_too():
    first = _rollout([[1, 2]], [[3, 4]], width_p=2, width_c=2).replace(
        tool_mask_BxC=np.array([[False, True]])
    )
    second = _rollout([[4]], [[7, 8, 1]], width_p=1, width_c=3).replace(
        tool_mask_BxC=np.array([[False, True, True]])
    )
    stacked = dynamic_sampling.concat_rollouts([first, second], pad_id=PAD)
    np.testing.assert_array_equal(
        stacked.tool_mask_BxC, [[False, True, False], [False, True, True]]
    )
    assert (
        dynamic_sampling.concat_rollouts([first.replace(tool_mask_BxC=None)], pad_id=PAD)[
            "tool_mask_BxC"
        ]
        is None
    )
