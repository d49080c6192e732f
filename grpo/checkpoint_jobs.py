"""Eval and export of a run's saved checkpoints (`--eval_only`, `--export_only`): after the run,
or beside it while it trains (`follow_checkpoints`). Each job opens the checkpoints read-only
and restores the policy's params alone, onto the layout the trainer uses; every process reads
the same list of steps, as process 0 sees it. With `TrainConfig.best_export_dir`, an eval job
also exports the best checkpoint it evaluates there.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from grpo import evaluation, gather
from grpo.checkpoint import Checkpointer
from grpo.experiment import Experiment
from grpo.metrics import EVAL_FILE, EvalWriter, eval_reply_lines, read_metrics
from grpo.models import lora
from grpo.train import (
    BestExport,
    abstract_trainable,
    export_policy,
    place_params,
    place_reward_models,
    trainable_and_frozen,
)


def evaluate_workdir(exp: Experiment, workdir: str, step: int | None = None) -> dict[str, Any]:
    """Eval only: the policy of checkpoint `step` in `workdir` (None: the newest, else the
    starting policy as step 0), evaluated as training would; the result is appended to
    `<workdir>/eval.jsonl` (and with `write_eval_completions` the replies to
    eval_completions.jsonl) and returned. Nothing else in the workdir changes."""
    with _eval_job(exp, workdir) as job:
        saved = _saved_steps(job.reader)
        if step is not None or saved:
            step = saved[-1] if step is None else step
            if not (results := _evaluate_steps(exp, job, saved, [step])):
                raise FileNotFoundError(f"checkpoint {step} in {job.reader.directory} was deleted")
            return results[0]
        params, frozen = trainable_and_frozen(exp, place_params(exp.mesh, exp.model, exp.params))
        return _evaluate_policy(exp, job.writer, lora.attach(frozen, params), 0)


def evaluate_checkpoints(
    exp: Experiment, workdir: str, steps: list[int] | None = None
) -> list[dict[str, Any]]:
    """Eval only, checkpoint after checkpoint: `steps` (None: every one in `workdir`, oldest
    first), each as `evaluate_workdir` does it, its line appended as soon as it is done; the
    results in order. A step not there fails before any eval; one that a run training there
    deletes before its turn is skipped, with a warning. One compile serves all; one
    checkpoint's params are in memory at a time."""
    with _eval_job(exp, workdir) as job:
        saved = _saved_steps(job.reader)
        return _evaluate_steps(exp, job, saved, saved if steps is None else steps)


def follow_checkpoints(
    exp: Experiment,
    workdir: str,
    *,
    poll_s: float,
    timeout_s: float,
    wait: Callable[[float], None] = time.sleep,
) -> list[dict[str, Any]]:
    """Eval only, beside the run training in `workdir`: each checkpoint it commits, oldest
    first, evaluated as `evaluate_workdir` does, but for the steps eval.jsonl already holds (a
    restarted follower goes on where it stopped); the results in order. Looks for new ones
    every `poll_s` seconds (`wait`), and returns once the run's last step
    (`TrainConfig.num_steps`) is evaluated, or when `timeout_s` pass without one to evaluate
    (the run died or was stopped). A checkpoint the run deletes first (its
    `checkpoints_to_keep`) is skipped, with a warning."""
    frozen = _frozen_base(exp)
    results = []
    with _eval_job(exp, workdir) as job:
        idle_since, waiting = time.monotonic(), False
        while True:
            idle = time.monotonic() - idle_since >= timeout_s
            action, step = _follow_action(exp, workdir, job.reader, idle)
            if action == _Follow.WAIT:
                if not waiting:  # once per wait, so a quiet follower is seen to be alive
                    logging.info(
                        "waiting for a new checkpoint in %s (every %g s, up to %g s)",
                        job.reader.directory,
                        poll_s,
                        timeout_s,
                    )
                waiting = True
                wait(poll_s)
            elif action == _Follow.EVALUATE:
                if (result := _evaluate_checkpoint(exp, job, step, frozen)) is not None:
                    results.append(result)
                idle_since, waiting = time.monotonic(), False
            else:
                if action == _Follow.TIMED_OUT:
                    logging.warning(
                        "no new checkpoint in %s for %.0f s, and step %d (the last) not "
                        "evaluated: stopped following",
                        job.reader.directory,
                        timeout_s,
                        exp.train.num_steps,
                    )
                return results


def export_workdir(exp: Experiment, workdir: str, export_dir: str, step: int | None = None) -> int:
    """Export only: writes the policy of checkpoint `step` in `workdir` (None: the newest) to
    `export_dir` as training's export would (its step in grpo_export.json); returns the step."""
    with _checkpoint_reader(workdir) as reader:
        saved = _saved_steps(reader)
        step = saved[-1] if step is None and saved else step
        _check_saved(reader, saved, [step])
        params, done = _checkpointed_params(exp, reader, step)
    with jax.set_mesh(exp.mesh):
        export_policy(exp, params, _frozen_base(exp), export_dir, info={"step": done})
    return done


class _Follow(enum.IntEnum):
    """What a follower does next (process 0 decides, for every process)."""

    EVALUATE = 0
    WAIT = 1
    FINISHED = 2
    TIMED_OUT = 3


