"""MetricsWriter and EvalWriter sinks, resume truncation, the stdout line, and the plot command."""

import glob
import json
import logging
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from grpo import metrics as metrics_lib
from grpo import plot
from grpo.metrics import (
    COMPLETIONS_FILE,
    EVAL_COMPLETIONS_FILE,
    EVAL_FILE,
    METRICS_FILE,
    EvalWriter,
    MetricsWriter,
    format_step_line,
    read_metrics,
)


def _lines(workdir) -> list[dict]:
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def _write_steps(workdir, steps, total_steps=10, **kwargs) -> None:
    with MetricsWriter(workdir, total_steps=total_steps, tensorboard=False, **kwargs) as writer:
        for step in steps:
            writer.write(step, {"reward_mean": step / 10})


def test_format_step_line_full_and_partial():
    metrics = {
        "reward_mean": np.float32(0.4213),
        "accuracy": 0.38,
        "loss": jnp.float32(0.0012),
        "kl": 0.001,
        "completion_length_mean": 211.6,
        "step_seconds": 9.83,
        "rollout_seconds": 7.07,
        "grad_norm": 3.0,  # not on the line
    }
    assert format_step_line(3, 100, metrics) == (
        "step 3/100 | reward 0.42 | acc 0.38 | loss 0.0012 | kl 0.001 | len 212 | "
        "9.8s (rollout 7.1s)"
    )
    assert format_step_line(1, 5, {}) == "step 1/5"
    assert format_step_line(2, 5, {"eval_accuracy": 0.5, "step_seconds": 1.0}) == (
        "step 2/5 | eval_acc 0.500 | 1.0s"
    )


def test_the_line_ends_with_the_time_left_at_the_pace_since_the_first_step(
    tmp_path, caplog, monkeypatch
):
    clock = iter([50.0, 100.0, 112.0, 118.0, 124.0, 130.0])
    monkeypatch.setattr(metrics_lib.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO):
        # A starting eval (step 0), then step 1 compiled; then 12 s, 6 s, 6 s a step.
        _write_steps(tmp_path, [0, 1, 2, 3, 4, 310], total_steps=310)
    ends = [line.rsplit(" | ", 1)[-1] for line in caplog.messages]
    # 12 s x 308 steps left, 9 s x 307, 8 s x 306; none at the last step.
    assert ends == [
        "reward 0.00",
        "reward 0.10",
        "eta 1h01m",
        "eta 46m03s",
        "eta 40m48s",
        "reward 31.00",
    ]
    assert format_step_line(3, 100, {}, eta_seconds=42.4) == "step 3/100 | eta 42s"


def test_jsonl_records_one_flushed_line_per_step(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=10, tensorboard=False)
    writer.write(1, {"reward_mean": np.float32(0.5), "loss": jnp.float32(0.25), "tokens": 128})
    # Readable before close: a kill after write() loses nothing.
    assert _lines(tmp_path) == [{"step": 1, "reward_mean": 0.5, "loss": 0.25, "tokens": 128}]
    writer.write(2, {"truncated": np.bool_(True)})
    writer.close()
    assert _lines(tmp_path)[1] == {"step": 2, "truncated": 1}


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    _write_steps(tmp_path, range(1, 6))
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "reward_me')  # killed mid-write
    _write_steps(tmp_path, [4, 5], resume_step=3)
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3, 4, 5]
    _write_steps(tmp_path, [6])  # no resume step: append
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2, 3, 4, 5, 6]


def _write_gsm8k_eval_replies(writer, step, rows):
    writer.write_eval_completions(step, "gsm8k", rows)


@pytest.mark.parametrize(
    "write, file",
    [
        (MetricsWriter.write_completions, COMPLETIONS_FILE),
        (
            lambda w, step, rows: w.write_eval_completions(step, "gsm8k", rows),
            EVAL_COMPLETIONS_FILE,
        ),
    ],
)
def test_completions_are_appended_and_dropped_after_the_resumed_checkpoint(tmp_path, write, file):
    rows = [{"completion": "12", "reward": 1.0}, {"completion": "ten", "reward": 0.0}]
    with MetricsWriter(tmp_path, total_steps=9, tensorboard=False) as writer:
        for step in (2, 4, 6):
            write(writer, step, rows)
    with MetricsWriter(tmp_path, total_steps=9, tensorboard=False, resume_step=4) as writer:
        write(writer, 6, rows[:1])  # the resumed run's own step 6
    records = read_metrics(tmp_path / file)
    if file == EVAL_COMPLETIONS_FILE:
        assert all(r["set"] == "gsm8k" for r in records)
    assert [(r["step"], r["completion"]) for r in records] == [
        (2, "12"),
        (2, "ten"),
        (4, "12"),
        (4, "ten"),
        (6, "12"),
    ]


