"""Low-rank adapters (LoRA): train `A` and `B` on a frozen base, each targeted weight acting as
W + (alpha / rank) A B.

The adapters are their own pytree, `{"layers": {"lora": {target: {"a": [L, *in, r],
"b": [L, r, *out]}}}}`, so the optimizer, the checkpoint and the gradient see only them;
`attach` grafts them onto the frozen base for a forward pass. The forward merges each layer's
weights as it reaches the layer (`merge_layer`), and the sampler merges every layer once before
decoding (`merge`): both then run on the same effective weights, so the log-probs the sampler
records are the trainer's.

The gradient does not flow through the merged weights, which would form every targeted
weight's full-size gradient x^T dy (full fine-tuning's FLOPs): `layer_weights` holds them
constant, and each targeted projection adds `gradient_path`, zero in value with the
derivative of s (x A) B. The forward stays the merged one, and the adapters get the same
gradient through rank-r products only.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from grpo.models.config import LORA_TARGETS, LoraConfig

Params = Any


def _factors(base: tuple, target: str, rank_entry: Any) -> dict[str, tuple]:
    """A's and B's entries (axis names or sizes) from a stacked weight's: [L, *in, *out] ->
    A [L, *in, r], B [L, r, *out]."""
    layer, split = base[0], 1 + LORA_TARGETS[target]
    return {"a": (layer, *base[1:split], rank_entry), "b": (layer, rank_entry, *base[split:])}


def adapter_axes(layer_axes: dict[str, tuple], lora: LoraConfig) -> Params:
    """Logical axes of the adapters, from the base layer's (`transformer.logical_axes(...)[
    "layers"]`); the rank axis is replicated."""
    return {"layers": {"lora": {t: _factors(layer_axes[t], t, None) for t in lora.targets}}}


def adapter_shapes(layer_shapes: dict[str, tuple], lora: LoraConfig) -> Params:
    return {"layers": {"lora": {t: _factors(layer_shapes[t], t, lora.rank) for t in lora.targets}}}


def init_adapters(layer_shapes: dict[str, tuple], lora: LoraConfig, rng: jax.Array) -> Params:
    """PEFT's initialisation, in fp32: A uniform in +-1/sqrt(fan_in) (kaiming-uniform with
    a = sqrt(5)), B zero, so the adapted model starts as the base model."""
    shapes = adapter_shapes(layer_shapes, lora)["layers"]["lora"]
    keys = jax.random.split(rng, len(lora.targets))
    adapters = {}
    for key, target in zip(keys, lora.targets, strict=True):
        a_shape, b_shape = shapes[target]["a"], shapes[target]["b"]
        bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
        adapters[target] = {
            "a": jax.random.uniform(key, a_shape, jnp.float32, -bound, bound),
            "b": jnp.zeros(b_shape, jnp.float32),
        }
    return {"layers": {"lora": adapters}}


def attach(base: Params | None, trainable: Params) -> Params:
    """The model's params: the adapters grafted onto the frozen base. Without a base (full
    fine-tuning) the trainable tree is the whole model."""
    if base is None:
        return trainable
    return {**base, "layers": {**base["layers"], **trainable["layers"]}}


def merge_layer(p: Params, lora: LoraConfig | None) -> Params:
    """One layer's (or, under vmap, every layer's) params with its adapters folded into the
    targeted weights, in fp32; params without adapters are returned as they are."""
    if "lora" not in p:
        return p
    if lora is None:
        raise ValueError("params carry LoRA adapters but the model config has lora=None")
    merged = {name: value for name, value in p.items() if name != "lora"}
    for target, factors in p["lora"].items():
        delta = _low_rank_product(factors["a"], factors["b"])
        merged[target] = merged[target].astype(jnp.float32) + lora.scale * delta
    return merged


def layer_weights(p: Params, lora: LoraConfig | None) -> tuple[Params, Params]:
    """One layer's merged weights for the trainer (`merge_layer`; the targeted ones held constant
    for autodiff) and its adapters ({} without): their gradient comes from `gradient_path`."""
    adapters = p.get("lora", {})
    merged = merge_layer(p, lora)
    held = {k: jax.lax.stop_gradient(v) if k in adapters else v for k, v in merged.items()}
    return held, adapters


def gradient_path(x: jax.Array, factors: Params, scale: float) -> jax.Array:
    """Zero, with the gradient of s (x A) B in A and B (none in x): added to the output of
    x [..., *in] times a merged weight [*in, *out] held constant, it gives the adapters their
    gradient without the weight-sized one. Runs in x's dtype."""
    a = factors["a"].astype(x.dtype)
    b = factors["b"].astype(x.dtype)
    in_ndim = a.ndim - 1
    xa = _rows_times(jax.lax.stop_gradient(x), a.reshape(-1, a.shape[-1]), in_ndim)
    zero = _zero_product(xa, b.reshape(b.shape[0], -1))
    return scale * zero.reshape(*x.shape[:-in_ndim], *b.shape[1:])


@jax.custom_jvp
def _zero_product(xa: jax.Array, b: jax.Array) -> jax.Array:
    """Zeros shaped like xa [..., r] times b [r, n], with that product's derivative: the forward
    computes nothing (XLA drops the added zeros), the backward the two rank-r products."""
    return jnp.zeros((*xa.shape[:-1], b.shape[1]), xa.dtype)


@_zero_product.defjvp
def _zero_product_jvp(primals, tangents):
    (xa, b), (xa_dot, b_dot) = primals, tangents
    return _zero_product(xa, b), _rows_times(xa_dot, b, 1) + _rows_times(xa, b_dot, 1)


def _rows_times(x: jax.Array, m: jax.Array, contract_ndim: int, precision: Any = None) -> jax.Array:
    """x [..., *k] times m [prod(k), n] -> [..., n], written as a matmul with a size-1 batch
    axis: the layer's remat policy saves the outputs of matmuls without batch axes, and would
    hold these products (a weight-sized A B, activation-sized x A) through the backward pass;
    with the axis they are recomputed (tests/models/test_lora.py checks the saved residuals)."""
    lead = x.shape[: x.ndim - contract_ndim]
    x_1xNxK = x.reshape(1, -1, m.shape[0])
    out = jax.lax.dot_general(x_1xNxK, m[None], (((2,), (1,)), ((0,), (0,))), precision=precision)
    return out.reshape(*lead, m.shape[1])


def _low_rank_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """A [*in, r] times B [r, *out] -> [*in, *out], in fp32 at full precision (TPUs default to
    bf16 passes; the rank is small, so is the cost)."""
    b_RxO = b.reshape(b.shape[0], -1).astype(jnp.float32)
    product = _rows_times(a.astype(jnp.float32), b_RxO, 1, jax.lax.Precision.HIGHEST)
    return product.reshape(*a.shape[:-1], *b.shape[1:])


def merge(params: Params, lora: LoraConfig | None) -> Params:
    """Full params (stacked layers) with every layer's adapters folded in: what the sampler
    decodes with and what an export writes."""
    if "lora" not in params["layers"]:
        return params
    return {**params, "layers": jax.vmap(lambda p: merge_layer(p, lora))(params["layers"])}
