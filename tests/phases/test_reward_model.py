"""A learned reward model: loading a `*ForSequenceClassification` folder, its scores against
transformers' (PyTorch, CPU, fp32) on tiny random models, the conversation it reads, and the
trainer's reward with it end to end."""

import re

import jax
import numpy as np
import pytest
import torch
import transformers

from grpo import checkpoint_jobs, train
from grpo import metrics as metrics_lib
from grpo.data.prompts import as_token_ids
from grpo.models import loading
from grpo.phases import reward_model
from tests import hf_models
from tests.hf_models import PAD, save_classifier
from tests.tiny_experiment import tiny_experiment


@pytest.fixture(scope="module")
def tokenizer():
    return loading.load_tokenizer(loading.SMOLLM2_NAME)


def _right_padded(rows, width):
    tokens = np.full((len(rows), width), PAD, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], valid[i, : len(row)] = row, True
    return tokens, valid


# Three groups of two: the first parts after 4 shared tokens; the second scores a token of its
# shared part (its other row's rest is one pad id), with a pad id inside the text; the third is
# two equal rows (the split leaves each its last token, a pad id), scored at their last token
# that is not the pad id, as transformers scores, in the shared part.
ROWS = [
    [5, 17, 33, 2, 9, 41, 77, 3],
    [5, 17, 33, 2, 11, 4],
    [8, PAD, 19, 23, 61],
    [8, PAD, 19, PAD],
    [30, 12, 50, PAD],
    [30, 12, 50, PAD],
]


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("case", sorted(hf_models.CASES))
def test_scores_match_transformers(tmp_path, tokenizer, case, group):
    hf_model = save_classifier(tmp_path, tokenizer, case)
    config, read_params, _, pad_id = loading.open_reward_model(
        str(tmp_path), dtype="float32", param_dtype="float32"
    )
    assert pad_id == PAD and config.num_layers == 2
    if group > 1:  # each group's shared tokens run once
        rows = reward_model.split_at_shared_prefixes(ROWS, group, pad_id)
    else:
        rows = reward_model.padded(ROWS, pad_id)
    scores_fn = reward_model.make_scores_fn(config, pad_id, num_micro_batches=3, group=group)
    ours = np.asarray(scores_fn(jax.device_put(read_params()), *rows))
    tokens, valid = _right_padded(ROWS, 8)
    with torch.no_grad():
        reference = hf_model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid, dtype=torch.long),
        ).logits[:, 0]
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-4, atol=1e-4)
    assert np.ptp(ours[:4]) > 0.1  # the rows are told apart


def test_the_scored_token_is_the_last_that_is_not_the_pad_id():
    tokens, valid = _right_padded([[4, 5, 6], [4, PAD, PAD], [PAD], [7]], 4)
    np.testing.assert_array_equal(reward_model.last_scored_index(tokens, valid, PAD), [2, 0, 0, 0])
    np.testing.assert_array_equal(reward_model.last_scored_index(tokens, valid, None), [2, 2, 0, 0])


def test_only_a_one_label_sequence_classifier_is_a_reward_model(tmp_path, tokenizer):
    save_classifier(tmp_path / "two", tokenizer, num_labels=2)
    with pytest.raises(ValueError, match="a reward model scores with one label, this one has 2"):
        loading.open_reward_model(str(tmp_path / "two"))
    causal = tmp_path / "causal"
    transformers.AutoModelForCausalLM.from_config(hf_models.CASES["llama"](96)).save_pretrained(
        causal
    )
    with pytest.raises(ValueError, match=r"not a sequence classifier \(architectures=\['Llama"):
        loading.open_reward_model(str(causal))
    with pytest.raises(ValueError, match="a GGUF file holds no classifier head"):
        loading.open_reward_model(loading.SMOLLM2_NAME)


def test_the_conversation_is_the_policys_prompt_then_the_reply(tokenizer):
    ids = reward_model.encode_conversations(
        tokenizer,
        ["What is 2 + 3?"],
        ["It is 5."],
        system_prompt="Be brief.",
        question_template="Q: {question}",
    )
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: What is 2 + 3?"},
        {"role": "assistant", "content": "It is 5."},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids[0]) == expected
    assert expected.index("Be brief.") < expected.index("Q: What") < expected.index("It is 5.")
    plain = reward_model.encode_conversations(
        tokenizer, ["2 + 3 ="], [" 5"], system_prompt=None, chat_template=False
    )
    assert plain == [tokenizer.encode("2 + 3 = 5")]