def test_stdout_line_goes_through_absl_logging(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _write_steps(tmp_path, [2])
    assert "step 2/10 | reward 0.20" in caplog.text


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with MetricsWriter(tmp_path, total_steps=3) as writer:
        writer.write(1, {"reward_mean": 0.1, "kl": 0.01})
    (event_file,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    content = open(event_file, "rb").read()
    assert b"reward_mean" in content and b"kl" in content


def test_eval_only_results_go_to_their_files_and_a_tensorboard_run_of_their_own(tmp_path):
    workdir = tmp_path / "run"
    EvalWriter(workdir, is_primary=True).close()
    assert not workdir.exists()  # nothing before the first eval
    replies = [{"set": "test", "completion": "12", "correct": True}]
    with EvalWriter(workdir, is_primary=False) as writer:
        writer.write(4, {"eval_accuracy": 0.5})
    assert not workdir.exists()
    with EvalWriter(workdir) as writer:
        writer.write(4, {"eval_accuracy": np.float32(0.5)}, replies)
        writer.write(8, {"eval_accuracy": jnp.float32(0.75), "eval_length_mean": 12.0})
    with EvalWriter(workdir) as writer:  # a step evaluated again adds a line
        writer.write(4, {"eval_accuracy": 0.25})
    assert read_metrics(workdir / EVAL_FILE) == [
        {"step": 4, "eval_accuracy": 0.5},
        {"step": 8, "eval_accuracy": 0.75, "eval_length_mean": 12.0},
        {"step": 4, "eval_accuracy": 0.25},
    ]
    assert read_metrics(workdir / EVAL_COMPLETIONS_FILE) == [{"step": 4, **replies[0]}]
    events = glob.glob(str(workdir / "tensorboard" / "eval_only" / "events.out.tfevents.*"))
    assert len(events) == 2
    assert all(b"eval_accuracy" in open(path, "rb").read() for path in events)
    assert not glob.glob(str(workdir / "tensorboard" / "events.*"))  # not the training's run


def test_wandb_logs_when_importable_and_enabled(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(
        log=lambda data, step: calls.append(("log", step, data)),
        finish=lambda: calls.append(("finish",)),
    )
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw["project"])) or run,
        Table=lambda columns, data: ("table", columns, data),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsWriter(tmp_path, total_steps=3, tensorboard=False) as writer:  # not enabled
        writer.write(1, {"loss": 1.0})
    assert calls == []
    with MetricsWriter(tmp_path, total_steps=3, tensorboard=False, wandb_project="grpo") as writer:
        writer.write_completions(2, [{"completion": "12", "rewards": {"format": 0.5}}])
        writer.write(2, {"loss": 0.5})
    table = ("table", ["completion", "rewards"], [["12", '{"format": 0.5}']])
    assert calls == [
        ("init", "grpo"),
        ("log", 2, {"completions": table}),
        ("log", 2, {"loss": 0.5}),
        ("finish",),
    ]


def test_non_primary_writes_nothing(tmp_path, caplog):
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        with MetricsWriter(workdir, total_steps=3, is_primary=False, resume_step=0) as writer:
            writer.write(1, {"reward_mean": 1.0})
    assert not workdir.exists()
    assert "step 1/3" not in caplog.text


def test_bad_metrics_raise(tmp_path):
    with MetricsWriter(tmp_path, total_steps=3, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'reward_B'"):
            writer.write(1, {"reward_B": np.zeros(4)})
        with pytest.raises(ValueError, match="'step'"):
            writer.write(1, {"step": 1})
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_metrics(tmp_path / "missing.jsonl")


def test_plot_writes_a_png(tmp_path, capsys):
    metrics = tmp_path / METRICS_FILE
    with open(metrics, "w") as f:
        for step in range(1, 9):
            record = {"step": step, "reward_mean": 0.1 * step}
            if step % 4 == 0:
                record["eval_accuracy"] = 0.05 * step
            f.write(json.dumps(record) + "\n")
    out = tmp_path / "plots" / "reward.png"
    plot.main([f"--metrics={metrics}", f"--out={out}", "--keys=reward_mean,eval_accuracy"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no metric \\['accuracy'\\]; available"):
        plot.main([f"--metrics={metrics}", f"--out={out}", "--keys=accuracy"])


def test_eval_completions_file_appears_only_when_written(tmp_path):
    with MetricsWriter(tmp_path, total_steps=3, tensorboard=False) as writer:
        writer.write(1, {"reward_mean": 1.0})
    assert not (tmp_path / EVAL_COMPLETIONS_FILE).exists()