def _follow_action(
    exp: Experiment, workdir: str, reader: Checkpointer, idle: bool
) -> tuple[_Follow, int]:
    """(action, step): process 0's listing of the checkpoints against its eval.jsonl."""
    action, step = _Follow.WAIT, -1
    if jax.process_index() == 0:
        evaluated = _evaluated_steps(workdir)
        pending = [s for s in reader.all_steps(reload=True) if s not in evaluated]
        if exp.train.num_steps in evaluated:
            action = _Follow.FINISHED
        elif pending:
            action, step = _Follow.EVALUATE, pending[0]
        elif idle:
            action = _Follow.TIMED_OUT
    action, step = gather.from_process_zero([action, step])
    return _Follow(action), step


def _evaluated_steps(workdir: str) -> set[int]:
    path = os.path.join(workdir, EVAL_FILE)
    return {r["step"] for r in read_metrics(path)} if os.path.exists(path) else set()


def _evaluate_steps(
    exp: Experiment, job: _Job, saved: list[int], steps: list[int]
) -> list[dict[str, Any]]:
    _check_saved(job.reader, saved, steps)
    frozen = _frozen_base(exp)
    results = (_evaluate_checkpoint(exp, job, step, frozen) for step in steps)
    return [result for result in results if result is not None]


def _evaluate_checkpoint(
    exp: Experiment, job: _Job, step: int, frozen: Any
) -> dict[str, Any] | None:
    """Checkpoint `step`'s eval (exported if the best), or None when the run writing there
    deleted it first."""
    restored = _restored_unless_deleted(exp, job.reader, step)
    if restored is None:
        return None
    params, done = restored  # freed on return, before the next checkpoint's
    result = _evaluate_policy(exp, job.writer, lora.attach(frozen, params), done)
    with jax.set_mesh(exp.mesh):
        job.best.offer(done, result, params, frozen)
    return result


def _evaluate_policy(exp: Experiment, writer: EvalWriter, policy: Any, done: int) -> dict[str, Any]:
    """`policy` evaluated as GRPO step `done`; written (eval.jsonl, its replies, TensorBoard)."""
    replies: list[dict] = []

    def keep(name: str, records: list[dict]) -> None:
        replies.extend(eval_reply_lines(name, records))

    on_replies = keep if exp.train.write_eval_completions else None
    with jax.set_mesh(exp.mesh):
        metrics = evaluation.evaluate(exp, policy, on_replies)
    writer.write(done, metrics, replies)
    logging.info("eval of step %d: %s", done, metrics)
    return {"step": done, **metrics}


def _restored_unless_deleted(
    exp: Experiment, reader: Checkpointer, step: int
) -> tuple[Any, int] | None:
    """`_checkpointed_params` of `step`, or None (on every process) when a process found it
    deleted: a run keeping its newest few deletes older ones as it saves."""
    try:
        restored, error = _checkpointed_params(exp, reader, step), None
    except Exception as err:  # files gone mid-read fail by the storage's own errors
        restored, error = None, err
    if gather.all_rows(np.array([restored is not None])).all():
        return restored
    if step in _saved_steps(reader, reload=True):  # not deleted: a real failure
        raise error or RuntimeError(f"checkpoint {step} failed to restore on another process")
    logging.warning("checkpoint %d was deleted before its eval; skipped", step)
    return None


def _checkpointed_params(exp: Experiment, reader: Checkpointer, step: int) -> tuple[Any, int]:
    """(trainable params, GRPO step) of checkpoint `step`. Only the params are read, straight
    onto their shardings: no optimizer state, no starting params beside them."""
    params, updates = reader.restore_params(step, abstract_trainable(exp))
    return params, updates // exp.train.updates_per_step


def _frozen_base(exp: Experiment) -> Any:
    """The placed base weights under LoRA (the checkpoints hold only the adapters), else None."""
    return None if exp.model.lora is None else place_params(exp.mesh, exp.model, exp.params)


class _Job(NamedTuple):
    """What an eval-only job reads from and writes to."""

    reader: Checkpointer
    writer: EvalWriter
    best: BestExport


@contextlib.contextmanager
def _eval_job(exp: Experiment, workdir: str) -> Iterator[_Job]:
    if exp.train.eval_rewards:  # the replies are scored as the run scores them
        place_reward_models(exp)
    writer = EvalWriter(workdir, is_primary=jax.process_index() == 0)
    with _checkpoint_reader(workdir) as reader, writer:
        yield _Job(reader, writer, BestExport(exp, up_to_step=math.inf))


def _checkpoint_reader(workdir: str) -> Checkpointer:
    """`workdir`'s checkpoints, opened to read only: a training run may be writing there."""
    return Checkpointer(f"{workdir}/checkpoints", read_only=True)


def _saved_steps(reader: Checkpointer, reload: bool = False) -> list[int]:
    """The steps saved there, oldest first, as process 0 lists them (`reload`: as on disk now):
    a run writing there may add or delete one meanwhile, and every process must read the same."""
    return gather.from_process_zero(reader.all_steps(reload=reload))


def _check_saved(reader: Checkpointer, saved: list[int], steps: list[int]) -> None:
    """FileNotFoundError unless each of `steps` is among the `saved` ones, naming those."""
    if not saved:
        raise FileNotFoundError(f"no checkpoint in {reader.directory}")
    if missing := sorted(set(steps) - set(saved)):
        raise FileNotFoundError(
            f"no checkpoint for step {', '.join(map(str, missing))} in {reader.directory} "
            f"(available: {saved})"
        )