def test_replies_pad_to_a_power_of_two_width():
    tokens, valid = reward_model.padded([[1] * 70, [2, 3]], pad_id=7)
    assert tokens.shape == (2, 128) and valid.sum(axis=1).tolist() == [70, 2]
    assert tokens[1, :3].tolist() == [2, 3, 7]
    assert reward_model.padded([[1]], pad_id=None)[0].shape == (1, 64)
    left, left_valid = reward_model.padded([[2, 3]], pad_id=7, left=True)
    assert left[0, -3:].tolist() == [7, 2, 3] and left_valid[0, -3:].tolist() == [0, 1, 1]


def test_groups_split_where_their_rows_part():
    prefix, prefix_valid, rest, rest_valid = reward_model.split_at_shared_prefixes(ROWS, 2, PAD)
    kept = lambda a, v: [row[m].tolist() for row, m in zip(a, v, strict=True)]
    assert kept(prefix, prefix_valid) == (
        [[5, 17, 33, 2]] * 2 + [[8, PAD, 19]] * 2 + [[30, 12, 50]] * 2
    )
    assert kept(rest, rest_valid) == [[9, 41, 77, 3], [11, 4], [23, 61], [PAD], [PAD], [PAD]]
    single = reward_model.split_at_shared_prefixes([[4, 5, 6]], 1, PAD)
    assert kept(*single[:2]) == [[4, 5]] and kept(*single[2:]) == [[6]]


@pytest.mark.parametrize(
    "bindings, message",
    [
        (["make_rewards.names=('reward_model',)", "make_rewards.weights=(1.0,)"], "set make_"),
        (["make_reward_model.source='x'"], "make_rewards.names has no 'reward_model'"),
        (["make_reward_model.dtype='float32'"], "make_reward_model.dtype needs"),
        (
            ["make_rewards.names=('reward_model/judge',)", "make_rewards.weights=(1.0,)"],
            "names 'judge', but gin binds no judge/make_reward_model.source",
        ),
        (
            [
                "make_rewards.names=('reward_model/judge',)",
                "make_rewards.weights=(1.0,)",
                "judge/make_reward_model.source='x'",
                "make_reward_model.source='y'",
            ],
            "make_reward_model.source is set, but make_rewards.names has no 'reward_model'",
        ),
        (["make_rewards.names=('reward_model/',)", "make_rewards.weights=(1.0,)"], "gin scope"),
    ],
)
def test_a_reward_model_and_its_reward_name_go_together(bindings, message):
    with pytest.raises(ValueError, match=message):
        tiny_experiment(*bindings, read_params=False)


