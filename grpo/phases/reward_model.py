"""A learned reward model among the reward functions, as TRL's GRPOTrainer takes one: a Hugging
Face `*ForSequenceClassification` checkpoint with one label (`loading.open_reward_model`) scores
each reply to its prompt, on the mesh beside the policy.

The conversation the policy saw (its system and user turns) with the reply as the assistant's
turn is rendered by the reward model's own chat template and tokenizer (`encode_conversations`),
right-padded to a power-of-two width, and run through the policy's decoder
(`transformer.forward`); the score is the head applied to the final hidden state of the last
token that is not the pad id, transformers' rule, so a reward model scores here as it was trained
to. Its weights are frozen, held in `RewardModel.config.param_dtype`, and never checkpointed (a
resumed run reloads them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo import gather, sharding
from grpo.data.prompts import QUESTION, as_token_ids, build_messages, plain_prompt
from grpo.models import transformer
from grpo.models.config import ModelConfig
from grpo.models.loading import SCORE_HEAD
from grpo.phases.update import merge_rows, split_rows

_MIN_WIDTH = 64  # narrower batches pad up to it: one compile for short replies


@dataclasses.dataclass
class RewardModel:
    source: str  # the folder or hub id, for messages
    config: ModelConfig
    read_params: Callable[[], Any]  # host arrays: the decoder's and params[SCORE_HEAD]
    tokenizer: Any
    pad_id: int | None  # config.json's pad_token_id: the score skips trailing ones


def logical_axes(config: ModelConfig) -> Any:
    return {**transformer.logical_axes(config), SCORE_HEAD: ("embed", None)}


def param_shapes(config: ModelConfig) -> Any:
    return {**transformer.param_shapes(config), SCORE_HEAD: (config.hidden_size, 1)}


def last_scored_index(tokens_BxT: jax.Array, valid_BxT: jax.Array, pad_id: int | None) -> jax.Array:
    """Each row's last valid slot whose token is not `pad_id` (0 if none), as transformers'
    `*ForSequenceClassification` picks the token it scores."""
    scored_BxT = valid_BxT if pad_id is None else valid_BxT & (tokens_BxT != pad_id)
    slots_T = jnp.arange(tokens_BxT.shape[1])
    return jnp.max(jnp.where(scored_BxT, slots_T, 0), axis=1)


def scores(
    params: Any,
    tokens_BxT: jax.Array,
    valid_BxT: jax.Array,
    *,
    config: ModelConfig,
    pad_id: int | None,
) -> jax.Array:
    """Each row's reward (fp32): the head on the final hidden state at `last_scored_index`.
    Rows hold their tokens first (right padding)."""
    positions_BxT = transformer.positions_from_mask(valid_BxT)
    hidden_BxTxD, _ = transformer.forward(
        params, tokens_BxT, positions_BxT, valid_BxT, config=config
    )
    last_B = last_scored_index(tokens_BxT, valid_BxT, pad_id)
    hidden_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
    head_Dx1 = params[SCORE_HEAD].astype(hidden_BxD.dtype)
    return transformer.einsum_f32_out("bd,dl->bl", hidden_BxD, head_Dx1)[:, 0]


def make_scores_fn(
    config: ModelConfig, pad_id: int | None, num_micro_batches: int
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """A jitted `fn(params, tokens_BxT, valid_BxT) -> scores_B`, run in `num_micro_batches`
    sequential parts of B/M rows (the update's micro-batch rows: activation memory the run is
    already sized for)."""

    @jax.jit
    def fn(params: Any, tokens_BxT: jax.Array, valid_BxT: jax.Array) -> jax.Array:
        score = functools.partial(scores, params, config=config, pad_id=pad_id)
        parts = split_rows((tokens_BxT, valid_BxT), num_micro_batches)
        return merge_rows(jax.lax.map(lambda part: score(*part), parts))

    return fn


def encode_conversations(
    tokenizer: Any,
    questions: Sequence[str],
    replies: Sequence[str],
    *,
    system_prompt: str | None,
    question_template: str = QUESTION,
    chat_template: bool = True,
) -> list[list[int]]:
    """The reward model's token ids of each question and reply: with a chat template (and a run
    that prompts through one) the policy's system and user turns and the reply as the
    assistant's turn; otherwise the policy's plain-text prompt followed by the reply."""
    users = [question_template.replace(QUESTION, q) for q in questions]
    if chat_template and getattr(tokenizer, "chat_template", None):
        return [
            as_token_ids(
                tokenizer.apply_chat_template(
                    build_messages(user, system_prompt) + [{"role": "assistant", "content": reply}],
                    tokenize=True,
                )
            )
            for user, reply in zip(users, replies, strict=True)
        ]
    prompts = [plain_prompt(u, system_prompt) if chat_template else u for u in users]
    return [as_token_ids(tokenizer.encode(p + r)) for p, r in zip(prompts, replies, strict=True)]


def padded(ids: Sequence[Sequence[int]], pad_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (tokens, valid) at a power-of-two width (`_MIN_WIDTH` at least) that every
    process agrees on: each holds its own rows."""
    longest = int(gather.all_rows(np.array([max(len(row) for row in ids)])).max())
    width = max(_MIN_WIDTH, 1 << (longest - 1).bit_length())
    tokens = np.full((len(ids), width), pad_id or 0, np.int32)
    valid = np.zeros((len(ids), width), bool)
    for i, row in enumerate(ids):
        tokens[i, : len(row)], valid[i, : len(row)] = row, True
    return tokens, valid


def score_replies(
    model: RewardModel,
    params: Any,
    fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
    mesh: Mesh,
    examples: Sequence[Mapping[str, Any]],
    replies: Sequence[str],
    **prompt: Any,
) -> np.ndarray:
    """This process's rows' rewards (float32): `examples[i]['question']` and `replies[i]`,
    encoded as `encode_conversations` does with the run's `prompt` settings, scored by `fn`
    (`make_scores_fn`) on the mesh. Every process calls it together, with its own rows."""
    ids = encode_conversations(
        model.tokenizer, [e["question"] for e in examples], replies, **prompt
    )
    tokens, valid = sharding.shard_batch(mesh, padded(ids, model.pad_id))
    return gather.local_rows(fn(params, tokens, valid)).astype(np.float32)
