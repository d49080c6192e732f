"""Per-step metrics: one stdout line, `<workdir>/metrics.jsonl`, TensorBoard, optional W&B;
and, every few steps, the step's completions to `<workdir>/completions.jsonl`. `EvalWriter`:
what `--eval_only` writes beside them.

The trainer averages metrics over processes; here only the primary process writes. Metric names
the stdout line knows (others still go to every sink): `reward_mean`, `accuracy`,
`eval_accuracy`, `loss`, `kl`, `completion_length_mean`, `step_seconds`, `rollout_seconds`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
EVAL_COMPLETIONS_FILE = "eval_completions.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_FILE = "eval.jsonl"  # what --eval_only appends to (EvalWriter)
EVAL_ONLY_TENSORBOARD_DIR = os.path.join(TENSORBOARD_DIR, "eval_only")

# (label, metric key, format spec) of the stdout line, in order; absent keys are left out.
_LINE_FIELDS = (
    ("reward", "reward_mean", ".2f"),
    ("acc", "accuracy", ".2f"),
    ("eval_acc", "eval_accuracy", ".3f"),
    ("loss", "loss", ".4g"),
    ("kl", "kl", ".3g"),
    ("len", "completion_length_mean", ".0f"),
)


def format_step_line(
    step: int, total: int, metrics: Mapping[str, Any], eta_seconds: float | None = None
) -> str:
    """`step 3/100 | reward 0.42 | ... | 9.8s (rollout 7.1s) | eta 16m05s`; the launcher greps
    `step N/M`."""
    parts = [f"step {step}/{total}"]
    parts += [
        f"{label} {float(metrics[key]):{spec}}"
        for label, key, spec in _LINE_FIELDS
        if key in metrics
    ]
    if "step_seconds" in metrics:
        timing = f"{float(metrics['step_seconds']):.1f}s"
        if "rollout_seconds" in metrics:
            timing += f" (rollout {float(metrics['rollout_seconds']):.1f}s)"
        parts.append(timing)
    if eta_seconds is not None:
        parts.append(f"eta {_duration(eta_seconds)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    """45s, 16m05s, 2h03m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn last line (a kill mid-write) is dropped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logging.warning("%s: dropping a torn last line: %r", path, line[:80])
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {e}") from e
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}: line {i + 1} has no 'step' field")
        records.append(record)
    return records


def _truncate_after(path: str, resume_step: int) -> None:
    """Drops records with step > resume_step (written after the checkpoint we resume from)."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)  # atomic: a kill here leaves the old file or the new one


def _open_records(path: str, resume_step: int | None):
    """A JSON-lines file to append to, less the records after `resume_step` (a resumed run
    writes those steps again)."""
    if resume_step is not None:
        _truncate_after(path, resume_step)
    return open(path, "a")


def _to_scalar(key: str, value: Any) -> int | float:
    arr = np.asarray(value)
    if arr.shape != () or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"metric {key!r} must be a numeric scalar, got {arr.dtype}{arr.shape}")
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return int(arr)
    return float(arr)


def _open_tensorboard(logdir: str, resume_step: int | None) -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logging.info("tensorboardX is not installed; TensorBoard logging is off")
        return None
    # purge_step hides events a previous attempt wrote after the checkpoint we resume from.
    purge_step = None if resume_step is None else resume_step + 1
    # tensorboardX names the file by the second and the host, and opens it to overwrite: a
    # second writer within the same second would erase the first's events.
    unique = f".{os.getpid()}.{time.time_ns()}"
    return SummaryWriter(logdir=logdir, purge_step=purge_step, filename_suffix=unique)


def _add_scalars(tensorboard: Any, step: int, scalars: Mapping[str, int | float]) -> None:
    for key, value in scalars.items():
        tensorboard.add_scalar(key, value, global_step=step)
    tensorboard.flush()


def _open_wandb(project: str, run_name: str | None, workdir: str, config: Mapping | None) -> Any:
    try:
        import wandb
    except ImportError:
        logging.info("wandb is not installed; W&B logging is off")
        return None
    return wandb.init(project=project, name=run_name, dir=workdir, config=dict(config or {}))


def append_records(file: Any, step: int, records: list[Mapping[str, Any]]) -> None:
    """One flushed JSON line per record, each with the step first."""
    file.writelines(json.dumps({"step": step, **r}) + "\n" for r in records)
    file.flush()


def eval_reply_lines(eval_set: str, records: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """eval_completions.jsonl's records: each names its eval set."""
    return [{"set": eval_set, **r} for r in records]


def _wandb_table(records: list[Mapping[str, Any]]) -> Any:
    """A W&B table of the records: one row each, nested values as JSON text."""
    import wandb  # imported when W&B was enabled

    columns = list(records[0])
    cell = lambda v: json.dumps(v) if isinstance(v, dict | list) else v
    return wandb.Table(columns=columns, data=[[cell(r.get(c)) for c in columns] for r in records])


