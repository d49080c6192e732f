"""The eval on stand-in replies: greedy and sampled accuracy, pass@k, padding, extra sets."""

import types

import numpy as np
import pytest

from grpo import evaluation, sampling
from grpo.experiment import TrainConfig
from grpo.phases import reward
from grpo.phases.rollout import SamplingConfig


@pytest.mark.parametrize("eval_temperature, sampled_at", [(None, 0.7), (0.6, 0.6)])
def test_eval_flags_each_reply_and_drops_the_padding(monkeypatch, eval_temperature, sampled_at):
    # 10 examples in batches of 4 (the last padded with copies of example 9), 3 replies each.
    # Reply j to example i is right iff i is even and i % 3 == j: 5 examples have exactly one
    # right reply. Greedy (one reply, j = 0): examples 0 and 6. A reply to example i is i
    # tokens long, truncated when i >= 8.
    examples = [{"question": str(i), "answer": "#### 0"} for i in range(10)]

    sampled_with = []

    def fake_sample(exp, params, mine, key, sampling, samples):
        sampled_with.append((sampling.temperature, samples))
        lengths = np.array([int(e["question"]) for e in mine for _ in range(samples)])
        rollout = types.SimpleNamespace(lengths_B=lengths, truncated_B=lengths >= 8)
        return rollout, [f"{e['question']}|{j}" for e in mine for j in range(samples)]

    def fake_is_correct(text, example, last_number_fallback, match):
        i, j = (int(part) for part in text.split("|"))
        assert example["question"] == str(i)
        return i % 2 == 0 and i % 3 == j

    monkeypatch.setattr(sampling, "sample", fake_sample)
    monkeypatch.setattr(reward, "is_correct", fake_is_correct)
    exp = types.SimpleNamespace(
        train=TrainConfig(
            eval_prompts_per_batch=4,
            eval_samples=3,
            eval_temperature=eval_temperature,
            eval_pass_at=(1, 2, 3),
        ),
        test_examples=examples,
        # An extra set of examples 0-3: greedy right on 0; replies right on 0 (j=0) and 2 (j=2).
        extra_eval_sets={"head": examples[:4]},
        mesh=types.SimpleNamespace(shape={"dp": 2, "fsdp": 2}),
        sampling=SamplingConfig(max_new_tokens=8, temperature=0.7, end_ids=(1,), pad_id=0),
    )
    replies = {}
    keep = lambda name, records: replies.setdefault(name, records)
    # pass@k of an example with one right reply of 3: 1/3, 1 - C(2, 2) / C(3, 2) = 2/3, 1.
    assert evaluation.evaluate(exp, None, keep) == pytest.approx(
        {
            "eval_accuracy": 2 / 10,
            "eval_length_mean": 4.5,
            "eval_truncation_rate": 2 / 10,
            "eval_mean_at_k": 5 / 30,
            "eval_pass_at_k": 5 / 10,
            "eval_maj_at_k": 0.0,  # these replies give no answer to vote with (see below)
            "eval_pass_at_1": 5 / 30,
            "eval_pass_at_2": 5 * 2 / 3 / 10,
            "eval_pass_at_3": 5 / 10,
            "eval_accuracy/head": 1 / 4,
            "eval_length_mean/head": 1.5,
            "eval_truncation_rate/head": 0.0,
            "eval_mean_at_k/head": 2 / 12,
            "eval_pass_at_k/head": 2 / 4,
            "eval_maj_at_k/head": 0.0,
            "eval_pass_at_1/head": 2 / 12,
            "eval_pass_at_2/head": 2 * 2 / 3 / 4,
            "eval_pass_at_3/head": 2 / 4,
        },
        rel=1e-12,
    )
    # Greedy, then at the eval's temperature (None: the training sampler's 0.7); each set.
    assert sampled_with == [(0.0, 1)] * 3 + [(sampled_at, 3)] * 3 + [(0.0, 1), (sampled_at, 3)]
    # Every greedy reply of each set, in order, without the padding's.
    assert replies.keys() == {"test", "head"}
    assert replies["test"][6] == {
        "question": "6",
        "answer": "0",
        "completion": "6|0",
        "correct": True,
        "length": 6,
        "truncated": False,
    }
    assert [r["completion"] for r in replies["test"]] == [f"{i}|0" for i in range(10)]
    assert [r["correct"] for r in replies["head"]] == [True, False, False, False]
    assert [r["truncated"] for r in replies["test"]] == [i >= 8 for i in range(10)]


