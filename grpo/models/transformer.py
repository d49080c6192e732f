"""Decoder-only transformer (Qwen2/2.5, Qwen3, Llama 3.x) as pure functions over a param pytree.

Parameters are a plain nested dict; per-layer weights are stacked on a leading `layers` axis and
the layers run under `lax.scan`, so compile time does not grow with depth. `logical_axes` names
every parameter dimension; `grpo.sharding` maps those names onto a device mesh. The sampler
splits the stack once per rollout (`unstack_layers`) and `forward` then unrolls the layers, each
with its own KV cache buffer.

Positions and masks come from the caller, so one `forward` serves left-padded prompts, the
sampler's incremental decode against a KV cache, and the trainer's full-sequence recomputation.
Slots in a sequence (and in the cache) are in temporal order: slot j may be attended from slot i
iff j <= i and slot j holds a real token.
"""

from __future__ import annotations

import functools
import math
import operator

import chex
import jax
import jax.numpy as jnp
import numpy as np

from grpo import sharding
from grpo.models import log_softmax, lora, softmax_attention, splash, vocab_parallel
from grpo.models.config import ModelConfig

Params = dict

_NEG_INF = -1e30  # finite, so a fully masked (padding) query row gives uniform weights, not NaN


@chex.dataclass
class KVCache:
    """Keys/values, one buffer per layer, written in place at `index` by each forward call.

    Per-layer buffers rather than one stacked [L, ...] array: a decode step writes its new slots
    into, and attends over, each layer's buffer directly. Slicing layers out of a stack made XLA's
    GPU compile copy whole layers every step (BUILD_NOTES: KV cache traffic).
    """

    k_layers: tuple[jax.Array, ...]  # per layer: B x S x K x H
    v_layers: tuple[jax.Array, ...]
    valid_BxS: jax.Array  # bool: slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: the next slot to write


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
    return KVCache(
        k_layers=zeros(),
        v_layers=zeros(),
        valid_BxS=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """The cache with empty slots appended up to `max_len` (the sampler's next decode segment).

    A segment's loop attends to its whole cache: slicing a prefix of a longer one made XLA's GPU
    compile copy the keys' prefix on every step (BUILD_NOTES: segmented decode)."""
    pad = lambda a: jnp.pad(a, [(0, 0), (0, max_len - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    return cache.replace(
        k_layers=tuple(map(pad, cache.k_layers)),
        v_layers=tuple(map(pad, cache.v_layers)),
        valid_BxS=pad(cache.valid_BxS),
    )


def logical_axes(config: ModelConfig) -> Params:
    """The logical axis names of every parameter, as a pytree shaped like the params."""
    layer = {
        "attn_norm": ("layers", "norm"),
        "q": ("layers", "embed", "q_heads", "head_dim"),
        "k": ("layers", "embed", "kv_heads", "head_dim"),
        "v": ("layers", "embed", "kv_heads", "head_dim"),
        "o": ("layers", "q_heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "norm"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        layer["q_bias"] = ("layers", "q_heads", "head_dim")
        layer["k_bias"] = ("layers", "kv_heads", "head_dim")
        layer["v_bias"] = ("layers", "kv_heads", "head_dim")
    if config.qk_norm:
        layer["q_norm"] = ("layers", "head_dim")
        layer["k_norm"] = ("layers", "head_dim")
    axes = {"embed": ("vocab", "embed"), "layers": layer, "final_norm": ("norm",)}
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> Params:
    """The shape of every parameter, as a pytree shaped like the params."""
    sizes = {
        "layers": config.num_layers,
        "embed": config.hidden_size,
        "norm": config.hidden_size,
        "vocab": config.vocab_size,
        "q_heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "mlp": config.intermediate_size,
    }
    return jax.tree.map(
        lambda names: tuple(sizes[n] for n in names),
        logical_axes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_params(config: ModelConfig, rng: jax.Array, std: float = 0.02) -> Params:
    """Random weights (normal(0, std); norm scales at 1), for tests and benchmarks."""
    shapes = param_shapes(config)
    is_shape = lambda x: isinstance(x, tuple)
    num_leaves = len(jax.tree.leaves(shapes, is_leaf=is_shape))
    keys = iter(jax.random.split(rng, num_leaves))
    dtype = jnp.dtype(config.param_dtype)

    def init_one(path, shape: tuple[int, ...]) -> jax.Array:
        key = next(keys)
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(shape, dtype)
        return (std * jax.random.normal(key, shape)).astype(dtype)

    return jax.tree_util.tree_map_with_path(init_one, shapes, is_leaf=is_shape)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies, with Llama 3 frequency-dependent scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout), computed in fp32."""
    angles = positions_BxT[..., None].astype(jnp.float32) * inv_freq  # B,T,H/2
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32_out(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`einsum` with fp32 output whose backward matmuls run in the inputs' dtype.

    Plain autodiff of a bf16 x bf16 -> fp32 einsum multiplies the fp32 cotangent with bf16
    inputs, i.e. fp32 (TF32 at best) matmuls on a GPU. The profile found those in the unembedding
    (45.9 of 619 TFLOP of a 1.5B update; the attention scores' backward is written in
    models/softmax_attention.py). Here the cotangent is rounded
    to the inputs' dtype first, as every other layer's backward already runs; with fp32 inputs
    nothing changes.
    """
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_out_fwd(spec, a, b):
    return einsum_f32_out(spec, a, b), (a, b)


def _einsum_f32_out_bwd(spec, residuals, cotangent):
    a, b = residuals
    _, vjp = jax.vjp(functools.partial(jnp.einsum, spec), a, b)
    return vjp(cotangent.astype(jnp.result_type(a, b)))


einsum_f32_out.defvjp(_einsum_f32_out_fwd, _einsum_f32_out_bwd)


def _attention_xla(q, k, v, mask_BxTxS, prefix=None):
    """Grouped-query attention with fp32 scores. q: B,T,N,H; k/v: B,S,K,H. `prefix`: the
    keys, values (N,P,K,H) and valid slots (N,P) of N prefixes shared by B/N rows each, attended
    before k/v (`softmax_attention.attend_after_prefix`)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    group = n // kv_heads
    # Masking adds a [B, T, S] bias: adding needs nothing saved for the backward, where a select
    # would save its mask at the scores' full size. Tied to this layer's k, the bias stays in the
    # layer loop: jax hoists a scan's loop-invariant values out of it, and the bias broadcast to
    # the scores' shape would become a buffer that every layer's score matmul reads in full (1 GB
    # per layer at 1.5B, 16 x 1024) instead of broadcasting [B, T, S] inside the matmul.
    k, mask_BxTxS = jax.lax.optimization_barrier((k, mask_BxTxS))
    bias_BxTxS = jnp.where(mask_BxTxS, 0.0, _NEG_INF).astype(jnp.float32)
    # One KV head's query rows as one (t, g) axis, so score-shaped tensors keep one layout from
    # the score matmul to the weighted sum: only q and the output (S times smaller) move.
    q_BxKxRxH = q.reshape(b, t, kv_heads, group, h).transpose(0, 2, 1, 3, 4)
    q_BxKxRxH = q_BxKxRxH.reshape(b, kv_heads, t * group, h)
    if prefix is None:
        out = softmax_attention.attend(q_BxKxRxH, k, v, bias_BxTxS)
    else:
        prefix_k, prefix_v, prefix_valid_NxP = prefix
        prefix_bias_NxP = jnp.where(prefix_valid_NxP, 0.0, _NEG_INF).astype(jnp.float32)
        out = softmax_attention.attend_after_prefix(
            q_BxKxRxH, k, v, bias_BxTxS, prefix_k, prefix_v, prefix_bias_NxP
        )
    out = out.reshape(b, kv_heads, t, group, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, n, h)


def _attention(q, k, v, *, mask_BxTxS, valid_BxS, impl: str, prefix=None):
    """`mask_BxTxS` is causal & valid keys, the T queries being the last T of the S key slots;
    splash rebuilds it from `valid_BxS` (the valid key slots), and so does cuDNN, for
    self-attention only (T = S, valid-first rows). A shared `prefix` (decode) is XLA's."""
    if impl == "xla":
        return _attention_xla(q, k, v, mask_BxTxS, prefix)
    if impl == "splash":
        return splash.attention(q, k, v, valid_BxS)
    # cuDNN's own causal + padding mask: no T x S bias to read, no bias gradient to write, and
    # the blocks above the diagonal are skipped. A boolean `mask=` would become both.
    lengths_B = jnp.sum(valid_BxS, axis=1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        query_seq_lengths=lengths_B,
        key_value_seq_lengths=lengths_B,
        implementation="cudnn",
    )


def check_shared_prompt_attention(config: ModelConfig) -> None:
    """The shared-prompt forward's completions attend to their prompt's keys, then their own:
    einsum or splash attention take that; cuDNN's kernel takes self-attention only."""
    if config.attention_impl == "cudnn":
        raise ValueError(
            "TrainConfig.shared_prompt_forward takes einsum or splash attention, not "
            "attention_impl='cudnn' (self-attention only): set 'xla' or 'auto', or turn it off"
        )


def _resolve_attention_impl(impl: str) -> str:
    if impl == "auto":  # cuDNN stays opt-in until timed on a GPU (BUILD_NOTES)
        return "splash" if splash.target_platform() == "tpu" else "xla"
    return impl


def _valid_first_order(valid_BxT: jax.Array) -> jax.Array:
    """Per row, the slots holding real tokens in their order, then the padding slots.

    Gathering a row by it keeps causal order among real tokens (positions travel with their
    tokens), so "causal among valid slots" becomes cuDNN's causal mask over a prefix of
    `sum(valid)` slots, whatever the padding pattern (left-padded prompts, right-padded
    completions).
    """
    return jnp.argsort(~valid_BxT, axis=1, stable=True)


def _layer(
    config: ModelConfig,
    inv_freq: np.ndarray,
    x_BxTxD: jax.Array,
    p: Params,
    positions_BxT: jax.Array,
    attend,
    cache_kv: tuple[jax.Array, jax.Array] | None,
    write_index: jax.Array,
):
    """One pre-norm transformer block. Returns the new residual stream and this layer's k/v:
    given this layer's cache buffers, the buffers with the new slots written in place.
    `attend(q, k, v)` is the attention with its mask bound."""
    dtype = jnp.dtype(config.dtype)
    # The weights W + s A B, if LoRA adapters are attached; their gradient path per projection.
    p, adapters = lora.layer_weights(p, config.lora)
    w = jax.tree.map(lambda a: a.astype(dtype), p)

    def project(spec: str, x: jax.Array, name: str) -> jax.Array:
        y = jnp.einsum(spec, x, w[name])
        if name in adapters:
            y = y + lora.gradient_path(x, adapters[name], config.lora.scale)
        return y

    h = rms_norm(x_BxTxD, w["attn_norm"], config.rms_norm_eps)
    q = project("btd,dnh->btnh", h, "q")
    k = project("btd,dkh->btkh", h, "k")
    v = project("btd,dkh->btkh", h, "v")
    if config.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if config.qk_norm:
        q = rms_norm(q, w["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], config.rms_norm_eps)
    q = apply_rope(q, positions_BxT, inv_freq)
    k = apply_rope(k, positions_BxT, inv_freq)
    if cache_kv is not None:
        cache_k, cache_v = cache_kv
        zero = jnp.zeros((), jnp.int32)
        k = jax.lax.dynamic_update_slice(
            cache_k, k.astype(cache_k.dtype), (zero, write_index, zero, zero)
        )
        v = jax.lax.dynamic_update_slice(
            cache_v, v.astype(cache_v.dtype), (zero, write_index, zero, zero)
        )
    attn = attend(q, k, v)
    x_BxTxD = x_BxTxD + project("btnh,nhd->btd", attn, "o")
    h = rms_norm(x_BxTxD, w["mlp_norm"], config.rms_norm_eps)
    gated = jax.nn.silu(project("btd,df->btf", h, "gate")) * project("btd,df->btf", h, "up")
    x_BxTxD = x_BxTxD + project("btf,fd->btd", gated, "down")
    return x_BxTxD, (k, v)


def _remat_policy(config: ModelConfig):
    if config.remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None


def unstack_layers(params: Params) -> Params:
    """Params with `"layers"` split into a tuple of per-layer dicts, for `forward` to unroll.

    Call it once outside a decode loop: inside `lax.while_loop`, scanning stacked weights copies
    each layer's slice on every step, while per-layer arrays are read in place.
    """
    layers = params["layers"]
    if not isinstance(layers, dict):
        raise ValueError(f"params['layers'] is already unstacked ({type(layers).__name__})")
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    per_layer = tuple(jax.tree.map(operator.itemgetter(i), layers) for i in range(num_layers))
    return {**params, "layers": per_layer}


def _over_layers(body, carry, layers: Params | tuple[Params, ...]):
    """Runs `body(carry, (layer_params, layer_index)) -> (carry, None)` over every layer.

    Stacked params (a dict of [L, ...] arrays) go through `lax.scan`, so compile time does not grow
    with depth; unstacked params (`unstack_layers`) run as an unrolled Python loop.
    """
    if isinstance(layers, dict):
        num_layers = jax.tree.leaves(layers)[0].shape[0]
        carry, _ = jax.lax.scan(body, carry, (layers, jnp.arange(num_layers)))
        return carry
    for i, p in enumerate(layers):
        carry, _ = body(carry, (p, i))
    return carry


def forward(
    params: Params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array,
    valid_BxT: jax.Array,
    *,
    config: ModelConfig,
    cache: KVCache | None = None,
    prefix: KVCache | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder; returns the final-norm hidden states (B,T,D) and the updated cache.

    Without a cache the T slots attend causally among themselves. With a cache the T new tokens
    are written at `cache.index` and attend to every earlier valid slot of the cache; the layers
    then run unrolled over per-layer params (`unstack_layers`, once, outside any decode loop).
    `prefix`, with a cache: a filled cache of N rows, read only, whose valid slots come before
    the cache's own for rows n*B/N ... (n+1)*B/N-1 (a prompt's, for its group of samples; the
    positions are the caller's).
    """
    dtype = jnp.dtype(config.dtype)
    inv_freq = rope_inv_freq(config)
    # Decode attends a long masked cache: it keeps the exact kernel.
    attention_impl = "xla" if cache is not None else _resolve_attention_impl(config.attention_impl)
    if attention_impl == "cudnn":
        order_BxT = _valid_first_order(valid_BxT)
        tokens_BxT, positions_BxT, valid_BxT = (
            _gather_slots(a, order_BxT) for a in (tokens_BxT, positions_BxT, valid_BxT)
        )
    x = params["embed"].astype(dtype)[tokens_BxT]
    t = tokens_BxT.shape[1]
    if cache is None:
        if prefix is not None:
            raise ValueError("prefix extends attention over a cache; pass one")
        key_valid_BxS = valid_BxT
        query_slots = jnp.arange(t)
        write_index = jnp.zeros((), jnp.int32)
    else:
        write_index = cache.index
        key_valid_BxS = jax.lax.dynamic_update_slice(
            cache.valid_BxS, valid_BxT, (jnp.zeros((), jnp.int32), write_index)
        )
        query_slots = write_index + jnp.arange(t)
    key_slots = jnp.arange(key_valid_BxS.shape[1])
    causal_TxS = key_slots[None, :] <= query_slots[:, None]
    mask_BxTxS = causal_TxS[None] & key_valid_BxS[:, None]

    attend = functools.partial(
        _attention, mask_BxTxS=mask_BxTxS, valid_BxS=valid_BxT, impl=attention_impl
    )
    layer_fn = functools.partial(_layer, config, inv_freq)
    if cache is None:

        def body(x, layer_in):
            p, _ = layer_in
            x, _ = layer_fn(x, p, positions_BxT, attend, None, write_index)
            return x, None

        if config.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(config), prevent_cse=False)
        x = _over_layers(body, x, params["layers"])
        new_cache = None
    else:
        if isinstance(params["layers"], dict):
            raise ValueError("forward with a cache needs per-layer params: unstack_layers(params)")
        k_layers, v_layers = [], []
        for i, (p, *layer_cache) in enumerate(
            zip(params["layers"], cache.k_layers, cache.v_layers, strict=True)
        ):
            layer_attend = attend
            if prefix is not None:
                layer_prefix = (prefix.k_layers[i], prefix.v_layers[i], prefix.valid_BxS)
                layer_attend = functools.partial(attend, prefix=layer_prefix)
            x, (k, v) = layer_fn(x, p, positions_BxT, layer_attend, layer_cache, write_index)
            k_layers.append(k)
            v_layers.append(v)
        new_cache = KVCache(
            k_layers=tuple(k_layers),
            v_layers=tuple(v_layers),
            valid_BxS=key_valid_BxS,
            index=write_index + t,
        )
    if attention_impl == "cudnn":  # back to the caller's slots
        x = _gather_slots(x, jnp.argsort(order_BxT, axis=1))
    hidden = rms_norm(x, params["final_norm"].astype(dtype), config.rms_norm_eps)
    return hidden, new_cache


def _gather_slots(a_BxT: jax.Array, index_BxT: jax.Array) -> jax.Array:
    """`a[b, index[b, t]]` for arrays of shape (B, T, ...)."""
    index = index_BxT.reshape(index_BxT.shape + (1,) * (a_BxT.ndim - 2))
    return jnp.take_along_axis(a_BxT, index, axis=1)


def unembed_matrix(params: Params, config: ModelConfig) -> jax.Array:
    """The (D, V) output projection: the embedding's transpose when tied."""
    if config.tie_word_embeddings:
        return params["embed"].T
    return params["lm_head"]


def logits(params: Params, hidden_BxTxD: jax.Array, *, config: ModelConfig) -> jax.Array:
    """Full-vocabulary fp32 logits. Only for short T (decode, tests): see `token_logprobs`."""
    return unembed(hidden_BxTxD, unembed_matrix(params, config))


def unembed(hidden_BxTxD: jax.Array, unembed_DxV: jax.Array) -> jax.Array:
    """fp32 logits from hidden states and an output projection (`unembed_matrix`)."""
    return einsum_f32_out("btd,dv->btv", hidden_BxTxD, unembed_DxV.astype(hidden_BxTxD.dtype))


def token_logprobs(
    params: Params,
    hidden_BxTxD: jax.Array,
    targets_BxT: jax.Array,
    *,
    config: ModelConfig,
    temperature: float = 1.0,
    chunk: int = 128,
    kept_BxTxK: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """log p(target) and the entropy of softmax(logits / temperature), both fp32, per position;
    with `kept_BxTxK`, of that softmax over each position's kept ids alone (the top-k / top-p
    set the sampler drew from; ids out of the vocabulary's range pad it: DeepSeek-V3.2's keep
    sampling mask, `log_softmax.keep_only`).

    Works over the sequence in chunks under `jax.checkpoint`, so the (B, T, V) fp32 logits never
    exist at once, neither forward nor backward; the backward recomputes a chunk's logits but
    keeps its row statistics (models/log_softmax.py).
    """
    b, t, d = hidden_BxTxD.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    hidden = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk
    hidden_NxBxCxD = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    targets_NxBxC = targets.reshape(b, n, chunk).swapaxes(0, 1)
    if kept_BxTxK is None:  # no ids: the whole vocabulary
        kept_BxTxK = jnp.zeros((b, t, 0), jnp.int32)
    k = kept_BxTxK.shape[2]
    kept = jnp.pad(kept_BxTxK, ((0, 0), (0, pad), (0, 0)))
    kept_NxBxCxK = kept.reshape(b, n, chunk, k).swapaxes(0, 1)

    # On a context mesh (grpo.train sets one) the projection is split over the vocabulary and
    # each chunk's log-softmax runs vocabulary-parallel (models/vocab_parallel.py). With its
    # model dimension split, every chunk gathered the whole matrix and summed its whole gradient
    # across devices (BUILD_NOTES, the v6e-8 update compile).
    unembed_DxV = unembed_matrix(params, config)
    split = vocab_parallel.vocab_axes(config.vocab_size) is not None
    if split:  # laid out once here, not per chunk by the shard_map
        unembed_DxV = sharding.constrain(unembed_DxV, (None, "unembed_vocab"))
    scaled_logits = lambda h, w: unembed(h, w) / temperature

    @functools.partial(jax.checkpoint, policy=log_softmax.SAVE_ROW_STATS)
    def one_chunk(h_BxCxD, y_BxC, kept_BxCxK):
        if split:
            return vocab_parallel.logprobs_and_entropy(
                h_BxCxD, y_BxC, unembed_DxV, scaled_logits, kept_BxCxK
            )
        z = log_softmax.keep_only(scaled_logits(h_BxCxD, unembed_DxV), kept_BxCxK)
        return log_softmax.target_logprob_and_entropy(z, y_BxC)

    logp_NxBxC, entropy_NxBxC = jax.lax.map(
        lambda xs: one_chunk(*xs), (hidden_NxBxCxD, targets_NxBxC, kept_NxBxCxK)
    )
    logp = logp_NxBxC.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    entropy = entropy_NxBxC.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return logp, entropy


def positions_from_mask(valid_BxT: jax.Array) -> jax.Array:
    """Position ids that skip padding: 0 at each sequence's first real token."""
    return jnp.maximum(jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1, 0)


def _causal(queries: int, keys: int) -> jax.Array:
    """[T, S] bool: queries in the last T of S slots, each seeing itself and earlier slots."""
    return jnp.arange(keys)[None, :] <= jnp.arange(keys - queries, keys)[:, None]


def forward_shared_prompts(
    params: Params,
    prompt_NxP: jax.Array,
    prompt_valid_NxP: jax.Array,
    completion_BxC: jax.Array,
    completion_valid_BxC: jax.Array,
    *,
    config: ModelConfig,
    group: int,
) -> tuple[jax.Array, jax.Array]:
    """`forward` over rows whose prompts repeat: completion rows g*group ... g*group+group-1
    (B = N x group) all continue prompt g. Each prompt runs once, and its completions attend to
    its keys and values; returns the final-norm hidden states of the prompts (N,P,D) and of the
    completions (B,C,D), those of `forward` over the concatenated rows. The gradient reaching a
    prompt is the sum over its group. A completion's keys are its prompt's followed by its own:
    einsum or splash attention (queries the last C of P + C key slots); cuDNN's kernel is
    refused, as it takes self-attention only.
    """
    check_shared_prompt_attention(config)
    impl = _resolve_attention_impl(config.attention_impl)
    dtype = jnp.dtype(config.dtype)
    inv_freq = rope_inv_freq(config)
    p, c = prompt_NxP.shape[1], completion_BxC.shape[1]
    repeat = functools.partial(jnp.repeat, repeats=group, axis=0)
    valid_BxS = jnp.concatenate([repeat(prompt_valid_NxP), completion_valid_BxC], axis=1)
    completion_positions_BxC = positions_from_mask(valid_BxS)[:, p:]
    prompt_positions_NxP = positions_from_mask(prompt_valid_NxP)
    attend_prompt = functools.partial(
        _attention,
        mask_BxTxS=_causal(p, p)[None] & prompt_valid_NxP[:, None, :],
        valid_BxS=prompt_valid_NxP,
        impl=impl,
    )
    attend_completion = functools.partial(
        _attention,
        mask_BxTxS=_causal(c, p + c)[None] & valid_BxS[:, None, :],
        valid_BxS=valid_BxS,
        impl=impl,
    )
    layer_fn = functools.partial(_layer, config, inv_freq)
    prompt_end = jnp.asarray(p, jnp.int32)

    def body(carry, layer_in):
        x_prompt, x_completion = carry
        w, _ = layer_in
        x_prompt, prompt_kv = layer_fn(
            x_prompt, w, prompt_positions_NxP, attend_prompt, None, jnp.zeros((), jnp.int32)
        )
        # Each completion's keys and values: its prompt's, then its own (written at slot P).
        pad = ((0, 0), (0, c), (0, 0), (0, 0))
        kv = tuple(jnp.pad(repeat(a), pad) for a in prompt_kv)
        x_completion, _ = layer_fn(
            x_completion, w, completion_positions_BxC, attend_completion, kv, prompt_end
        )
        return (x_prompt, x_completion), None

    if config.remat != "none":
        body = jax.checkpoint(body, policy=_remat_policy(config), prevent_cse=False)
    embed = params["embed"].astype(dtype)
    x = _over_layers(body, (embed[prompt_NxP], embed[completion_BxC]), params["layers"])
    norm = lambda h: rms_norm(h, params["final_norm"].astype(dtype), config.rms_norm_eps)
    return norm(x[0]), norm(x[1])


def completion_logprobs(
    params: Params,
    prompt_BxP: jax.Array,
    prompt_valid_BxP: jax.Array,
    completion_BxC: jax.Array,
    completion_valid_BxC: jax.Array,
    *,
    config: ModelConfig,
    temperature: float = 1.0,
    chunk: int = 128,
    prompt_group: int = 1,
    kept_BxCxK: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The trainer's recomputation: log-probs and entropies of each completion token (B, C),
    over each token's `kept_BxCxK` ids alone when given (`token_logprobs`).

    Prompts are left-padded, completions right-padded; token c of the completion is predicted by
    the hidden state of the slot just before it. With `prompt_group` = G > 1 the prompts hold
    one row per G consecutive completions (B/G rows), and each runs once
    (`forward_shared_prompts`).
    """
    if prompt_group > 1:
        hidden_prompt, hidden_completion = forward_shared_prompts(
            params,
            prompt_BxP,
            prompt_valid_BxP,
            completion_BxC,
            completion_valid_BxC,
            config=config,
            group=prompt_group,
        )
        last_prompt_slot = jnp.repeat(hidden_prompt[:, -1:], prompt_group, axis=0)
        hidden_BxCxD = jnp.concatenate([last_prompt_slot, hidden_completion[:, :-1]], axis=1)
    else:
        tokens = jnp.concatenate([prompt_BxP, completion_BxC], axis=1)
        valid = jnp.concatenate([prompt_valid_BxP, completion_valid_BxC], axis=1)
        hidden, _ = forward(params, tokens, positions_from_mask(valid), valid, config=config)
        p, c = prompt_BxP.shape[1], completion_BxC.shape[1]
        hidden_BxCxD = jax.lax.dynamic_slice_in_dim(hidden, p - 1, c, axis=1)
    return token_logprobs(
        params,
        hidden_BxCxD,
        completion_BxC,
        config=config,
        temperature=temperature,
        chunk=chunk,
        kept_BxTxK=kept_BxCxK,
    )
