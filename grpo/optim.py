"""Learning-rate schedules and optimizers, by name (pure; gin registers these in configurables).

Step counting follows optax: the schedule is evaluated at the number of updates applied so far,
so update k (0-based) uses schedule(k); warmup ends at `warmup_steps` and decaying schedules
reach `end_value` at `total_steps` (one past the last update), as Hugging Face schedulers do.

Weight decay is decoupled (AdamW, Lion) or added to the gradient (Adam, SGD) and skips norm
scales and biases, like the Hugging Face Trainer. The rule is by name, not by rank: layer
weights are stacked on a leading `layers` axis, so norm scales are 2-D here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from grpo import sharding


def _cosine(peak: float, end: float, steps: int) -> optax.Schedule:
    steps = max(steps, 1)

    def schedule(count):
        frac = jnp.minimum(count, steps) / steps
        return end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))

    return schedule


# Decay after warmup: (peak, end, steps) -> schedule over the steps after warmup.
_DECAYS: dict[str, Callable[[float, float, int], optax.Schedule]] = {
    "warmup_cosine": _cosine,
    "linear": lambda peak, end, steps: optax.linear_schedule(peak, end, steps),
    "constant": lambda peak, end, steps: optax.constant_schedule(peak),  # end_value refused
}


def make_lr_schedule(
    total_steps: int,
    *,
    type: str = "warmup_cosine",  # shadows the builtin: it is the binding name users write
    peak_value: float = 1e-6,
    warmup_ratio: float = 0.05,
    warmup_steps: int | None = None,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from init_value to peak_value, then `type`'s decay to end_value.

    type: warmup_cosine | linear | constant (stays at peak_value). warmup_steps defaults to
    round(total_steps * warmup_ratio); set warmup_ratio=0 for no warmup.
    """
    if type not in _DECAYS:
        raise ValueError(f"unknown lr schedule type {type!r}; valid: {sorted(_DECAYS)}")
    if total_steps < 1:
        raise ValueError(f"lr schedule needs total_steps >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    rates = dict(peak_value=peak_value, init_value=init_value, end_value=end_value)
    negative = {name: rate for name, rate in rates.items() if rate < 0}
    if negative:  # a negative rate ascends the loss
        raise ValueError(f"learning rates must be >= 0, got {negative}")
    if type == "constant" and end_value:
        raise ValueError("a constant schedule stays at peak_value: it does not use end_value")
    if warmup_steps is None:
        warmup_steps = round(total_steps * warmup_ratio)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    decay = _DECAYS[type](peak_value, end_value, total_steps - warmup_steps)
    if not warmup_steps:  # optax warns of a linear schedule over 0 steps
        return decay
    warmup = optax.linear_schedule(init_value, peak_value, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: everything but norm scales and biases."""

    def decays(path, _) -> bool:
        name = jax.tree_util.keystr(path)
        return "norm" not in name and "bias" not in name

    return jax.tree_util.tree_map_with_path(decays, params)


def _coupled(decay: float, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """L2 weight decay added to the gradient before `inner` (torch Adam/SGD semantics)."""
    if not decay:
        return inner
    return optax.chain(optax.add_decayed_weights(decay, mask=decay_mask), inner)


# name -> builder(learning_rate, *, the hyper-parameters it uses): make_optimizer reads each
# builder's keyword names to hand it its knobs and to refuse the ones it would ignore.
_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "lion": lambda lr, *, b1, b2, weight_decay, mu_dtype: optax.lion(
        lr, b1=b1, b2=b2, mu_dtype=mu_dtype, weight_decay=weight_decay, mask=decay_mask
    ),
    "adamw": lambda lr, *, b1, b2, eps, weight_decay, mu_dtype: optax.adamw(
        lr, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, weight_decay=weight_decay, mask=decay_mask
    ),
    "adam": lambda lr, *, b1, b2, eps, weight_decay, mu_dtype: _coupled(
        weight_decay, optax.adam(lr, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    ),
    "sgd": lambda lr, *, momentum, weight_decay, mu_dtype: _coupled(
        weight_decay, optax.sgd(lr, momentum=momentum or None, accumulator_dtype=mu_dtype)
    ),
    "adafactor": lambda lr, *, weight_decay: optax.adafactor(
        lr, weight_decay_rate=weight_decay or None, weight_decay_mask=decay_mask
    ),
}


def make_optimizer(
    learning_rate: optax.ScalarOrSchedule,
    *,
    name: str = "lion",
    clip_norm: float | None = 1.0,
    weight_decay: float = 1e-8,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.9,
    mu_dtype: str | None = None,
) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) (None: no clipping), then the named optimizer.

    name: lion (b1, b2, weight_decay) | adamw (b1, b2, eps, weight_decay) | adam (b1, b2, eps,
    L2 weight_decay) | sgd (momentum, L2 weight_decay) | adafactor (weight_decay; optax's own
    factored second moments and update clipping). mu_dtype: the dtype of the first moment
    (Lion's whole state, Adam's momentum, SGD's trace), e.g. 'bfloat16' to halve it; None: the
    params' dtype. Adam's second moment stays in the params' dtype.
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(_OPTIMIZERS)}")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if mu_dtype not in (None, "bfloat16", "float32"):
        raise ValueError(f"mu_dtype must be None, 'bfloat16' or 'float32', got {mu_dtype!r}")
    # A decay of 1 never forgets its first value (Adam's bias correction divides by 0).
    decays = dict(b1=b1, b2=b2, momentum=momentum)
    outside = {knob: decay for knob, decay in decays.items() if not 0 <= decay < 1}
    if outside:
        raise ValueError(f"b1, b2 and momentum must be in [0, 1), got {outside}")
    build = _OPTIMIZERS[name]
    knobs = inspect.signature(build).parameters
    hyper = dict(
        b1=b1, b2=b2, eps=eps, momentum=momentum, weight_decay=weight_decay, mu_dtype=mu_dtype
    )
    defaults = inspect.signature(make_optimizer).parameters
    ignored = [k for k, v in hyper.items() if k not in knobs and v != defaults[k].default]
    if ignored:  # set for another optimizer, most likely
        unused = ", ".join(f"make_optimizer.{k}" for k in ignored)
        raise ValueError(f"optimizer {name!r} does not use {unused}")
    optimizer = build(learning_rate, **{k: v for k, v in hyper.items() if k in knobs})
    if clip_norm is None:
        return optimizer
    return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)


def init_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)`, laid out by `opt_state_shardings`."""
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params))(params)


