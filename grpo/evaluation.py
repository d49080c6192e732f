"""The eval: greedy replies to each test set (and optionally k sampled ones), checked against the
reference answers. Every process samples its share of each batch; all get every result."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from grpo import gather, sampling, sharding
from grpo.experiment import Experiment, TrainConfig
from grpo.phases import reward as reward_phase
from grpo.phases.rollout import SamplingConfig

# Called with an eval set's name ("test": the main one) and a record per greedy reply.
OnReplies = Callable[[str, list[dict]], None]


def evaluate(exp: Experiment, params: Any, on_replies: OnReplies | None = None) -> dict[str, float]:
    """Greedy pass@1 accuracy on the test examples (`eval_accuracy`) and the greedy replies'
    mean length and truncation rate; with `eval_samples` = k > 0 also k replies per example at
    the training sampler's settings (at `eval_temperature`, if set): the mean accuracy over
    them (`eval_mean_at_k`), the fraction of examples with a right one (`eval_pass_at_k`) and
    of examples whose majority answer is right (`eval_maj_at_k`), and for each k of
    `eval_pass_at` the unbiased pass@k estimate from those replies (`eval_pass_at_<k>`, see
    `pass_at`). Each extra eval set adds the
    same as `<metric>/<name>`. `on_replies` gets the greedy replies of each set (question,
    reference answer, completion, correct, length, truncated).
    """
    metrics = _evaluate_examples(exp, params, exp.test_examples, "test", on_replies)
    for name, examples in exp.extra_eval_sets.items():
        scored = _evaluate_examples(exp, params, examples, name, on_replies)
        metrics.update({f"{metric}/{name}": value for metric, value in scored.items()})
    return metrics


def prompts_per_batch(exp: Experiment) -> int:
    """Prompts per eval rollout: `eval_prompts_per_batch`, rounded down to a multiple of the
    batch axes' devices (one per device at least)."""
    divisor = sharding.batch_divisor(exp.mesh)
    return max(divisor, exp.train.eval_prompts_per_batch // divisor * divisor)


def rollout_rows(exp: Experiment) -> int:
    """The most rows an eval rollout samples at once (its sampled pass: `eval_samples` each)."""
    return prompts_per_batch(exp) * max(1, exp.train.eval_samples)


def _evaluate_examples(
    exp: Experiment,
    params: Any,
    examples: Sequence[dict],
    name: str,
    on_replies: OnReplies | None,
) -> dict[str, float]:
    examples = examples[: exp.train.eval_examples]
    fraction = lambda x: float(x.mean()) if x.size else 0.0
    # Evals train nothing: no kept sampling masks to record.
    eval_sampler = dataclasses.replace(exp.sampling, keep_sampling_mask=False)
    greedy_sampler = dataclasses.replace(
        eval_sampler, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0
    )
    greedy = _eval_replies(
        exp,
        params,
        examples,
        greedy_sampler,
        1,
        keep_texts=on_replies is not None,
        score=exp.train.eval_rewards,
    )
    metrics = {
        "eval_accuracy": fraction(greedy.correct),
        "eval_length_mean": fraction(greedy.lengths),
        "eval_truncation_rate": fraction(greedy.truncated),
    }
    if exp.train.eval_rewards:
        metrics |= _reward_metrics(exp, greedy.rewards, "")
    if on_replies is not None:
        on_replies(name, _reply_records(examples, greedy))
    if exp.train.eval_samples:
        sampler = eval_sampler
        if exp.train.eval_temperature is not None:
            sampler = dataclasses.replace(sampler, temperature=exp.train.eval_temperature)
        sampled = _eval_replies(
            exp,
            params,
            examples,
            sampler,
            exp.train.eval_samples,
            keep_votes=True,
            score=exp.train.eval_rewards,
        )
        metrics["eval_mean_at_k"] = fraction(sampled.correct)
        metrics["eval_pass_at_k"] = fraction(sampled.correct.any(axis=1))
        metrics["eval_maj_at_k"] = fraction(_majority_correct(sampled))
        for k in exp.train.eval_pass_at:
            metrics[f"eval_pass_at_{k}"] = fraction(pass_at(sampled.correct, k))
        if exp.train.eval_rewards:
            metrics |= _reward_metrics(exp, sampled.rewards, "_at_k")
    return metrics


def _reward_metrics(exp: Experiment, rewards: dict[str, np.ndarray], suffix: str) -> dict:
    """The mean reward total as eval_reward_mean<suffix>, and each function's as
    eval_reward<suffix>/<name> (0 for a set without replies, as the other fractions)."""
    mean = lambda name: float(np.mean(rewards[name])) if len(rewards.get(name, ())) else 0.0
    metrics = {f"eval_reward_mean{suffix}": mean("total")}
    for name in exp.rewards.names:
        metrics[f"eval_reward{suffix}/{name}"] = mean(name)
    return metrics


def pass_at(correct_ExN: np.ndarray, k: int) -> np.ndarray:
    """Each example's unbiased pass@k estimate from its n replies, c of them right (Chen et al.,
    2021): the chance that k of them drawn without replacement hold a right one, 1 - C(n - c, k)
    / C(n, k). pass@1 is c / n; pass@n is whether any is right."""
    n = correct_ExN.shape[1]
    right = correct_ExN.sum(axis=1)
    return np.array([1.0 - math.comb(n - int(c), k) / math.comb(n, k) for c in right])


def _majority_correct(replies: _Replies) -> np.ndarray:
    """bool [examples]: whether the answer most of an example's replies give (ties: the one
    given first) is right; an example whose replies give no answer counts as wrong."""
    samples = replies.correct.shape[1]
    verdicts = []
    for i, right in enumerate(replies.correct):
        votes = replies.votes[i * samples : (i + 1) * samples]
        counts = collections.Counter(v for v in votes if v is not None)
        if not counts:
            verdicts.append(False)
            continue
        most = max(counts.values())
        winner = next(j for j, v in enumerate(votes) if v is not None and counts[v] == most)
        verdicts.append(bool(right[winner]))
    return np.array(verdicts, bool)


def _reply_records(examples: Sequence[dict], greedy: _Replies) -> list[dict]:
    return [
        {
            "question": example["question"],
            "answer": reward_phase.extract_reference_answer(example["answer"]),
            "completion": text,
            "correct": bool(greedy.correct[i, 0]),
            "length": int(greedy.lengths[i, 0]),
            "truncated": bool(greedy.truncated[i, 0]),
            **_reward_fields(greedy.rewards, i),
        }
        for i, (example, text) in enumerate(zip(examples, greedy.texts, strict=True))
    ]


def _reward_fields(rewards: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Example i's reward and rewards by function, as completions.jsonl has them (none unless
    the eval scored its replies)."""
    if not rewards:
        return {}
    by_name = {name: float(values[i, 0]) for name, values in rewards.items() if name != "total"}
    return {"reward": float(rewards["total"][i, 0]), "rewards": by_name}


def check_answers(cfg: TrainConfig, texts: list[str], examples: list[dict]) -> np.ndarray:
    """bool: whether each reply answers its example right, by the run's answer rule (each check
    under the reward time limit; a failed one is wrong)."""
    return reward_phase.check_answers(
        texts,
        examples,
        match=cfg.answer_match,
        last_number_fallback=cfg.answer_last_number_fallback,
        timeout_s=cfg.reward_timeout_s,
    )


@dataclasses.dataclass
class _Replies:
    """Every process's replies to some test examples, `samples` each, in example order."""

    correct: np.ndarray  # bool [examples, samples]
    lengths: np.ndarray  # int [examples, samples]: completion tokens
    truncated: np.ndarray  # bool [examples, samples]: no end token within the budget
    texts: list[str]  # examples x samples, when asked for; else empty
    votes: list[str | None]  # each reply's `reward.answer_key`, when asked for; else empty
    # float [examples, samples] by reward name and "total" (their weighted sum), when asked for
    rewards: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _eval_replies(
    exp: Experiment,
    params: Any,
    test_examples: Sequence[dict],
    sampler: SamplingConfig,
    samples: int,
    *,
    keep_texts: bool = False,
    keep_votes: bool = False,
    score: bool = False,
) -> _Replies:
    """Samples `samples` replies to each of `test_examples` and checks them (and with `score`
    rewards them as training does, reward models included, without the length shaping).

    Every batch keeps one compiled shape (the last is padded with copies of its last example);
    each process samples its share of a batch and the results are gathered onto every process.
    """
    cfg = exp.train
    examples = list(test_examples)
    procs, index = jax.process_count(), jax.process_index()
    per_batch = prompts_per_batch(exp)
    columns: list[list[np.ndarray]] = [[], [], []]
    texts: list[str] = []
    votes: list[str | None] = []
    rewards: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    fallback = cfg.answer_last_number_fallback
    for start in range(0, len(examples), per_batch):
        chunk = examples[start : start + per_batch]
        padded = chunk + [chunk[-1]] * (per_batch - len(chunk))
        mine = padded[index * per_batch // procs : (index + 1) * per_batch // procs]
        key = jax.random.fold_in(jax.random.key(0), start)  # the same draws at every eval
        rollout, local_texts, *_ = sampling.sample(exp, params, mine, key, sampler, samples)
        local_examples = [e for e in mine for _ in range(samples)]
        correct = check_answers(cfg, local_texts, local_examples)
        rows = len(chunk) * samples  # the padding's replies are dropped
        if score:
            scored = _rewards(exp, local_texts, local_examples, per_batch * samples)
            for name, values in scored.items():
                rewards[name].append(gather.all_rows(values)[:rows].reshape(len(chunk), samples))
        for column, values in zip(
            columns, (correct, rollout.lengths_B, rollout.truncated_B), strict=True
        ):
            column.append(gather.all_rows(values)[:rows].reshape(len(chunk), samples))
        if keep_texts:
            texts += gather.all_json(local_texts)[:rows]
        if keep_votes:  # each process reads its own replies' answers
            keys = [reward_phase.answer_key(t, last_number_fallback=fallback) for t in local_texts]
            votes += gather.all_json(keys)[:rows]
    empty = np.zeros((0, samples))
    correct, lengths, truncated = (np.concatenate(c) if c else empty for c in columns)
    return _Replies(
        correct.astype(bool),
        lengths.astype(int),
        truncated.astype(bool),
        texts,
        votes,
        {name: np.concatenate(values) for name, values in rewards.items()},
    )


def _rewards(
    exp: Experiment, texts: list[str], examples: list[dict], global_rows: int
) -> dict[str, np.ndarray]:
    """This process's replies' rewards by function and their weighted "total" (the reward
    model's forward in parts no wider than the update's micro-batches)."""
    cfg = exp.train
    scored = sampling.reward_model_scores(
        exp, examples, texts, group=1, num_micro_batches=reward_model_parts(exp, global_rows)
    )
    result = reward_phase.score(
        texts, examples, rewards=exp.rewards, timeout_s=cfg.reward_timeout_s, scored=scored
    )
    return {**result.per_function, "total": result.total}


def reward_model_parts(exp: Experiment, rows: int) -> int:
    """The fewest parts that split `rows` (a multiple of the batch axes' devices) into parts of
    as many devices' rows, each no wider than an update's micro-batch."""
    cfg, divisor = exp.train, sharding.batch_divisor(exp.mesh)
    widest = max(divisor, cfg.completions_per_update // cfg.num_micro_batches)
    return next(p for p in range(1, rows + 1) if rows % (p * divisor) == 0 and rows // p <= widest)