def _transformers_scores(hf_model, folder, records):
    """transformers' scores of each record's question and reply as a conversation, tokenized
    by the reward model's own tokenizer as transformers loads it from its folder (a Qwen2
    config makes it Qwen2's pre-tokenizer over SmolLM2's vocabulary, which splits some text,
    runs of spaces, unlike the policy's)."""
    reward_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    scores = []
    for r in records:
        turns = [{"role": "user", "content": r["question"]}]
        turns.append({"role": "assistant", "content": r["completion"]})
        ids = torch.tensor([as_token_ids(reward_tokenizer.apply_chat_template(turns))])
        with torch.no_grad():
            scores.append(float(hf_model(input_ids=ids).logits[0, 0]))
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("shared_prompts_evals_and_a_judge", [False, True])
def test_the_trainer_rewards_replies_with_the_reward_model(
    tmp_path, tokenizer, monkeypatch, shared_prompts_evals_and_a_judge
):
    """Two steps scored by a reward model (the second case: and by another, of another family,
    in a gin scope; with shared prompts, and evals), its scores transformers' own."""
    shared_prompts_and_evals = shared_prompts_evals_and_a_judge
    folder, judge_folder = tmp_path / "rm", tmp_path / "judge"
    hf_model = save_classifier(folder, tokenizer, vocab=len(tokenizer))
    read = loading.params_from_hf_state_dict
    classifiers_read = []

    def recording_read(state, config, score_head=False):
        classifiers_read.append(score_head)
        return read(state, config, score_head)

    monkeypatch.setattr(loading, "params_from_hf_state_dict", recording_read)
    models = {"reward_model": (hf_model, folder)}
    bindings = [
        f"make_reward_model.source='{folder}'",
        "make_reward_model.dtype='float32'",  # a scoped one's too
        "TrainConfig.num_steps=2",
        f"TrainConfig.shared_prompt_forward={shared_prompts_and_evals}",
        f"TrainConfig.eval_every_steps={2 if shared_prompts_and_evals else 0}",
        f"TrainConfig.eval_rewards={shared_prompts_and_evals}",
        f"TrainConfig.write_eval_completions={shared_prompts_and_evals}",
    ]
    weights = {"reward_model": 0.5, "correctness": 1.0}
    if shared_prompts_and_evals:
        judge = save_classifier(judge_folder, tokenizer, "qwen3", vocab=len(tokenizer))
        models["reward_model/judge"] = (judge, judge_folder)
        weights["reward_model/judge"] = -0.25
        bindings.append(f"judge/make_reward_model.source='{judge_folder}'")
        bindings.append("TrainConfig.eval_samples=2")  # scored too
    bindings += [
        f"make_rewards.names={tuple(weights)}",
        f"make_rewards.weights={tuple(weights.values())}",
    ]
    exp = tiny_experiment(*bindings, read_params=False)  # as --dry_run builds it: the weights wait
    held = train.held_memory_line(exp)
    assert all(re.search(rf"{n.replace('_', ' ')} 0\.00[1-9]", held) for n in models), held
    assert classifiers_read == []
    workdir = tmp_path / "run"
    summary = train.train(tiny_experiment(*bindings, read_params=True), str(workdir))
    read_once = [True] * len(models)  # each read once, when placed
    assert summary["steps"] == 2 and classifiers_read == read_once
    rows = metrics_lib.read_metrics(workdir / "metrics.jsonl")
    assert all(np.isfinite(r[f"reward/{n}"]) for r in rows for n in models)
    records = metrics_lib.read_metrics(workdir / "completions.jsonl")
    assert len(records) == 8  # step 2's
    _assert_transformers_scores(records, models)
    for r in records:
        expected = sum(w * r["rewards"][n] for n, w in weights.items())
        np.testing.assert_allclose(r["reward"], expected, rtol=1e-5)
    assert rows[-1]["reward_mean"] == pytest.approx(np.mean([r["reward"] for r in records]))
    if not shared_prompts_and_evals:
        return
    # The eval scored its greedy replies alike; an eval-only job of the step-2 checkpoint
    # places the reward models itself and scores them again.
    replies = metrics_lib.read_metrics(workdir / metrics_lib.EVAL_COMPLETIONS_FILE)
    assert len(replies) == 8  # tiny.gin's eval examples
    _assert_transformers_scores(replies, models)
    evaluated = rows[-1]
    for name in models:
        ours = [r["rewards"][name] for r in replies]
        assert evaluated[f"eval_reward/{name}"] == pytest.approx(np.mean(ours), rel=1e-5)
    again = checkpoint_jobs.evaluate_workdir(
        tiny_experiment(*bindings, read_params=True), str(workdir)
    )
    assert classifiers_read == read_once * 2
    assert again == {"step": 2, **{k: evaluated[k] for k in again if k != "step"}}
    expected_keys = {"eval_reward_mean", *(f"eval_reward/{n}" for n in weights)}
    expected_keys |= {"eval_reward_mean_at_k", *(f"eval_reward_at_k/{n}" for n in weights)}
    assert expected_keys <= again.keys()


def _assert_transformers_scores(records, models):
    """Each record's reward by each of `models` (name -> (transformers model, folder)) is
    transformers' score of its conversation."""
    for name, (hf_model, folder) in models.items():
        ours = [r["rewards"][name] for r in records]
        reference = _transformers_scores(hf_model, folder, records)
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4, err_msg=name)
