"""Host glue around the rollout phase: examples -> chat-template prompts -> tokens on the mesh
-> `generate` -> decoded replies, with the tools' rounds when the run has tools (grpo.tools),
and the replies' reward-model scores. Shared by the training step and the eval."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from grpo import gather, sharding
from grpo.data.prompts import encode_prompts
from grpo.experiment import Experiment, TrainConfig
from grpo.phases import reward_model
from grpo.phases.rollout import (
    NOT_KEPT,
    SamplingConfig,
    generate,
    generate_in_rounds,
    pad_prompts,
)
from grpo.tools import ToolCall, ToolConfig
from grpo.types import Rollout


def encode_questions(
    cfg: TrainConfig, tokenizer: Any, examples: Sequence[dict], tools: ToolConfig | None
) -> list[list[int]]:
    """The prompt token ids of each example's question, as the run's prompt settings say (and
    the tools' schemas, where the call format puts them in the prompt)."""
    return encode_prompts(
        tokenizer,
        [e["question"] for e in examples],
        system_prompt=cfg.system_prompt,
        template_kwargs=cfg.chat_template_kwargs,
        question_template=cfg.question_template,
        chat_template=cfg.use_chat_template,
        tools=tools.prompt_tools if tools is not None else None,
    )


def prompts_for(
    exp: Experiment, examples: Sequence[dict], repeat: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenised, left-padded prompts, each repeated `repeat` times; bucket agreed by processes."""
    encoded = encode_questions(exp.train, exp.tokenizer, examples, exp.tools)
    ids = [p for p in encoded for _ in range(repeat)]
    longest = int(gather.all_rows(np.array([max(len(p) for p in ids)])).max())
    fits = [b for b in exp.train.prompt_buckets if b >= longest]
    if not fits:  # build_experiment drops the examples whose prompt is longer
        raise ValueError(f"a prompt of {longest} tokens exceeds every prompt bucket")
    return pad_prompts(ids, pad_id=exp.sampling.pad_id, buckets=fits[:1])


def decode(exp: Experiment, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Each row's tokens where `mask` holds, as text (special tokens dropped)."""
    return [
        exp.tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
        for row, m in zip(tokens, mask, strict=True)
    ]


def reward_model_scores(
    exp: Experiment,
    examples: Sequence[dict],
    replies: Sequence[str],
    *,
    group: int,
    num_micro_batches: int,
) -> dict[str, np.ndarray]:
    """{name: this process's rows' scores} for each of the run's reward models, each reply read
    after its prompt as the run renders it, in `num_micro_batches` parts, each group of `group`
    rows sharing its prefix (`reward_model.score_replies`; the weights placed by
    `train.place_reward_models`). Every process calls it together."""
    cfg = exp.train
    return {
        name: reward_model.score_replies(
            scorer,
            exp.mesh,
            examples,
            replies,
            num_micro_batches=num_micro_batches,
            group=group,
            system_prompt=cfg.system_prompt,
            question_template=cfg.question_template,
            chat_template=cfg.use_chat_template,
        )
        for name, scorer in exp.reward_models.items()
    }


class Sampled(NamedTuple):
    rollout: Rollout  # global
    texts: list[str]  # this process's replies
    # int32, this process's rows: the tool calls each reply made, those that failed (None
    # without tools)
    tool_calls: np.ndarray | None = None
    tool_errors: np.ndarray | None = None


def sample(
    exp: Experiment,
    params: Any,
    examples: Sequence[dict],
    key: jax.Array,
    sampler: SamplingConfig,
    samples: int,
) -> Sampled:
    """Rollout of `samples` completions per example under `sampler` (rows group-contiguous),
    the completions going on through tool calls when the run has tools (`_tool_rounds`).

    Each prompt is prefilled once and its cache shared by its samples when the global prompt
    count divides over the batch axes; otherwise the prompts are repeated here, one row each.
    """
    prefill_once = len(examples) * jax.process_count() % sharding.batch_divisor(exp.mesh) == 0
    repeat = 1 if prefill_once else samples
    tokens, mask = prompts_for(exp, examples, repeat)
    prompts = sharding.shard_batch(exp.mesh, (tokens, mask))
    if exp.tools is not None:
        return _tool_rounds(exp, params, prompts, key, sampler, samples // repeat)
    rollout = generate(
        params,
        *prompts,
        key,
        model=exp.model,
        sampling=sampler,
        num_samples=samples // repeat,
        mesh=exp.mesh,
    )
    texts = decode(
        exp,
        gather.local_rows(rollout.completion_tokens_BxC),
        gather.local_rows(rollout.completion_mask_BxC),
    )
    return Sampled(rollout, texts)


@dataclasses.dataclass
class _Reply:
    """One completion written over tool rounds (host side)."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    logps: list[float] = dataclasses.field(default_factory=list)
    by_tool: list[bool] = dataclasses.field(default_factory=list)
    # each sampled token's kept ids (keep_sampling_mask); a tool's tokens: None (none kept)
    kept: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    asked: list[ToolCall] = dataclasses.field(default_factory=list)  # for the next round to answer
    calls: int = 0
    errors: int = 0
    truncated: bool = False

    def extend(
        self,
        tokens: Sequence[int],
        logps: Sequence[float],
        by_tool: bool,
        kept: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.tokens += list(tokens)
        self.logps += list(logps)
        self.by_tool += [by_tool] * len(tokens)
        self.kept += [None] * len(tokens) if kept is None else list(kept)


def _tool_rounds(
    exp: Experiment,
    params: Any,
    prompts: tuple[jax.Array, jax.Array],
    key: jax.Array,
    sampler: SamplingConfig,
    num_samples: int,
) -> Sampled:
    """Samples the replies, runs the calls they make, appends the results, samples on from
    there, and so on until no reply calls a tool (each at most `max_calls` times).

    Every round after the first reads each reply's keys and values from the round before
    (`generate_in_rounds`' context) and computes only those of its last token and its result,
    left-padded to one width (a power of two, `_MIN_RESULT_WIDTH` at least: a compile per
    width); it samples only the replies with a call answered and budget left (`budget_B`: the
    others sample nothing). The budget `max_new_tokens` counts the model's and the tools'
    tokens together; a result that does not fit is cut, and the reply truncated there."""
    tools, budget = exp.tools, sampler.max_new_tokens
    run = functools.partial(generate_in_rounds, model=exp.model, sampling=sampler, mesh=exp.mesh)
    latest, context = run(params, *prompts, key, num_samples=num_samples)
    prompt_tokens = gather.local_rows(latest.prompt_tokens_BxP)
    prompt_mask = gather.local_rows(latest.prompt_mask_BxP)
    replies = [_Reply() for _ in prompt_tokens]
    # Keys of their own: fold_in(key, i) is dynamic sampling's i-th round (train._dynamic_sampling).
    rounds_key = jax.random.split(key)[1]
    for round_index in range(tools.max_calls + 1):
        _take_round(exp, replies, latest)
        results = _answer_calls(exp, replies, budget)
        if round_index == tools.max_calls or not gather.summed(len(results)):
            break
        appended = [results.get(i, [sampler.pad_id]) for i in range(len(replies))]
        room = np.array(
            [budget - len(reply.tokens) if i in results else 0 for i, reply in enumerate(replies)],
            np.int32,
        )
        window = pad_prompts(
            appended,
            pad_id=sampler.pad_id,
            buckets=[gather.agreed_width(appended, _MIN_RESULT_WIDTH)],
        )
        latest, context = run(
            params,
            *sharding.shard_batch(exp.mesh, window),
            jax.random.fold_in(rounds_key, round_index),
            num_samples=1,
            budget_B=sharding.shard_batch(exp.mesh, room),
            context=context,
        )
    return _assembled(exp, (prompt_tokens, prompt_mask), replies, sampler)


_MIN_RESULT_WIDTH = 16


def _take_round(exp: Experiment, replies: list[_Reply], rollout: Rollout) -> None:
    """Appends each reply's tokens from a round (replies not sampled in it got none) and notes
    the calls the round made, if it may make that many more."""
    tokens, lengths, logps, truncated = (
        gather.local_rows(x)
        for x in (
            rollout.completion_tokens_BxC,
            rollout.lengths_B,
            rollout.logps_BxC,
            rollout.truncated_B,
        )
    )
    kept = rollout.kept_ids_BxCxK
    kept = [None] * len(replies) if kept is None else gather.local_rows(kept)
    for reply, row, length, row_logps, cut, row_kept in zip(
        replies, tokens, lengths, logps, truncated, kept, strict=True
    ):
        if not length:
            continue
        row_kept = None if row_kept is None else row_kept[:length]
        reply.extend(row[:length].tolist(), row_logps[:length].tolist(), False, row_kept)
        calls = [] if cut else _calls_made(exp, row[:length].tolist())
        reply.asked = calls if reply.calls + len(calls) <= exp.tools.max_calls else []
        reply.truncated = bool(cut)


def _calls_made(exp: Experiment, round_tokens: list[int]) -> list[ToolCall]:
    """The calls of a round the sampler ended (not cut at the budget): `tags`, the call whose
    closing tag stopped it; `hermes`, those of the assistant's turn, if an end token ended it
    (a user's stop string ends the completion, calls or not)."""
    if exp.tools.call_format == "hermes" and round_tokens[-1] not in exp.sampling.end_ids:
        return []
    text = exp.tokenizer.decode(round_tokens, skip_special_tokens=True)
    return exp.tools.find_calls(text)


def _answer_calls(exp: Experiment, replies: list[_Reply], budget: int) -> dict[int, list[int]]:
    """Runs the pending calls and appends their results (cut to the budget); returns, for the
    replies that go on sampling, what the next round reads after their context: the reply's
    last sampled token (not in its context yet), then the result."""
    asked = [i for i, reply in enumerate(replies) if reply.asked]
    outcomes = iter(exp.tools.run([call for i in asked for call in replies[i].asked]))
    going = {}
    for i in asked:
        reply = replies[i]
        results = [next(outcomes) for _ in reply.asked]
        reply.asked, reply.calls = [], reply.calls + len(results)
        reply.errors += sum(failed for _, failed in results)
        answer = exp.tools.answer([output for output, _ in results])
        result = exp.tokenizer.encode(answer, add_special_tokens=False)
        room, last = budget - len(reply.tokens), reply.tokens[-1]
        reply.extend(result[:room], [0.0] * min(len(result), room), by_tool=True)
        if len(result) < room:
            going[i] = [last, *result]
        else:
            reply.truncated = True
    return going


def _assembled(
    exp: Experiment,
    prompts: tuple[np.ndarray, np.ndarray],
    replies: list[_Reply],
    sampler: SamplingConfig,
) -> Sampled:
    """The replies as a global Rollout under their (local, left-padded) prompts and masks,
    right-padded to the budget."""
    rows, budget = len(replies), sampler.max_new_tokens
    tokens = np.full((rows, budget), sampler.pad_id, np.int32)
    logps = np.zeros((rows, budget), np.float32)
    by_tool = np.zeros((rows, budget), bool)
    kept = np.full((rows, budget, sampler.kept_ids_per_token), NOT_KEPT, np.int32)
    for row, reply in enumerate(replies):
        n = len(reply.tokens)
        tokens[row, :n], logps[row, :n], by_tool[row, :n] = reply.tokens, reply.logps, reply.by_tool
        sampled = [slot for slot, ids in enumerate(reply.kept) if ids is not None]
        if sampled and kept.shape[2]:  # the model's tokens' kept ids; a tool's keep none
            kept[row, sampled] = np.stack([reply.kept[slot] for slot in sampled])
    lengths = np.array([len(reply.tokens) for reply in replies], np.int32)
    local = Rollout(
        prompt_tokens_BxP=prompts[0],
        prompt_mask_BxP=prompts[1],
        completion_tokens_BxC=tokens,
        completion_mask_BxC=np.arange(budget)[None, :] < lengths[:, None],
        logps_BxC=logps,
        lengths_B=lengths,
        truncated_B=np.array([reply.truncated for reply in replies]),
        tool_mask_BxC=by_tool,
        kept_ids_BxCxK=kept if kept.shape[2] else None,
    )
    texts = [exp.tokenizer.decode(r.tokens, skip_special_tokens=True) for r in replies]
    calls = np.array([reply.calls for reply in replies], np.int32)
    errors = np.array([reply.errors for reply in replies], np.int32)
    return Sampled(sharding.shard_batch(exp.mesh, local), texts, calls, errors)
