"""Schedules (hand-computed values), optimizers by name, weight-decay mask, clip order, gin."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import gin
from grpo import configurables, optim, sharding

NAMES = ["lion", "adamw", "adam", "sgd", "adafactor"]


def _params():
    return {
        "embed": jnp.full((4, 2), 2.0),
        "layers": {"attn_norm": jnp.ones((2, 2)), "q_bias": jnp.ones((2, 3)), "q": jnp.eye(2)},
    }


def _values(schedule, steps):
    return [float(schedule(s)) for s in steps]


LAST_COSINE = 1e-3 * (1 + math.cos(math.pi * 89 / 90)) / 2


# total 100 steps, warmup round(100 * 0.1) = 10 to peak 1e-3, then 90 steps of decay.
@pytest.mark.parametrize(
    "kind, expected",
    [
        # cos decay: step 55 is half-way (1e-3 / 2); step 99: 1e-3 * (1 + cos(pi * 89/90)) / 2.
        ("warmup_cosine", [0.0, 5e-4, 1e-3, 5e-4, LAST_COSINE, 0.0]),
        ("linear", [0.0, 5e-4, 1e-3, 5e-4, 1e-3 / 90, 0.0]),
        ("constant", [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3]),
    ],
)
def test_schedule_values(kind, expected):
    schedule = optim.make_lr_schedule(100, type=kind, peak_value=1e-3, warmup_ratio=0.1)
    got = _values(schedule, [0, 5, 10, 55, 99, 100])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-10)  # fp32 near cos(pi)


def test_schedule_warmup_steps_ends_and_init(caplog):
    caplog.set_level("INFO")
    # Default ratio 0.05 of 100 steps -> 5 warmup steps.
    default = optim.make_lr_schedule(100, peak_value=1.0)
    np.testing.assert_allclose(_values(default, [2, 5]), [0.4, 1.0], rtol=1e-6)
    # Explicit warmup_steps wins over the ratio; init and end values are honoured.
    s = optim.make_lr_schedule(
        20, peak_value=1.0, warmup_steps=4, warmup_ratio=0.5, init_value=0.2, end_value=0.1
    )
    # warmup 0.2 -> 1.0 over 4 steps; cosine 1.0 -> 0.1 over 16 steps (half-way at step 12).
    np.testing.assert_allclose(_values(s, [0, 2, 4, 12, 20]), [0.2, 0.6, 1.0, 0.55, 0.1], rtol=1e-6)
    no_warmup = optim.make_lr_schedule(10, type="linear", peak_value=1.0, warmup_ratio=0.0)
    np.testing.assert_allclose(_values(no_warmup, [0, 5, 10]), [1.0, 0.5, 0.0], atol=1e-7)
    assert "transition_steps" not in caplog.text  # no warmup schedule over 0 steps, no warning


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_steps=0), "total_steps >= 1"),
        (dict(total_steps=10, warmup_steps=11), "warmup_steps=11 must be in"),
        (dict(total_steps=10, warmup_ratio=1.5), "warmup_ratio must be in"),
        (dict(total_steps=10, type="cosine"), "valid: \\['constant', 'linear', 'warmup_cosine'\\]"),
        (dict(total_steps=10, peak_value=-1e-6), "learning rates must be >= 0.*peak_value"),
        (dict(total_steps=10, end_value=-1e-7), "learning rates must be >= 0.*end_value"),
        (dict(total_steps=10, type="constant", end_value=1e-7), "does not use end_value"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.make_lr_schedule(**kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_steps_and_decays_only_weights(name):
    # Zero gradients: only weight decay moves parameters, and never norm scales or biases.
    tx = optim.make_optimizer(optax.constant_schedule(0.1), name=name, weight_decay=0.5)
    params = _params()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = jax.jit(tx.update)(zeros, state, params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == {"embed": True, "layers": {"attn_norm": False, "q_bias": False, "q": True}}
    # And a real gradient step lowers a quadratic.
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    updates, _ = tx.update(jax.grad(loss)(params), state, params)
    assert loss(optax.apply_updates(params, updates)) < loss(params)


def test_clipping_comes_first():
    # SGD with momentum 0.9, two steps of a huge gradient. Clipped before the momentum, the
    # second update has norm 1 + 0.9 = 1.9; clipping after it would cap the update at 1.
    tx = optim.make_optimizer(1.0, name="sgd", clip_norm=1.0, weight_decay=0.0, momentum=0.9)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 100.0)}
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(float(optax.global_norm(updates)), 1.9, rtol=1e-6)
    unclipped = optim.make_optimizer(1.0, name="sgd", clip_norm=None, weight_decay=0.0)
    updates, _ = unclipped.update(grads, unclipped.init(params), params)
    np.testing.assert_allclose(float(optax.global_norm(updates)), 200.0, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="adamw", b2=1.0), "b1, b2 and momentum must be in \\[0, 1\\).*'b2': 1.0"),
        (dict(name="lion", b1=-0.1), "'b1': -0.1"),
        (dict(name="sgd", momentum=1.0), "'momentum': 1.0"),
        (dict(name="adam", eps=-1e-8), "eps must be >= 0"),
        (dict(name="lion", eps=1e-6), "optimizer 'lion' does not use make_optimizer.eps"),
        (
            dict(name="sgd", b2=0.999, eps=1e-6),
            "optimizer 'sgd' does not use make_optimizer.b2, make_optimizer.eps",
        ),
        (dict(name="adafactor", momentum=0.5), "'adafactor' does not use make_optimizer.momentum"),
        (dict(name="adafactor", mu_dtype="bfloat16"), "does not use make_optimizer.mu_dtype"),
        (dict(name="lion", mu_dtype="float16"), "mu_dtype must be None, 'bfloat16' or 'float32'"),
    ],
)
def test_optimizer_rejects_hyper_parameters_it_cannot_use(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(1e-3, **kwargs)


@pytest.mark.parametrize(
    "name, moments",
    [
        ("lion", ["bfloat16"]),
        ("adamw", ["bfloat16", "float32"]),  # the second moment keeps the params' dtype
        ("adam", ["bfloat16", "float32"]),
        ("sgd", ["bfloat16"]),
    ],
)
def test_a_bfloat16_first_moment_tracks_the_fp32_one(name, moments):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)} for _ in range(3)]
    updates = {}
    for mu_dtype in ("bfloat16", None):
        tx = optim.make_optimizer(1e-2, name=name, weight_decay=0.0, mu_dtype=mu_dtype)
        state = tx.init(params)
        if mu_dtype:
            moment = [str(x.dtype) for x in jax.tree.leaves(state) if x.shape == (64, 32)]
            assert sorted(moment) == moments
        for grad in grads:
            updates[mu_dtype], state = tx.update(grad, state, params)
    narrow, wide = updates["bfloat16"]["w"], updates[None]["w"]
    if name == "lion":  # a sign per weight: only near-ties may flip
        assert np.mean(np.sign(narrow) == np.sign(wide)) > 0.99
    else:  # within bf16's rounding of the moment (2^-8 relative), on the update's scale
        np.testing.assert_allclose(narrow, wide, atol=0.01 * np.abs(wide).max())


def test_unknown_optimizer_lists_valid_names():
    valid = "valid: \\['adafactor', 'adam', 'adamw', 'lion', 'sgd'\\]"
    with pytest.raises(ValueError, match=valid):
        optim.make_optimizer(1e-3, name="adagrad")
    with pytest.raises(ValueError, match="clip_norm must be positive"):
        optim.make_optimizer(1e-3, clip_norm=0.0)


def _state_types(tx):
    leaves = jax.tree.leaves(tx.init(_params()), is_leaf=lambda x: hasattr(x, "_fields"))
    return {type(x).__name__ for x in leaves}


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_gin_binding_changes_the_optimizer(clean_gin):
    assert "ScaleByLionState" in _state_types(configurables.make_optimizer(1e-3))
    gin.parse_config("make_optimizer.name = 'adamw'")
    types = _state_types(configurables.make_optimizer(1e-3))
    assert "ScaleByAdamState" in types and "ScaleByLionState" not in types
    gin.parse_config("make_lr_schedule.type = 'constant'\nmake_lr_schedule.warmup_ratio = 0.0")
    assert float(configurables.make_lr_schedule(10)(7)) == pytest.approx(1e-6)


def test_gin_rejects_unknown_binding(clean_gin):
    with pytest.raises(ValueError, match="doesn't have a parameter named 'nmae'"):
        gin.parse_config("make_optimizer.nmae = 'adamw'")


@pytest.mark.eight_devices
@pytest.mark.parametrize("name", NAMES)
def test_optimizer_state_is_sharded_like_the_params(name):
    mesh = sharding.make_mesh(dp=1, fsdp=-1, tp=1)
    by_fsdp = NamedSharding(mesh, PartitionSpec("fsdp"))
    params = {
        "w": jax.device_put(jnp.ones((16, 4)), by_fsdp),
        "b": jax.device_put(jnp.ones(3), NamedSharding(mesh, PartitionSpec())),
    }
    tx = optim.make_optimizer(1e-3, name=name)
    state = optim.init_opt_state(tx, params)
    leaves = jax.tree.leaves(state)
    # No leaf left on one device (a plain jit(tx.init) left all of them on device 0).
    assert all(len(x.sharding.device_set) == 8 for x in leaves)
    momenta = [x for x in leaves if x.shape == (16, 4)]
    assert momenta or name == "sgd"  # each keeps a param-shaped moment (sgd: its trace)
    for x in momenta:
        assert x.sharding.is_equivalent_to(by_fsdp, 2), (name, x.sharding)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
