"""Checkpointer: exact round trip, retention, sharded restore, and crash safety of a save."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from grpo.checkpoint import Checkpointer, CheckpointMismatch
from grpo.types import TrainState

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_state(seed: int = 0) -> TrainState:
    """A TrainState after one adamw update, so mu/nu/count are non-trivial."""
    k_w, k_e, k_rng = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w_DxF": jax.random.normal(k_w, (8, 4), jnp.float32),
        "embed_VxD": jax.random.normal(k_e, (16, 8), jnp.float32).astype(jnp.bfloat16),
        "b_F": jnp.arange(4, dtype=jnp.float32),
    }
    tx = optax.adamw(1e-2, weight_decay=1e-4)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return TrainState(step=jnp.int32(1), params=params, opt_state=opt_state, rng=k_rng)


def _abstract(state: TrainState) -> TrainState:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _host_bytes(state: TrainState) -> list[tuple[str, bytes]]:
    """Every leaf as (dtype, raw bytes); typed keys via their key data."""

    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return (f"key:{jax.random.key_impl(x)}", np.asarray(jax.random.key_data(x)).tobytes())
        return (str(x.dtype), np.asarray(x).tobytes())

    return [leaf(x) for x in jax.tree.leaves(state)]


def test_round_trip_is_bitwise_exact_and_survives_donation(tmp_path):
    state = _make_state()
    expected = _host_bytes(state)
    abstract = _abstract(state)
    data = {"epoch": 2, "index": 37, "order_seed": 123}
    meta = {"model": "tiny-qwen2", "nested": {"lr": 1e-6, "tags": ["a", "b"]}}
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(1, state, data=data, meta=meta)
        # The trainer donates the state to the next step right after save() returns.
        jax.tree.map(lambda x: x.delete(), state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(1, abstract)
    assert jax.tree.structure(restored.state) == jax.tree.structure(abstract)
    assert isinstance(restored.state, TrainState)
    assert isinstance(restored.state.opt_state[0], optax.ScaleByAdamState)
    assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)
    assert _host_bytes(restored.state) == expected
    assert restored.data == data
    assert restored.meta == meta


def test_reference_params_travel_only_when_saved_and_asked_for(tmp_path):
    state = _make_state()
    ref = _make_state(seed=1).params
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)  # a run that keeps its reference fixed saves none
        ckpt.save(2, state, ref=ref)
        assert ckpt.restore(1, _abstract(state), _abstract(ref)).ref is None
        assert ckpt.restore(2, _abstract(state)).ref is None  # not asked for
        restored = ckpt.restore(2, _abstract(state), _abstract(ref))
    assert _host_bytes(restored.ref) == _host_bytes(ref)
    assert _host_bytes(restored.state) == _host_bytes(state)


def test_interval_max_to_keep_and_forced_save(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2, async_save=False) as ckpt:
        saved = [step for step in range(1, 8) if ckpt.save(step, state)]
        assert saved == [2, 4, 6]
        assert ckpt.all_steps() == [4, 6]
        assert ckpt.save(7, state, force=True)
        assert not ckpt.save(7, state, force=True)  # SIGTERM right after a save: no error
        assert ckpt.latest_step() == 7
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["6", "7"]
    with Checkpointer(tmp_path) as reopened:
        assert reopened.all_steps() == [6, 7]


def test_empty_directory_has_no_latest_step(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(None, _abstract(_make_state()))
        with pytest.raises(FileNotFoundError, match="step 3"):
            ckpt.restore(3, _abstract(_make_state()))


_OTHER_LAYOUTS = pytest.mark.parametrize(
    "params",
    [
        {"w_DxF": jnp.zeros((8, 5)), "embed_VxD": jnp.zeros((16, 8)), "b_F": jnp.zeros(4)},  # shape
        {"lora": {"w": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 4))}}},  # tree: LoRA adapters
        {"w_DxF": jnp.zeros((8, 4)), "embed_VxD": jnp.zeros((16, 8))},  # a leaf fewer
    ],
    ids=["shape", "tree", "subset"],
)


@_OTHER_LAYOUTS
def test_restoring_onto_another_layout_says_why_in_one_line(tmp_path, params):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, _make_state(), force=True)
    other = _make_state().replace(params=params, opt_state=optax.adamw(1e-2).init(params))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(
            CheckpointMismatch, match="step 1 .* does not fit this run's state"
        ) as error:
            ckpt.restore(None, _abstract(other))
        with pytest.raises(
            CheckpointMismatch, match=r"step 1 .* saved .*, this run"
        ) as params_error:
            ckpt.restore_params(None, _abstract(params))
    assert "\n" not in str(error.value) and "\n" not in str(params_error.value)


def test_params_restore_alone_whatever_optimizer_wrote_them(tmp_path):
    # Eval and export read the policy only: adamw's moments stay on disk, unread, and a run
    # configured with another optimizer (or none) gets the same params and step.
    state = _make_state().replace(step=jnp.int32(6))
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, state, force=True)
        params, updates = ckpt.restore_params(None, _abstract(state.params))
        with pytest.raises(FileNotFoundError, match=r"step 4 .*available: \[3\]"):
            ckpt.restore_params(4, _abstract(state.params))
    assert updates == 6
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    assert _host_bytes(params) == _host_bytes(state.params)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="save_interval_steps"):
        Checkpointer("/tmp/unused", save_interval_steps=0)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer("/tmp/unused", max_to_keep=0)


def test_restore_places_arrays_with_requested_shardings(tmp_path):
    state = _make_state()  # saved from single-device arrays
    expected = _host_bytes(state)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("dp", "fsdp", "tp"))
    param_specs = {"w_DxF": P("fsdp", "tp"), "embed_VxD": P(("dp", "fsdp"), "tp"), "b_F": P()}

    def spec_for(path, _):
        names = [getattr(k, "key", None) for k in path]
        return next((param_specs[n] for n in names if n in param_specs), P())

    specs = jax.tree_util.tree_map_with_path(spec_for, state)
    abstract = jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        jax.eval_shape(lambda: state),
        specs,
    )
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, force=True)
        restored = ckpt.restore(1, abstract).state
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True):
        assert got.sharding == want.sharding
    mu_w = restored.opt_state[0].mu["w_DxF"]
    assert mu_w.sharding.spec == P("fsdp", "tp")
    assert len(mu_w.addressable_shards) == 8 and mu_w.addressable_shards[0].data.shape == (4, 2)
    assert _host_bytes(restored) == expected


def test_half_written_tmp_dir_is_ignored_and_cleaned(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, data={"index": 2}, force=True)
    junk = tmp_path / "3.orbax-checkpoint-tmp"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "_METADATA").write_text("{truncated")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        restored = ckpt.restore(None, _abstract(state))
        assert restored.data == {"index": 2}
        assert _host_bytes(restored.state) == _host_bytes(state)
        assert not junk.exists()
        assert ckpt.save(3, state, force=True)
        assert ckpt.all_steps() == [2, 3]


def test_a_read_only_checkpointer_leaves_a_writers_files_alone(tmp_path):
    # Eval and export read beside a run that may be saving: its save in flight must survive.
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, force=True)
    in_flight = tmp_path / "3.orbax-checkpoint-tmp"
    (in_flight / "state").mkdir(parents=True)
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.all_steps() == [2]
        params, _ = reader.restore_params(None, _abstract(state.params))
        with pytest.raises(RuntimeError, match="opened read-only"):
            reader.save(3, state, force=True)
    assert in_flight.exists() and sorted(os.listdir(tmp_path)) == ["2", in_flight.name]
    assert _host_bytes(params) == _host_bytes(state.params)
    with Checkpointer(tmp_path / "absent", read_only=True) as reader:
        assert reader.latest_step() is None
    assert not (tmp_path / "absent").exists()


def test_a_reader_finds_a_step_committed_after_it_listed_them(tmp_path):
    # A multi-host eval restores the steps process 0 listed; another process's reader may have
    # listed the folder just before the writer committed one of them.
    state = _make_state()
    with Checkpointer(tmp_path) as writer:
        writer.save(1, state, force=True)
        with Checkpointer(tmp_path, read_only=True) as reader:
            assert reader.all_steps() == [1]
            writer.save(2, state.replace(step=jnp.int32(2)), force=True)
            _, updates = reader.restore_params(2, _abstract(state.params))
            with pytest.raises(FileNotFoundError, match=r"step 3 .*available: \[1, 2\]"):
                reader.restore_params(3, _abstract(state.params))
    assert updates == 2


_KILLED_SAVE = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from grpo.checkpoint import Checkpointer
    from tests.test_checkpoint import _make_state

    async def die(self, *args, **kwargs):  # data is on disk, the commit rename never happens
        os._exit(17)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(2, _make_state(seed=9).replace(step=jnp.int32(2)), force=True)
    """
)


def test_process_killed_mid_save_leaves_last_good_checkpoint(tmp_path):
    state = _make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, data={"index": 1}, force=True)
    env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)],
        env=env,
        cwd=_REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert any(".orbax-checkpoint-tmp" in p for p in os.listdir(tmp_path))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored = ckpt.restore(None, _abstract(state))
        assert restored.data == {"index": 1}
        assert _host_bytes(restored.state) == _host_bytes(state)
