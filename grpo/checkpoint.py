"""Checkpoints over orbax: TrainState + data-stream position + run metadata, atomic and resumable.

One checkpoint step holds these orbax items:
  state: the TrainState pytree (step, params, optax opt_state, typed PRNG key), sharded arrays
  data:  JSON dict, the data stream position (so a resume sees the same next batch)
  meta:  JSON dict, free-form run facts (model name, config hash, ...)
  ref:   the KL reference's params, only when the run moves its reference (ref sync)

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
directory left by a killed save is never listed as a step; `cleanup_tmp_directories` removes it
the next time a Checkpointer opens the directory. Every process must call `save` / `restore`
(orbax coordinates which host writes what).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from grpo.types import TrainState

_ITEMS = ("state", "data", "meta", "ref")


def _read_only_options() -> ocp.CheckpointManagerOptions:
    """Save nothing, create nothing, clean up nothing (orbax warns of any other option set).
    A new object each time: a manager fills in its options."""
    return ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)


class Restored(NamedTuple):
    state: TrainState
    data: dict[str, Any]
    meta: dict[str, Any]
    ref: Any = None  # the saved reference params, when asked for and saved


class CheckpointMismatch(ValueError):
    """A checkpoint on disk does not fit the run's state (another model, LoRA or optimizer)."""


class Checkpointer:
    """Saves every `save_interval_steps` steps, keeps the newest `max_to_keep` (None: all).

    With `async_save` (orbax's default) `save` returns once device arrays are copied to host;
    the files are written in a background thread, so the caller may donate the state buffers to
    the next step right away. `force=True` saves regardless of the interval and blocks until the
    checkpoint is committed (the SIGTERM path).

    `read_only` opens the directory for eval and export, which may run beside the training that
    writes it: nothing is created or deleted there (a writer's cleanup would remove the other
    process's save in flight), and `save` refuses.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_interval_steps: int = 1,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        directory = os.fspath(directory)
        # Orbax wants an absolute path; leave remote URLs (gs://...) untouched.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.read_only = read_only
        if read_only:
            self._manager = ocp.CheckpointManager(
                self.directory, item_names=_ITEMS, options=_read_only_options()
            )
            return
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Orbax's default policy also saves the first step it sees; we want step % N == 0
            # only (plus orbax's multi-host preemption saves).
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_interval_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)

    def latest_step(self) -> int | None:
        """The newest step (an async save still in flight counts; on disk only committed steps
        are listed when a Checkpointer opens the directory), or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self, reload: bool = False) -> list[int]:
        """The saved steps, oldest first, as listed when this Checkpointer opened the directory;
        `reload`: as on disk now (another process, a run training there or a peer, may have
        committed or deleted one since)."""
        if reload:
            self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        ref: Any = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (and `ref`, the reference params, unless None) as `step` if the
        interval says so (or `force`); returns whether it did.

        A step that is already saved is skipped, so a forced save on SIGTERM right after a
        periodic save of the same step is harmless.
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        if step in self._manager.all_steps():
            return False
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data or {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        if ref is not None:
            items["ref"] = ocp.args.StandardSave(ref)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if force:
            self._manager.wait_until_finished()
        return saved

    def restore(self, step: int | None, abstract_state: Any, abstract_ref: Any = None) -> Restored:
        """Restores `step` (None: the latest) onto the structure, dtypes and shardings of
        `abstract_state`: a TrainState of `jax.ShapeDtypeStruct` with `.sharding` set (from
        `jax.eval_shape` + the trainer's shardings) or of concrete arrays. A leaf without a
        sharding gets the one recorded at save time. With `abstract_ref`, also the saved
        reference params onto it (`ref` stays None when the step saved none).
        """
        step = self._existing_step(step)
        items = dict(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        if abstract_ref is not None and "ref" in self._manager.item_metadata(step):
            items["ref"] = ocp.args.StandardRestore(abstract_ref)
        restored = _restore_or_explain(
            self._manager, step, items, "another model, LoRA, optimizer or entropy control setting"
        )
        ref = restored.ref if "ref" in items else None
        return Restored(state=restored.state, data=restored.data, meta=restored.meta, ref=ref)

    def restore_params(self, step: int | None, abstract_params: Any) -> tuple[Any, int]:
        """(params, update count) of `step` (None: the latest), the params onto
        `abstract_params` as `restore` places them. Nothing else of the state is read, so the
        optimizer that wrote it does not matter (eval and export need only the policy)."""
        step = self._existing_step(step)
        hint = "another model or LoRA setting"
        # A reader of its own that handles "state" as a plain pytree, which can restore part
        # of it; our manager binds it to the standard handler, which cannot. It never saves.
        reader = ocp.CheckpointManager(
            self.directory,
            item_handlers=dict(
                state=ocp.PyTreeCheckpointHandler(),
                data=ocp.JsonCheckpointHandler(),
                meta=ocp.JsonCheckpointHandler(),
                ref=ocp.PyTreeCheckpointHandler(),
            ),
            options=_read_only_options(),
        )
        try:
            on_disk = reader.item_metadata(step).state["params"]
            if (difference := _layout_difference(on_disk, abstract_params)) is not None:
                raise CheckpointMismatch(_mismatch(step, self.directory, hint, difference))
            target = {"step": np.zeros((), np.int32), "params": abstract_params}
            state = ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,  # the optimizer state and the key stay on disk
            )
            restored = _restore_or_explain(reader, step, dict(state=state), hint).state
        finally:
            reader.close()
        return restored["params"], int(restored["step"])

    def _existing_step(self, step: int | None) -> int:
        """`step`, or the latest when None; FileNotFoundError when there is no such step."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        elif step not in self._manager.all_steps() and step not in self.all_steps(reload=True):
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (available: {self.all_steps()})"
            )
        return step

    def wait_until_finished(self) -> None:
        """Blocks until every pending async save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _restore_or_explain(
    manager: ocp.CheckpointManager, step: int, items: dict[str, Any], hint: str
) -> Any:
    """`manager`'s restore of `items`; orbax's error for a layout it cannot restore onto
    (another tree structure, shape or dtype on disk) becomes a one-line CheckpointMismatch."""
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
        first_line = str(e).strip().splitlines()[0]
        raise CheckpointMismatch(_mismatch(step, manager.directory, hint, first_line)) from e


def _mismatch(step: int, directory: str, hint: str, detail: str) -> str:
    return (
        f"checkpoint step {step} in {directory} does not fit this run's state (written with "
        f"{hint}? resume with that config, or use a new workdir): {detail}"
    )


def _layout_difference(on_disk: Any, abstract: Any) -> str | None:
    """The first leaf path whose presence or shape differs between the saved tree's metadata
    and `abstract`; None when they match (a partial restore alone would skip extra leaves)."""
    layout = lambda tree: {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    saved, wanted = layout(on_disk), layout(abstract)
    for path in sorted(saved.keys() | wanted.keys()):
        if saved.get(path) != wanted.get(path):
            return f"params{path}: saved {saved.get(path)}, this run {wanted.get(path)}"
    return None