def abstract_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """What `init_opt_state(tx, params)` makes, as ShapeDtypeStructs with their shardings;
    nothing is allocated or compiled. `params` may be abstract."""
    shardings = []
    # optax finds the state's param-shaped leaves by an init on placeholders, which builds its
    # counters eagerly (a compile each); traced here instead.
    jax.eval_shape(lambda: shardings.append(opt_state_shardings(tx, params)))
    return jax.eval_shape(jax.jit(tx.init, out_shardings=shardings[0]), params)


def opt_state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
    """Shardings for `tx.init(params)`: every param-shaped leaf (momenta, second moments) like
    its param, the rest (counts, adafactor's factored moments) replicated over the params' mesh;
    None (let jit decide) for params on no mesh. `params` may be abstract (ShapeDtypeStructs).

    A plain `jax.jit(tx.init)` leaves its zeros on one device (they depend on no input), and
    replicating them from there puts a whole copy of every momentum on each device.
    """
    shardings = jax.tree.map(lambda p: p.sharding, params)
    meshes = {s.mesh for s in jax.tree.leaves(shardings) if isinstance(s, NamedSharding)}
    if not meshes:
        return None
    (mesh,) = meshes
    replicated = sharding.replicated(mesh)
    return optax.tree_map_params(
        tx,
        lambda leaf, param, sharding: sharding if leaf.shape == param.shape else replicated,
        jax.eval_shape(tx.init, params),
        params,
        shardings,
        transform_non_params=lambda _: replicated,
    )
