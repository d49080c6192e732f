"""Rollout phase: a jitted sampler (prefill + `lax.while_loop` decode) that records log-probs.

`generate` repeats each left-padded prompt `num_samples` times (group-contiguous rows), prefills
the prompts once into a preallocated KV cache, repeats the cache per sample (or, with
`shared_prompt_decode`, keeps one copy that every decode step reads for all of a prompt's
samples), and decodes inside `lax.while_loop`s (one, or one per `decode_segments`) until every
row has emitted an end id (or completed a stop string: `stop_strings.py`) or the budget is
spent. Nothing returns to the host per token. Sampling keys are
`fold_in(rng, completion_index)`, so a key fixes the output. `generate_in_rounds` also returns
each row's keys and values (a `DecodeContext`), and samples rows on from such a context after
tokens the host appends (a tool's result), computing only those tokens' keys and values.

Log-prob convention (what `Rollout.logps_BxC` holds, in fp32, computed from the fp32 logits of
the same `transformer.forward` / `transformer.logits` the trainer uses):
  - temperature T > 0: log softmax(logits / T)[token] over the FULL vocabulary, even when top-k /
    top-p truncate the distribution the token is drawn from. This is exactly what the trainer
    recomputes with `transformer.completion_logprobs(..., temperature=T)`. With
    `keep_sampling_mask`, over the ids the token was drawn from instead, recorded per token
    (`Rollout.kept_ids_BxCxK`), the set the trainer's recomputation then keeps too.
  - greedy (T == 0): log softmax(logits)[token], i.e. the T = 1 recomputation.
Completion slots after the end token hold `pad_id`, are masked out and have log-prob 0; the end
token itself is inside the mask. In fp32 the two agree to ~1e-5 (tested); in bf16 they differ by
bf16 rounding, since incremental decode and the full-sequence pass round activations differently.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grpo import knobs, sharding
from grpo.models import lora
from grpo.models import transformer as tf
from grpo.models.config import ModelConfig
from grpo.phases.stop_strings import StopStrings
from grpo.types import Rollout

NOT_KEPT = np.iinfo(np.int32).max  # pads a token's kept ids: out of every vocabulary's range


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample completions. temperature == 0 means greedy (then top_k / top_p stay off).

    decode_segments: split the decode loop into this many loops over near-equal parts of the
    completion, each attending only to the cache slots filled by its end (the cache grows by a
    part per segment; one compile of the decode step per segment). Fewer cache bytes per step
    for long completions (H200 compile: -15% at 1.5B, 4 segments); off (1) by default until
    timed on a GPU (BUILD_NOTES: segmented decode).

    stop: a row also ends with the token that completes one of these strings in its text (the
    token stays in the completion, as an end token does).

    shared_prompt_decode: the decode reads each prompt's keys and values once for all its
    samples (`transformer.forward`'s `prefix`) instead of from a copy per sample; a smaller
    cache, but two parts to one softmax. Off by default until timed on a GPU (BUILD_NOTES:
    shared-prompt decode).

    repetition_penalty: > 1 makes ids already in the row (its prompt's real tokens and what it
    sampled so far) less likely to be drawn, as transformers' and vLLM's knob of that name does:
    their logits are divided by it where positive, multiplied where negative. The recorded
    log-probs stay the model's own (unpenalized), the trainer's recomputation, as with top-k.

    compact_rows: at the start of each decode segment after the first, move the rows still
    decoding to the front of their device's rows, and decode the segment on only as many rows
    per device as hold them (the whole, a half, a quarter or an eighth: one compile of the
    decode step each). Long-tail rollouts, where a few rows run far beyond the rest, then read
    the cache of those rows alone. Samples differ from an uncompacted run's (a row's noise
    follows its position), greedy decoding gives the same tokens. Off by default until timed on
    a GPU (BUILD_NOTES: compacted decode).

    keep_sampling_mask: DeepSeek-V3.2's "keep sampling mask" (arXiv 2512.02556, 3.1; prime-rl's
    "sampling replay"): each token's log-prob is over the ids it was drawn from (after min-p,
    top-k and top-p), not the whole vocabulary, and the rollout records those ids, up to top_k
    per token (which must bound them), so that the trainer's recomputation, and the ratio and
    KL built on it, share the sampler's support instead of treating every truncated draw as
    one from the full distribution.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    top_p: float = 1.0  # 1.0: no nucleus truncation
    min_p: float = 0.0  # > 0: only tokens at least min_p times as likely as the likeliest
    repetition_penalty: float = 1.0  # 1.0: off
    end_ids: tuple[int, ...]
    pad_id: int
    decode_segments: int = 1
    stop: StopStrings | None = None
    shared_prompt_decode: bool = False
    compact_rows: bool = False
    keep_sampling_mask: bool = False

    def __post_init__(self):
        knobs.check_fields(self, "SamplingConfig")
        # Gin and callers may pass a list; keep the config hashable.
        object.__setattr__(self, "end_ids", tuple(int(i) for i in self.end_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.decode_segments < 1:
            raise ValueError(f"decode_segments must be >= 1, got {self.decode_segments}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        if not self.end_ids:
            raise ValueError("end_ids must name at least one end-of-sequence token id")
        if self.compact_rows and self.decode_segments == 1:
            raise ValueError(
                "compact_rows moves live rows at decode segment starts: set decode_segments > 1"
            )
        if self.compact_rows and self.shared_prompt_decode:
            raise ValueError(
                "compact_rows reorders rows, which shared_prompt_decode reads by group: pick one"
            )
        if self.greedy and (self.top_k or self.top_p < 1 or self.min_p):
            raise ValueError(
                f"temperature=0 is greedy: top_k={self.top_k} / top_p={self.top_p} / "
                f"min_p={self.min_p} would be ignored"
            )
        if self.keep_sampling_mask and (self.greedy or not self.top_k):
            raise ValueError(
                "keep_sampling_mask records the ids each token was drawn from, at most top_k of "
                f"them: it needs temperature > 0 and top_k > 0 (a bound such as 512 beside "
                f"top_p); got temperature={self.temperature}, top_k={self.top_k}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def kept_ids_per_token(self) -> int:
        """K of `Rollout.kept_ids_BxCxK`: top_k with `keep_sampling_mask`, else 0 (none)."""
        return self.top_k if self.keep_sampling_mask else 0

    @property
    def logp_temperature(self) -> float:
        """The temperature of the recorded log-probs (and of the trainer's recomputation)."""
        return 1.0 if self.greedy else self.temperature


@chex.dataclass
class SamplingState:
    """The decode loop's carry. Row b of every array is completion b (prompt b // num_samples)."""

    step: jax.Array  # int32 scalar: the completion slot the next sampled token goes to
    last_B: jax.Array  # int32: the most recent sampled token, fed to the next forward
    tokens_BxC: jax.Array  # int32, pad_id where not yet sampled or after the end token
    logps_BxC: jax.Array  # fp32
    done_B: jax.Array  # bool: has emitted an end id or completed a stop string
    budget_B: jax.Array  # int32: the most tokens the row may sample (the width, unless given)
    ends_B: jax.Array  # int32: the completion length once done, else its budget
    stops_BxS: jax.Array  # int32: each stop string's automaton state (S = 0 without any)
    seen_BxV: jax.Array  # bool: ids in the row so far, for the repetition penalty (V = 0 without)
    # int32: the ids each slot's token was drawn from, NOT_KEPT padded (K = 0 without
    # keep_sampling_mask)
    kept_BxCxK: jax.Array
    cache: tf.KVCache  # with shared_prompt_decode, the completions' slots alone


@chex.dataclass
class DecodeContext:
    """Rows to sample on after a round (`generate_in_rounds`): each row's keys and values for
    every token it has read or sampled but its last (valid slots first, then invalid ones; the
    last token's come with the next round's tokens, which start with it), how many tokens that
    is (the last token's position) and, with a repetition penalty, the ids the row has seen."""

    cache: tf.KVCache
    lengths_B: jax.Array  # int32: the tokens in `cache`'s valid slots
    seen_BxV: jax.Array  # bool ([B, 0] without a repetition penalty)


def generate(
    params: tf.Params,
    prompt_tokens_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    rng: jax.Array,
    *,
    model: ModelConfig,
    sampling: SamplingConfig,
    num_samples: int,
    mesh: Mesh | None = None,
    budget_B: jax.Array | None = None,
) -> Rollout:
    """Samples `num_samples` completions per left-padded prompt; rows are group-contiguous.

    Output B = prompts x num_samples, completion width C = sampling.max_new_tokens. With a mesh
    (else the context mesh of `jax.set_mesh`, if any), the batch-shaped loop state is constrained
    to the batch axes (params keep their sharding). `budget_B` (int32, one per output row) caps
    each row's new tokens below C: a row that reaches its budget is truncated there, and one of
    budget 0 samples nothing, so the loop runs only as long as the rows with budget left need
    (the tool rounds continue some rows of a batch and not others).
    """
    _check_inputs(prompt_tokens_BxP, prompt_mask_BxP, model, sampling, num_samples, budget_B)
    return _generate(
        params, prompt_tokens_BxP, prompt_mask_BxP, rng,
        model=model, sampling=sampling, num_samples=num_samples, mesh=mesh, budget_B=budget_B,
    )  # fmt: skip


def generate_in_rounds(
    params: tf.Params,
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array,
    rng: jax.Array,
    *,
    model: ModelConfig,
    sampling: SamplingConfig,
    num_samples: int,
    mesh: Mesh | None = None,
    budget_B: jax.Array | None = None,
    context: DecodeContext | None = None,
) -> tuple[Rollout, DecodeContext]:
    """`generate`, also returning each row's `DecodeContext`, to sample on from later.

    Without `context`, `tokens_BxT` are the prompts. With the `context` of the previous round
    (`num_samples` 1), each row samples on after its context and its `tokens_BxT`
    (left-padded): the row's last token (the last it sampled; the context holds every token
    before it), then what the host appends, say a tool's result. Only their keys and values
    are computed; the context's are read as they are. The context's slots bound a row's tokens
    over all rounds (the first round's prompt width plus `max_new_tokens`): a row's budget is
    cut to what is left of them. One compile per width of `tokens_BxT`.
    """
    _check_inputs(tokens_BxT, mask_BxT, model, sampling, num_samples, budget_B)
    if context is not None and num_samples != 1:
        raise ValueError(f"a round after the first samples each row once, not {num_samples}")
    return _generate(
        params, tokens_BxT, mask_BxT, rng,
        model=model, sampling=sampling, num_samples=num_samples, mesh=mesh, budget_B=budget_B,
        context=context, keep_context=True,
    )  # fmt: skip


def _check_inputs(
    prompt_tokens_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    model: ModelConfig,
    sampling: SamplingConfig,
    num_samples: int,
    budget_B: jax.Array | None,
) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if np.ndim(prompt_tokens_BxP) != 2 or np.shape(prompt_tokens_BxP) != np.shape(prompt_mask_BxP):
        raise ValueError(
            f"prompt tokens {np.shape(prompt_tokens_BxP)} and mask {np.shape(prompt_mask_BxP)} "
            "must be the same (batch, length) shape"
        )
    bad_ids = [i for i in (*sampling.end_ids, sampling.pad_id) if not 0 <= i < model.vocab_size]
    if bad_ids:
        raise ValueError(f"end/pad ids {bad_ids} outside the vocabulary [0, {model.vocab_size})")
    if sampling.stop is not None and sampling.stop.vocab_size != model.vocab_size:
        raise ValueError(
            f"stop strings built for {sampling.stop.vocab_size} token ids, the model has "
            f"{model.vocab_size}"
        )
    rows = np.shape(prompt_tokens_BxP)[0] * num_samples
    if budget_B is not None and np.shape(budget_B) != (rows,):
        raise ValueError(f"budget_B has shape {np.shape(budget_B)}, the output rows ({rows},)")
    if isinstance(prompt_mask_BxP, np.ndarray) and not prompt_mask_BxP[:, -1].all():
        raise ValueError("prompts must be left-padded and non-empty (last mask column all True)")


# A round's context is read once, into the next round's cache: donated, its buffers can hold
# the context the round returns (the same shape).
@functools.partial(
    jax.jit,
    static_argnames=("model", "sampling", "num_samples", "mesh", "keep_context"),
    donate_argnames=("context",),
)
def _generate(
    params: tf.Params,
    prompt_tokens_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    rng: jax.Array,
    *,
    model: ModelConfig,
    sampling: SamplingConfig,
    num_samples: int,
    mesh: Mesh | None,
    budget_B: jax.Array | None = None,
    context: DecodeContext | None = None,
    keep_context: bool = False,
) -> Rollout | tuple[Rollout, DecodeContext]:
    # Cast once, not once per decode step; forward's own casts are then no-ops (same numerics).
    # Split the layers once too (fused with the cast): the decode step then reads each layer's
    # weights in place, where scanning the stacked weights copies every layer on every step.
    # LoRA adapters are merged here, once, into the weights the decode step reads.
    merged = lora.merge(params, model.lora)
    params = tf.unstack_layers(jax.tree.map(lambda a: a.astype(model.dtype), merged))
    unembed_DxV = _unembedding_split_over_vocab(params, model, mesh)
    prompt_tokens_BxP = prompt_tokens_BxP.astype(jnp.int32)
    prompt_mask_BxP = prompt_mask_BxP.astype(bool)
    width, (num_prompts, prompt_len) = sampling.max_new_tokens, prompt_tokens_BxP.shape
    batch = num_prompts * num_samples
    shared = sampling.shared_prompt_decode
    # The cache holds the slots the first decode segment fills; each later segment grows it.
    ends = segment_ends(width, sampling.decode_segments)
    free_slots = 0 if shared else ends[0]
    prompts_cache, logits_NxV = _prefill(
        params, unembed_DxV, prompt_tokens_BxP, prompt_mask_BxP, model, free_slots, mesh, context
    )
    # The slots before the completion's: the context's, then the prompt's.
    prompt_slots = prompt_len + (0 if context is None else _slots(context.cache))
    per_sample = functools.partial(jnp.repeat, repeats=num_samples, axis=0)
    if shared:  # the completions' own slots; the prompts' cache is every decode step's prefix
        cache = tf.init_cache(model, batch, ends[0])
        prefix, prefix_len = prompts_cache, 0
    else:  # a copy of its prompt's cache per sample, with room for the completion
        cache, prefix, prefix_len = _per_sample(prompts_cache, per_sample), None, prompt_slots
    prompt_tokens_BxP, prompt_mask_BxP = (
        sharding.constrain(jnp.repeat(x, num_samples, axis=0), ("batch", None), mesh)
        for x in (prompt_tokens_BxP, prompt_mask_BxP)
    )
    prompt_len_B = prompt_mask_BxP.sum(axis=1, dtype=jnp.int32)
    if budget_B is None:
        budget_B = jnp.full((batch,), width, jnp.int32)
    budget_B = jnp.minimum(budget_B.astype(jnp.int32), width)
    if context is not None:  # positions go on from the context's; its slots bound the row
        prompt_len_B = prompt_len_B + context.lengths_B
        budget_B = jnp.clip(_slots(context.cache) - prompt_len_B, 0, budget_B)
    budget_B = sharding.constrain(budget_B, ("batch",), mesh)
    seen_BxV = _ids_seen(prompt_tokens_BxP, prompt_mask_BxP, model.vocab_size, sampling, mesh)
    if context is not None:
        seen_BxV = seen_BxV | context.seen_BxV

    state = SamplingState(
        step=jnp.zeros((), jnp.int32),
        last_B=jnp.zeros((batch,), jnp.int32),
        tokens_BxC=jnp.full((batch, width), sampling.pad_id, jnp.int32),
        logps_BxC=jnp.zeros((batch, width), jnp.float32),
        done_B=jnp.zeros((batch,), bool),
        budget_B=budget_B,
        ends_B=budget_B,
        stops_BxS=jnp.zeros((batch, len(sampling.stop.strings) if sampling.stop else 0), jnp.int32),
        seen_BxV=seen_BxV,
        kept_BxCxK=jnp.full((batch, width, sampling.kept_ids_per_token), NOT_KEPT, jnp.int32),
        cache=cache,
    )
    state = _record(state, per_sample(logits_NxV), rng, sampling, mesh)

    def decode_step(state: SamplingState, prompt_len_B: jax.Array) -> SamplingState:
        # The token sampled at slot step-1 sits right after the prompt's real tokens.
        positions_Bx1 = (prompt_len_B + state.step - 1)[:, None]
        hidden_Bx1xD, cache = tf.forward(
            params,
            state.last_B[:, None],
            positions_Bx1,
            jnp.ones(positions_Bx1.shape, bool),
            config=model,
            cache=state.cache,
            prefix=prefix,
        )
        logits_BxV = tf.unembed(hidden_Bx1xD, unembed_DxV)[:, 0]
        return _record(state.replace(cache=cache), logits_BxV, rng, sampling, mesh)

    def decode_until(end: int, state: SamplingState, prompt_len_B: jax.Array) -> SamplingState:
        not_done = lambda state: (state.step < end) & ~jnp.all(_stopped(state))
        step = lambda state: decode_step(state, prompt_len_B)
        return jax.lax.while_loop(not_done, step, state)

    # One loop per segment, attending to a cache of the slots filled by the segment's end.
    for segment, end in enumerate(ends):
        grow = lambda state, end=end: state.replace(
            cache=_constrain_cache(tf.grow_cache(state.cache, prefix_len + end), mesh)
        )
        decode = functools.partial(decode_until, end)
        if sampling.compact_rows and segment:
            shards = _row_shards(batch, mesh)
            state = _on_live_rows(decode, grow, state, prompt_len_B, shards)
        else:
            state = decode(grow(state), prompt_len_B)
    rollout = _finish(state, prompt_tokens_BxP, prompt_mask_BxP, sampling, mesh)
    if not keep_context:
        return rollout
    if shared:  # each row's own copy of its prompt's keys and values, then its completion's
        state = state.replace(cache=_joined(_per_sample(prefix, per_sample), state.cache))
    slots = _slots(context.cache) if context is not None else prompt_len + width
    return rollout, _next_context(state, prompt_slots, prompt_len_B, slots, mesh)


_COMPACTIONS = 3  # decode at a half, a quarter or an eighth of the rows, besides all of them


def _on_live_rows(decode, grow, state: SamplingState, prompt_len_B: jax.Array, shards: int):
    """`decode(grow(state), prompt_len_B)` run on the rows still decoding alone: on each shard's
    rows, those first (a stable sort), cut to the fewest of the shard's rows, its half, quarter
    or eighth, that hold every shard's live rows; then written back. Rows outside the cut are
    done: decoding would only have written padding, which is already there.

    Each branch grows the cache it decodes into a buffer of its own: the branches share the
    incoming cache as a read-only operand, so a loop over it in place would copy it whole
    first (XLA's GPU compile did, for the all-rows branch: a second full cache at the peak)."""
    per_shard = state.done_B.shape[0] // shards
    done_SxR = _stopped(state).reshape(shards, per_shard)
    order_SxR = jnp.argsort(done_SxR, axis=1, stable=True)
    live = jnp.max(jnp.sum(~done_SxR, axis=1))
    widths = compaction_widths(per_shard)

    def on_rows(width: int):
        def branch(state, prompt_len_B):
            if width == per_shard:
                return decode(grow(state), prompt_len_B)
            take_SxW = order_SxR[:, :width]
            cut = lambda x: _take_rows(x, take_SxW) if x.ndim else x
            cut_state, cut_prompt_len_W = jax.tree.map(cut, (state, prompt_len_B))
            decoded = decode(grow(cut_state), cut_prompt_len_W)
            put = lambda x, part: _put_rows(x, part, take_SxW) if x.ndim else part
            return jax.tree.map(put, grow(state), decoded)

        return branch

    narrowest = sum((live <= width).astype(jnp.int32) for width in widths[1:])
    return jax.lax.switch(narrowest, [on_rows(w) for w in widths], state, prompt_len_B)


def compaction_widths(rows: int) -> list[int]:
    """The rows per device a compacted decode segment may run at: all, then halves of them."""
    return [rows >> i for i in range(_COMPACTIONS + 1) if rows % (1 << i) == 0]


def _take_rows(x_B: jax.Array, take_SxW: jax.Array) -> jax.Array:
    """Rows `take_SxW[s]` of shard s's rows of `x_B`, for each shard s. Mapped over the shards,
    so the gather has them as a batch dimension and each device gathers its own rows."""
    shards, width = take_SxW.shape
    x_SxR = x_B.reshape(shards, x_B.shape[0] // shards, *x_B.shape[1:])
    taken_SxW = jax.vmap(lambda x_R, take_W: x_R[take_W])(x_SxR, take_SxW)
    return taken_SxW.reshape(shards * width, *x_B.shape[1:])


def _put_rows(x_B: jax.Array, part: jax.Array, take_SxW: jax.Array) -> jax.Array:
    """`x_B` with `part` (as `_take_rows` cut it) written back to its rows, shard by shard."""
    shards, width = take_SxW.shape
    x_SxR = x_B.reshape(shards, x_B.shape[0] // shards, *x_B.shape[1:])
    part_SxW = part.reshape(shards, width, *x_B.shape[1:])
    put = jax.vmap(lambda x_R, take_W, part_W: x_R.at[take_W].set(part_W))
    return put(x_SxR, take_SxW, part_SxW).reshape(x_B.shape)


def _row_shards(rows: int, mesh: Mesh | None) -> int:
    """How many devices' shares the decode's rows are split into (the batch axes')."""
    mesh = mesh or jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else sharding.batch_divisor(mesh)
    return shards if rows % shards == 0 else 1


def segment_ends(width: int, segments: int) -> list[int]:
    """Where each decode segment stops: `segments` near-equal parts of the completion width."""
    segments = min(segments, width)
    return [-(-width * (j + 1) // segments) for j in range(segments)]


def _prefill(
    params: tf.Params,
    unembed_DxV: jax.Array,
    prompt_tokens_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    model: ModelConfig,
    free_slots: int,
    mesh: Mesh | None,
    context: DecodeContext | None = None,
) -> tuple[tf.KVCache, jax.Array]:
    """Runs each prompt once (after its row's context, if given); returns its cache (the
    context's slots, the prompt's, then `free_slots` more) and its next-token logits."""
    num_prompts, prompt_len = prompt_tokens_BxP.shape
    positions_BxP = tf.positions_from_mask(prompt_mask_BxP)
    if context is None:
        cache = tf.init_cache(model, num_prompts, prompt_len + free_slots)
    else:
        filled = _slots(context.cache)
        cache = tf.grow_cache(context.cache, filled + prompt_len + free_slots)
        cache = cache.replace(index=jnp.asarray(filled, jnp.int32))
        positions_BxP = positions_BxP + context.lengths_B[:, None]
    cache = _constrain_cache(cache, mesh)
    hidden_BxPxD, cache = tf.forward(
        params, prompt_tokens_BxP, positions_BxP, prompt_mask_BxP, config=model, cache=cache
    )
    return cache, tf.unembed(hidden_BxPxD[:, -1:], unembed_DxV)[:, 0]


def _per_sample(cache: tf.KVCache, repeat) -> tf.KVCache:
    return cache.replace(
        k_layers=tuple(map(repeat, cache.k_layers)),
        v_layers=tuple(map(repeat, cache.v_layers)),
        valid_BxS=repeat(cache.valid_BxS),
    )


def _slots(cache: tf.KVCache) -> int:
    return cache.valid_BxS.shape[1]


def _joined(first: tf.KVCache, then: tf.KVCache) -> tf.KVCache:
    """One cache holding `first`'s slots, then `then`'s (rows alike)."""
    join = lambda a, b: jnp.concatenate([a, b], axis=1)
    return then.replace(
        k_layers=tuple(map(join, first.k_layers, then.k_layers)),
        v_layers=tuple(map(join, first.v_layers, then.v_layers)),
        valid_BxS=join(first.valid_BxS, then.valid_BxS),
    )


def _next_context(
    state: SamplingState,
    prompt_slots: int,
    prompt_len_B: jax.Array,
    slots: int,
    mesh: Mesh | None,
) -> DecodeContext:
    """Each row's context after the round: the valid slots of its prompt and of its completion
    but its last token (the last sampled, or for a row that sampled none its prompt's last;
    slots past it may hold padding fed after the row ended, or nothing), moved first (in order)
    and cut to `slots`, which hold them all."""
    cache, kept_B = state.cache, state.ends_B - 1
    completion_slot = jnp.arange(_slots(cache))[None, :] - prompt_slots
    valid_BxS = cache.valid_BxS & (completion_slot < kept_B[:, None])
    order_BxS = jnp.argsort(~valid_BxS, axis=1, stable=True)[:, :slots]
    take = lambda a: jnp.take_along_axis(a, order_BxS.reshape(order_BxS.shape + (1, 1)), axis=1)
    kept = tf.KVCache(
        k_layers=tuple(map(take, cache.k_layers)),
        v_layers=tuple(map(take, cache.v_layers)),
        valid_BxS=jnp.take_along_axis(valid_BxS, order_BxS, axis=1),
        index=jnp.asarray(slots, jnp.int32),
    )
    return DecodeContext(
        cache=_constrain_cache(kept, mesh),
        lengths_B=prompt_len_B + kept_B,
        seen_BxV=state.seen_BxV,
    )


def _stopped(state: SamplingState) -> jax.Array:
    """bool [B]: the row samples no more (it ended, or used its budget)."""
    return state.done_B | (state.step >= state.budget_B)


def _record(
    state: SamplingState,
    logits_BxV: jax.Array,
    rng: jax.Array,
    sampling: SamplingConfig,
    mesh: Mesh | None,
) -> SamplingState:
    """Samples slot `state.step` from the logits, writes token and log-prob, advances."""
    key = jax.random.fold_in(rng, state.step)
    token_B, logp_B, kept_BxK = sample_tokens(logits_BxV, key, sampling, state.seen_BxV)
    # Every row on every device first (the vocabulary-split logits reduce to that cheaply); asked
    # for rows split like the batch, XLA:TPU moves a [rows, vocab] index array per step instead.
    token_B, logp_B = (sharding.constrain(x, (None,), mesh) for x in (token_B, logp_B))
    stopped_B = _stopped(state)
    token_B = jnp.where(stopped_B, sampling.pad_id, token_B)
    logp_B = jnp.where(stopped_B, 0.0, logp_B)
    kept_BxK = jnp.where(stopped_B[:, None], NOT_KEPT, kept_BxK)
    ends_here_B, stops_BxS = _is_end(token_B, sampling.end_ids), state.stops_BxS
    if sampling.stop is not None:
        stops_BxS, completed_B = sampling.stop.advance(stops_BxS, token_B)
        ends_here_B |= completed_B
    ends_here_B &= ~stopped_B
    write = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=state.step, axis=1)
    new = state.replace(
        step=state.step + 1,
        last_B=token_B,
        tokens_BxC=write(state.tokens_BxC, token_B[:, None]),
        logps_BxC=write(state.logps_BxC, logp_B[:, None]),
        kept_BxCxK=write(state.kept_BxCxK, kept_BxK[:, None]),
        done_B=state.done_B | ends_here_B,
        ends_B=jnp.where(ends_here_B, state.step + 1, state.ends_B),
        stops_BxS=stops_BxS,
        seen_BxV=state.seen_BxV | (_one_hot_like(state.seen_BxV, token_B) & ~stopped_B[:, None]),
    )
    return _constrain_state(new, mesh)


def _ids_seen(
    tokens_BxP: jax.Array,
    mask_BxP: jax.Array,
    vocab_size: int,
    sampling: SamplingConfig,
    mesh: Mesh | None,
) -> jax.Array:
    """Which ids each row's real prompt tokens hold, split over the vocabulary like the decode's
    logits; [B, 0] without a repetition penalty (nothing to track)."""
    rows, _ = tokens_BxP.shape
    if sampling.repetition_penalty == 1:
        return jnp.zeros((rows, 0), bool)
    ids_BxP = jnp.where(mask_BxP, tokens_BxP, vocab_size)  # padding: out of range, dropped
    seen_BxV = jnp.zeros((rows, vocab_size), bool)
    seen_BxV = seen_BxV.at[jnp.arange(rows)[:, None], ids_BxP].set(True, mode="drop")
    return sharding.constrain(seen_BxV, (None, "unembed_vocab"), mesh)


def _one_hot_like(seen_BxV: jax.Array, token_B: jax.Array) -> jax.Array:
    """Each row's token as a row of `seen_BxV`'s width (a compare each device makes on its own
    slice of the vocabulary; no scatter)."""
    return jnp.arange(seen_BxV.shape[1])[None, :] == token_B[:, None]


def sample_tokens(
    logits_BxV: jax.Array,
    key: jax.Array,
    sampling: SamplingConfig,
    seen_BxV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row, its fp32 log-prob under the module's convention (full vocab, or with
    `keep_sampling_mask` the ids it was drawn from; before any repetition penalty on the ids in
    `seen_BxV`), and those ids ([B, 0] without `keep_sampling_mask`)."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    scaled_BxV = logits_BxV if sampling.greedy else logits_BxV / sampling.temperature
    drawn_BxV = scaled_BxV
    if sampling.repetition_penalty != 1:  # on the scaled logits: T > 0 keeps every sign
        penalty = sampling.repetition_penalty
        penalized_BxV = jnp.where(scaled_BxV > 0, scaled_BxV / penalty, scaled_BxV * penalty)
        drawn_BxV = jnp.where(seen_BxV, penalized_BxV, scaled_BxV)
    if sampling.greedy:
        token_B = jnp.argmax(drawn_BxV, axis=-1).astype(jnp.int32)
        kept_BxK = jnp.zeros((token_B.shape[0], 0), jnp.int32)
    else:
        token_B, kept_BxK = _draw(drawn_BxV, key, sampling.top_k, sampling.top_p, sampling.min_p)
        kept_BxK = kept_BxK[:, : sampling.kept_ids_per_token]  # none unless asked for
    chosen_B = jnp.take_along_axis(scaled_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B, chosen_B - _logsumexp_over(scaled_BxV, kept_BxK), kept_BxK


def _logsumexp_over(scaled_BxV: jax.Array, kept_BxK: jax.Array) -> jax.Array:
    """logsumexp of each row over its kept ids (NOT_KEPT pads them), or over the whole row where
    K = 0."""
    if not kept_BxK.shape[1]:
        return jax.nn.logsumexp(scaled_BxV, axis=-1)
    index_BxK = jnp.minimum(kept_BxK, scaled_BxV.shape[1] - 1)
    values_BxK = jnp.take_along_axis(scaled_BxV, index_BxK, axis=-1)
    return jax.nn.logsumexp(jnp.where(kept_BxK == NOT_KEPT, -jnp.inf, values_BxK), axis=-1)


def _draw(
    scaled_BxV: jax.Array, key: jax.Array, top_k: int, top_p: float, min_p: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Categorical draw from softmax(scaled), restricted to the tokens at least min_p times as
    likely as the likeliest, then to the top-k, then to the top-p nucleus; and, with a top-k,
    the ids it was restricted to (NOT_KEPT padded; else [B, 0])."""
    no_ids_Bx0 = jnp.zeros((scaled_BxV.shape[0], 0), jnp.int32)
    if min_p:  # p >= min_p * p_max  <=>  scaled >= max(scaled) + log(min_p)
        floor_Bx1 = jnp.max(scaled_BxV, axis=-1, keepdims=True) + np.log(min_p)
        scaled_BxV = jnp.where(scaled_BxV >= floor_Bx1, scaled_BxV, -jnp.inf)
    if not top_k and top_p == 1:
        return jax.random.categorical(key, scaled_BxV, axis=-1).astype(jnp.int32), no_ids_Bx0
    k = min(top_k or scaled_BxV.shape[-1], scaled_BxV.shape[-1])
    values_BxK, ids_BxK = jax.lax.top_k(scaled_BxV, k)  # sorted, largest first
    if top_p < 1:
        probs_BxK = jax.nn.softmax(values_BxK, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the most likely token).
        mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
        values_BxK = jnp.where(mass_before_BxK < top_p, values_BxK, -jnp.inf)
    choice_B = jax.random.categorical(key, values_BxK, axis=-1)
    token_B = jnp.take_along_axis(ids_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if not top_k:
        return token_B, no_ids_Bx0
    kept_BxK = jnp.where(values_BxK > -jnp.inf, ids_BxK, NOT_KEPT).astype(jnp.int32)
    return token_B, jnp.pad(kept_BxK, ((0, 0), (0, top_k - k)), constant_values=NOT_KEPT)


def _is_end(tokens: jax.Array, end_ids: tuple[int, ...]) -> jax.Array:
    return jnp.isin(tokens, jnp.asarray(end_ids, jnp.int32))


def _finish(
    state: SamplingState,
    prompt_tokens_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    sampling: SamplingConfig,
    mesh: Mesh | None,
) -> Rollout:
    """Masks everything after the token that ended each row (an end token or a stop string's
    last; the padding after it may itself be an end id)."""
    width = state.tokens_BxC.shape[1]
    length_B = state.ends_B
    mask_BxC = jnp.arange(width)[None, :] < length_B[:, None]
    rollout = Rollout(
        prompt_tokens_BxP=prompt_tokens_BxP,
        prompt_mask_BxP=prompt_mask_BxP,
        completion_tokens_BxC=jnp.where(mask_BxC, state.tokens_BxC, sampling.pad_id),
        completion_mask_BxC=mask_BxC,
        logps_BxC=jnp.where(mask_BxC, state.logps_BxC, 0.0),
        lengths_B=length_B,
        truncated_B=~state.done_B,
        kept_ids_BxCxK=(
            jnp.where(mask_BxC[..., None], state.kept_BxCxK, NOT_KEPT)
            if state.kept_BxCxK.shape[2]
            else None
        ),
    )
    return jax.tree.map(
        lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh), rollout
    )


def _unembedding_split_over_vocab(
    params: tf.Params, model: ModelConfig, mesh: Mesh | None
) -> jax.Array:
    """The output projection (D, V) with its vocabulary split across every device, once per
    rollout (no-op without a mesh).

    The trainer's layout splits the model dimension (fsdp), so with it each device computes
    partial logits for every row and every decode step all-reduces the [B, V] fp32 logits:
    78 MB per token at 128 rows and Qwen2.5's 151,936-token vocabulary (v6e-8 compile). Split
    over the vocabulary, a step gathers the [B, D] final hidden states instead, and sampling
    reduces one value per row across the slices (BUILD_NOTES).
    """
    return sharding.constrain(tf.unembed_matrix(params, model), (None, "unembed_vocab"), mesh)


_KV_AXES = ("batch", None, "kv_heads", "head_dim")  # a layer's keys or values
_VALID_AXES = ("batch", None)


def _constrain_cache(cache: tf.KVCache, mesh: Mesh | None) -> tf.KVCache:
    layer_kv = functools.partial(sharding.constrain, names=_KV_AXES, mesh=mesh)
    return cache.replace(
        k_layers=tuple(map(layer_kv, cache.k_layers)),
        v_layers=tuple(map(layer_kv, cache.v_layers)),
        valid_BxS=sharding.constrain(cache.valid_BxS, _VALID_AXES, mesh),
    )


def _laid_out(shape: tuple[int, ...], dtype: jnp.dtype, names: tuple, mesh: Mesh) -> float:
    """GB one device holds of an array of `shape` laid out by logical axis `names`."""
    spec = sharding.logical_to_spec(names, shape, mesh)
    array = jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(mesh, spec))
    return sharding.gb_per_device(array)


def cache_gb_per_device(model: ModelConfig, rows: int, slots: int, mesh: Mesh) -> float:
    """GB one device holds of a decode KV cache of `rows` x `slots` token slots, laid out as the
    decode loop lays its cache out (rows over the batch axes, KV heads over tp)."""
    layer_shape = (rows, slots, model.num_kv_heads, model.head_dim)
    layer = _laid_out(layer_shape, jnp.dtype(model.dtype), _KV_AXES, mesh)
    return 2 * model.num_layers * layer + _laid_out(
        (rows, slots), jnp.dtype(bool), _VALID_AXES, mesh
    )


def kept_ids_gb_per_device(sampling: SamplingConfig, rows: int, mesh: Mesh) -> float:
    """GB one device holds of a rollout's kept ids (`keep_sampling_mask`; 0 without), rows over
    the batch axes; the update's batch holds them too."""
    shape = (rows, sampling.max_new_tokens, sampling.kept_ids_per_token)
    return _laid_out(shape, jnp.dtype(jnp.int32), ("batch", None, None), mesh)


def _constrain_state(state: SamplingState, mesh: Mesh | None) -> SamplingState:
    return state.replace(
        last_B=sharding.constrain(state.last_B, ("batch",), mesh),
        tokens_BxC=sharding.constrain(state.tokens_BxC, ("batch", None), mesh),
        logps_BxC=sharding.constrain(state.logps_BxC, ("batch", None), mesh),
        done_B=sharding.constrain(state.done_B, ("batch",), mesh),
        budget_B=sharding.constrain(state.budget_B, ("batch",), mesh),
        ends_B=sharding.constrain(state.ends_B, ("batch",), mesh),
        stops_BxS=sharding.constrain(state.stops_BxS, ("batch", None), mesh),
        seen_BxV=sharding.constrain(state.seen_BxV, (None, "unembed_vocab"), mesh),
        kept_BxCxK=sharding.constrain(state.kept_BxCxK, ("batch", None, None), mesh),
        cache=_constrain_cache(state.cache, mesh),
    )


def _smallest_bucket(size: int, buckets: Sequence[int], what: str) -> int:
    ordered = sorted(buckets)
    i = bisect.bisect_left(ordered, size)
    if i == len(ordered):
        raise ValueError(f"{what} of length {size} exceeds the largest bucket {ordered[-1]}")
    return ordered[i]


def pad_prompts(
    ids: Sequence[Sequence[int]], *, pad_id: int, buckets: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token-id lists to the smallest bucket >= the longest, so shapes repeat."""
    if not ids:
        raise ValueError("pad_prompts needs at least one prompt")
    if not buckets or min(buckets) < 1:
        raise ValueError(f"buckets must be positive lengths, got {list(buckets)}")
    lengths = [len(p) for p in ids]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty")
    width = _smallest_bucket(max(lengths), buckets, "prompt")
    tokens_BxP = np.full((len(ids), width), pad_id, np.int32)
    mask_BxP = np.zeros((len(ids), width), np.bool_)
    for row, prompt in enumerate(ids):
        tokens_BxP[row, width - len(prompt) :] = prompt
        mask_BxP[row, width - len(prompt) :] = True
    return tokens_BxP, mask_BxP


def trim_completions(rollout: Rollout, buckets: Sequence[int]) -> Rollout:
    """Cuts the completion axis to the smallest bucket >= the longest completion.

    The full width C always counts as a bucket (buckets above C are capped to it), so the update
    sees at most len(buckets) + 1 completion shapes. Works on numpy and (sharded) jax arrays.
    """
    width = rollout.completion_tokens_BxC.shape[1]
    longest = int(jnp.max(rollout.lengths_B))  # a global reduction: fine for multi-host arrays
    capped = {min(b, width) for b in buckets} | {width}
    keep = _smallest_bucket(longest, sorted(capped), "completion")
    return rollout.replace(
        completion_tokens_BxC=rollout.completion_tokens_BxC[:, :keep],
        completion_mask_BxC=rollout.completion_mask_BxC[:, :keep],
        logps_BxC=rollout.logps_BxC[:, :keep],
        tool_mask_BxC=None if rollout.tool_mask_BxC is None else rollout.tool_mask_BxC[:, :keep],
        kept_ids_BxCxK=(
            None if rollout.kept_ids_BxCxK is None else rollout.kept_ids_BxCxK[:, :keep]
        ),
    )
