"""A learned reward model among the reward functions, as TRL's GRPOTrainer takes one: a Hugging
Face `*ForSequenceClassification` checkpoint with one label (`loading.open_reward_model`) scores
each reply to its prompt, on the mesh beside the policy.

The conversation the policy saw (its system and user turns) with the reply as the assistant's
turn is rendered by the reward model's own chat template and tokenizer (`encode_conversations`),
padded to a power-of-two width, and run through the policy's decoder (`transformer.forward`; or
each group's shared prefix once, `scores_shared_prefixes`); the score is the head applied to the
final hidden state of the last token that is not the pad id, transformers' rule, so a reward
model scores here as it was trained to. Its weights are frozen, held in
`RewardModel.config.param_dtype`, and never checkpointed (a resumed run reloads them).
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
    params: Any = None  # on the mesh, once a job that scores has placed them
    _fns: dict[tuple[int, int], Callable[..., jax.Array]] = dataclasses.field(
        default_factory=dict, repr=False
    )

    def scores_fn(self, num_micro_batches: int, group: int = 1) -> Callable[..., jax.Array]:
        """`make_scores_fn`'s, built once per shape of the work (a compile each)."""
        key = (num_micro_batches, group)
        if key not in self._fns:
            self._fns[key] = make_scores_fn(self.config, self.pad_id, *key)
        return self._fns[key]


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
    """Each row's reward (fp32): the head on the final hidden state at `last_scored_index`."""
    positions_BxT = transformer.positions_from_mask(valid_BxT)
    hidden_BxTxD, _ = transformer.forward(
        params, tokens_BxT, positions_BxT, valid_BxT, config=config
    )
    last_B = last_scored_index(tokens_BxT, valid_BxT, pad_id)
    return _head(params, jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0])


def scores_shared_prefixes(
    params: Any,
    prefix_BxP: jax.Array,
    prefix_valid_BxP: jax.Array,
    rest_BxC: jax.Array,
    rest_valid_BxC: jax.Array,
    *,
    config: ModelConfig,
    pad_id: int | None,
    group: int,
) -> jax.Array:
    """`scores` of the rows prefix + rest, where each group of `group` consecutive rows shares
    its (left-padded) prefix, which then runs once for the group
    (`transformer.forward_shared_prompts`); the same scores up to float rounding."""
    every = slice(None, None, group)  # the group's first row holds its prefix
    hidden_NxPxD, hidden_BxCxD = transformer.forward_shared_prompts(
        params,
        prefix_BxP[every],
        prefix_valid_BxP[every],
        rest_BxC,
        rest_valid_BxC,
        config=config,
        group=group,
    )
    tokens_BxT = jnp.concatenate([prefix_BxP, rest_BxC], axis=1)
    valid_BxT = jnp.concatenate([prefix_valid_BxP, rest_valid_BxC], axis=1)
    last_B, p = last_scored_index(tokens_BxT, valid_BxT, pad_id), prefix_BxP.shape[1]
    rows_B = jnp.arange(last_B.shape[0])
    in_rest_BxD = hidden_BxCxD[rows_B, jnp.maximum(last_B - p, 0)]
    in_prefix_BxD = hidden_NxPxD[rows_B // group, jnp.minimum(last_B, p - 1)]
    return _head(params, jnp.where((last_B >= p)[:, None], in_rest_BxD, in_prefix_BxD))


def _head(params: Any, hidden_BxD: jax.Array) -> jax.Array:
    head_Dx1 = params[SCORE_HEAD].astype(hidden_BxD.dtype)
    return transformer.einsum_f32_out("bd,dl->bl", hidden_BxD, head_Dx1)[:, 0]


def make_scores_fn(
    config: ModelConfig, pad_id: int | None, num_micro_batches: int, group: int = 1
) -> Callable[..., jax.Array]:
    """A jitted `fn(params, *rows) -> scores_B`, run in `num_micro_batches` sequential parts of
    B/M rows (the update's micro-batch rows: activation memory the run is already sized for).
    `rows`: `padded`'s (tokens, valid), or with `group` > 1 (whole groups in each part)
    `split_at_shared_prefixes`' (prefix, prefix valid, rest, rest valid)."""
    if group > 1:
        score = functools.partial(scores_shared_prefixes, config=config, pad_id=pad_id, group=group)
    else:
        score = functools.partial(scores, config=config, pad_id=pad_id)

    @jax.jit
    def fn(params: Any, *rows: jax.Array) -> jax.Array:
        parts = split_rows(rows, num_micro_batches, group)
        return merge_rows(jax.lax.map(lambda part: score(params, *part), parts), group)

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


def padded(
    ids: Sequence[Sequence[int]], pad_id: int | None, *, left: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, valid), right-padded (or `left`) at a width every process agrees on
    (`gather.agreed_width`): each holds its own rows."""
    width = gather.agreed_width(ids, _MIN_WIDTH)
    tokens = np.full((len(ids), width), pad_id or 0, np.int32)
    valid = np.zeros((len(ids), width), bool)
    for i, row in enumerate(ids):
        slots = slice(width - len(row), width) if left else slice(0, len(row))
        tokens[i, slots], valid[i, slots] = row, True
    return tokens, valid


def split_at_shared_prefixes(
    ids: Sequence[Sequence[int]], group: int, pad_id: int | None
) -> tuple[np.ndarray, ...]:
    """Each group of `group` consecutive rows split where its rows part: (prefix, prefix valid)
    left-padded and (rest, rest valid) right-padded, as `scores_shared_prefixes` takes them.
    A prefix holds one token at least, and leaves each row one at least where it has two."""
    prefixes, rests = [], []
    for start in range(0, len(ids), group):
        rows = [list(row) for row in ids[start : start + group]]
        shortest = min(len(row) for row in rows)
        shared = next(
            (i for i in range(shortest) if any(row[i] != rows[0][i] for row in rows)), shortest
        )
        cut = max(1, min(shared, shortest - 1))
        prefixes += [rows[0][:cut]] * group
        rests += [row[cut:] for row in rows]
    return (*padded(prefixes, pad_id, left=True), *padded(rests, pad_id))


def score_replies(
    model: RewardModel,
    mesh: Mesh,
    examples: Sequence[Mapping[str, Any]],
    replies: Sequence[str],
    *,
    num_micro_batches: int,
    group: int = 1,
    **prompt: Any,
) -> np.ndarray:
    """This process's rows' rewards (float32): `examples[i]['question']` and `replies[i]`,
    encoded as `encode_conversations` does with the run's `prompt` settings, scored on the mesh
    by the placed `model.params` in `num_micro_batches` parts, each group of `group` rows sharing
    its prefix. Every process calls it together, with its own rows (whole groups)."""
    ids = encode_conversations(
        model.tokenizer, [e["question"] for e in examples], replies, **prompt
    )
    if group > 1:
        rows = split_at_shared_prefixes(ids, group, model.pad_id)
    else:
        rows = padded(ids, model.pad_id)
    fn = model.scores_fn(num_micro_batches, group)
    return gather.local_rows(fn(model.params, *sharding.shard_batch(mesh, rows))).astype(np.float32)