class MetricsWriter:
    """Writes one record per step to every sink; a no-op unless `is_primary`.

    `resume_step`: the checkpoint step a resumed run starts from; records (and TensorBoard
    events) after it are dropped so the resumed run does not duplicate steps. None appends.
    `wandb_project`: enables W&B when set and `wandb` is importable.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        total_steps: int,
        is_primary: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self._total_steps = total_steps
        self._is_primary = is_primary
        self._first_write: tuple[float, int] | None = None  # (time, step), for the eta
        # Where TensorBoard's events go (when it is on), and a profile of the run's steps.
        self.tensorboard_dir = os.path.join(os.fspath(workdir), TENSORBOARD_DIR)
        self._jsonl = self._completions = self._eval_completions = None
        self._tensorboard = self._wandb = None
        if not is_primary:
            return
        workdir = os.fspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        self._jsonl, self._completions = (
            _open_records(os.path.join(workdir, name), resume_step)
            for name in (METRICS_FILE, COMPLETIONS_FILE)
        )
        # Written only when asked for (TrainConfig.write_eval_completions): opened on first use.
        self._eval_completions_path = os.path.join(workdir, EVAL_COMPLETIONS_FILE)
        if resume_step is not None:
            _truncate_after(self._eval_completions_path, resume_step)
        if tensorboard:
            self._tensorboard = _open_tensorboard(self.tensorboard_dir, resume_step)
        if wandb_project:
            self._wandb = _open_wandb(wandb_project, wandb_run_name, workdir, config)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` (numeric scalars: Python, numpy or 0-d jax arrays) for `step`."""
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key; pass the step separately")
        if not self._is_primary:
            return
        scalars = {key: _to_scalar(key, value) for key, value in metrics.items()}
        # Flushed per line so a kill loses at most the step being written.
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            _add_scalars(self._tensorboard, step, scalars)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        logging.info(format_step_line(step, self._total_steps, scalars, self._eta(step)))

    def _eta(self, step: int) -> float | None:
        """The seconds the steps after `step` will take, at the pace since this process's
        first step's write (so its compile does not count; nor does a starting eval, step 0),
        once there is a pace."""
        now = time.monotonic()
        if self._first_write is None and step > 0:
            self._first_write = (now, step)
        if self._first_write is None:
            return None
        since, first_step = self._first_write
        if step <= first_step or step >= self._total_steps:
            return None
        return (now - since) / (step - first_step) * (self._total_steps - step)

    def write_completions(self, step: int, records: list[Mapping[str, Any]]) -> None:
        """Appends one JSON line per completion (`records`: JSON-serialisable dicts); with W&B
        also logs them as a table, `completions`."""
        self._append(self._completions, step, records)
        if self._wandb is not None and records:
            self._wandb.log({"completions": _wandb_table(records)}, step=step)

    def write_eval_completions(
        self, step: int, eval_set: str, records: list[Mapping[str, Any]]
    ) -> None:
        """Appends one JSON line per eval reply of `eval_set` to eval_completions.jsonl."""
        if self._is_primary and self._eval_completions is None:
            self._eval_completions = open(self._eval_completions_path, "a")
        self._append(self._eval_completions, step, eval_reply_lines(eval_set, records))

    def _append(self, file: Any, step: int, records: list[Mapping[str, Any]]) -> None:
        if self._is_primary:
            append_records(file, step, records)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._completions.close()
        if self._eval_completions is not None:
            self._eval_completions.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._completions = self._eval_completions = None
        self._tensorboard = self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EvalWriter:
    """What `--eval_only` writes, from the primary process alone: one line per evaluated policy
    to eval.jsonl, its replies (if any) to eval_completions.jsonl, and its metrics to
    TensorBoard under tensorboard/eval_only, a run of its own beside the training's curves.
    Nothing is dropped: evaluating a step again adds to it. Files open on the first write."""

    def __init__(
        self, workdir: str | os.PathLike[str], *, is_primary: bool = True, tensorboard: bool = True
    ) -> None:
        self._workdir = os.fspath(workdir)
        self._is_primary = is_primary
        self._wants_tensorboard = tensorboard
        self._tensorboard = None

    def write(
        self, step: int, metrics: Mapping[str, Any], replies: list[Mapping[str, Any]] = ()
    ) -> None:
        """Records the eval `metrics` of the policy of GRPO step `step`, and its `replies`."""
        if not self._is_primary:
            return
        os.makedirs(self._workdir, exist_ok=True)
        if replies:
            with open(os.path.join(self._workdir, EVAL_COMPLETIONS_FILE), "a") as f:
                append_records(f, step, replies)
        scalars = {key: _to_scalar(key, value) for key, value in metrics.items()}
        with open(os.path.join(self._workdir, EVAL_FILE), "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._wants_tensorboard and self._tensorboard is None:
            logdir = os.path.join(self._workdir, EVAL_ONLY_TENSORBOARD_DIR)
            self._tensorboard = _open_tensorboard(logdir, resume_step=None)
            self._wants_tensorboard = self._tensorboard is not None
        if self._tensorboard is not None:
            _add_scalars(self._tensorboard, step, scalars)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._tensorboard = None

    def __enter__(self) -> EvalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