def test_pass_at_k_by_hand():
    # n = 4 replies; c right. pass@2 = 1 - C(4 - c, 2) / C(4, 2): c = 1 -> 1 - 3/6, c = 2 ->
    # 1 - 1/6, c = 3 -> 1 (any 2 hold a right one). pass@1 = c / 4; pass@4 = any right.
    correct = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], bool)
    np.testing.assert_allclose(evaluation.pass_at(correct, 2), [0, 0.5, 5 / 6, 1])
    np.testing.assert_allclose(evaluation.pass_at(correct, 1), [0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(evaluation.pass_at(correct, 4), [0, 1, 1, 1])
    # Large n stays exact: one right of 64, pass@8 = 8/64.
    one_of_64 = np.zeros((1, 64), bool)
    one_of_64[0, 17] = True
    assert evaluation.pass_at(one_of_64, 8)[0] == pytest.approx(0.125, rel=1e-12)


def test_majority_vote_counts_the_answer_most_replies_give(monkeypatch):
    # The reference is 5 for every example; 3 replies each. Numbers vote by value ($5 = 5.0 = 5).
    votes = [
        ["<answer>7</answer>", "#### $5", "<answer>5.0</answer>"],  # 5 wins 2-1: right
        ["<answer>7</answer>", "<answer>5</answer>", "#### 7.0"],  # 7 wins: wrong
        ["no answer", "none either", "\\boxed{5.0}"],  # the only vote: right
        ["<answer>7</answer>", "<answer>5</answer>", "no answer"],  # a tie: the first, 7, wrong
        ["no answer", "none", "nothing"],  # no vote: wrong
    ]
    examples = [{"question": str(i), "answer": "#### 5"} for i in range(len(votes))]

    def fake_sample(exp, params, mine, key, sampler, samples):
        replies = [votes[int(e["question"])] if samples > 1 else [""] for e in mine]
        rows = [text for texts in replies for text in texts]
        lengths = np.ones(len(rows), int)
        return types.SimpleNamespace(lengths_B=lengths, truncated_B=lengths > 1), rows

    monkeypatch.setattr(sampling, "sample", fake_sample)
    exp = types.SimpleNamespace(
        train=TrainConfig(eval_prompts_per_batch=4, eval_samples=3),
        test_examples=examples,
        extra_eval_sets={},
        mesh=types.SimpleNamespace(shape={"dp": 1, "fsdp": 1}),
        sampling=SamplingConfig(max_new_tokens=8, temperature=0.7, end_ids=(1,), pad_id=0),
    )
    metrics = evaluation.evaluate(exp, None)
    assert metrics["eval_maj_at_k"] == 2 / 5
    assert metrics["eval_mean_at_k"] == 5 / 15 and metrics["eval_pass_at_k"] == 4 / 5


def test_eval_rewards_score_the_greedy_and_sampled_replies_as_training_does(monkeypatch):
    # 10 examples in batches of 4 (the last padded); reply j to example i is "<i + j>|0" (the
    # greedy one: j = 0). Rewards: `digits` = i + j, and the reward model's stand-in score 0.5
    # (weights 1 and 2), so the greedy reply's total is i + 1, the 2 sampled ones' i + 1 and
    # i + 2; the padding's replies are scored but dropped.
    examples = [{"question": str(i), "answer": "#### 0"} for i in range(10)]

    def fake_sample(exp, params, mine, key, sampler, samples):
        lengths = np.ones(len(mine) * samples, int)
        texts = [f"{int(e['question']) + j}|0" for e in mine for j in range(samples)]
        return types.SimpleNamespace(lengths_B=lengths, truncated_B=lengths > 1), texts

    scored_rows = []

    def fake_reward_model_scores(exp, examples, replies, *, group, num_micro_batches):
        scored_rows.append((len(replies), group, num_micro_batches))
        return {reward.REWARD_MODEL: np.full(len(replies), 0.5, np.float32)}

    monkeypatch.setattr(sampling, "sample", fake_sample)
    monkeypatch.setattr(sampling, "reward_model_scores", fake_reward_model_scores)
    digits = lambda completion, example: float(completion.split("|")[0])
    monkeypatch.setitem(reward.REWARD_FUNCTIONS, "digits", digits)
    exp = types.SimpleNamespace(
        train=TrainConfig(
            eval_prompts_per_batch=4,
            eval_rewards=True,
            eval_samples=2,
            best_export_metric="eval_reward_mean_at_k",
            completions_per_micro_batch=2,  # 8 completions per update: 4 micro-batches
        ),
        rewards=reward.RewardConfig(names=("digits", reward.REWARD_MODEL), weights=(1.0, 2.0)),
        test_examples=examples,
        extra_eval_sets={"head": examples[:4]},
        mesh=types.SimpleNamespace(shape={"dp": 2, "fsdp": 1}),
        sampling=SamplingConfig(max_new_tokens=8, temperature=0.7, end_ids=(1,), pad_id=0),
    )
    replies = {}
    metrics = evaluation.evaluate(
        exp, None, lambda name, records: replies.setdefault(name, records)
    )
    assert {k: v for k, v in metrics.items() if "reward" in k} == pytest.approx(
        {
            "eval_reward_mean": 5.5,
            "eval_reward/digits": 4.5,
            "eval_reward/reward_model": 0.5,
            "eval_reward_mean/head": 2.5,
            "eval_reward/digits/head": 1.5,
            "eval_reward/reward_model/head": 0.5,
            "eval_reward_mean_at_k": 6.0,
            "eval_reward_at_k/digits": 5.0,
            "eval_reward_at_k/reward_model": 0.5,
            "eval_reward_mean_at_k/head": 3.0,
            "eval_reward_at_k/digits/head": 2.0,
            "eval_reward_at_k/reward_model/head": 0.5,
        }
    )
    # Every batch of 4 (greedy) or 8 (sampled) rows is scored in parts of 2 rows (the update's
    # micro-batch width): the test set's 3 batches, then the head set's 1.
    assert scored_rows == [(4, 1, 2)] * 3 + [(8, 1, 4)] * 3 + [(4, 1, 2), (8, 1, 4)]
    assert replies.keys() == {"test", "head"}
    assert replies["test"][7]["reward"] == 8.0
    assert replies["test"][7]["rewards"] == {"digits": 7.0, "reward_model": 0.5}
