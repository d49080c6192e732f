"""absl entry point: `python -m grpo.main --gin_file=gin/gsm8k.gin --gin_bindings=...`.

Parses gin (unknown or misspelled bindings fail here, before anything compiles), prints and
saves the operative config, reports the devices and mesh, and runs the training loop; with
`--eval_only`, evaluates the workdir's newest checkpoint (or the configured model) instead, and
with `--export_only=DIR` writes it as a Hugging Face folder (`--checkpoint_step`: another step;
for eval, several or all; `--follow`: each as a run training there saves it).
"""

from __future__ import annotations

import logging as std_logging
import signal
import sys
import time

import jax
from absl import app, flags, logging

import gin

flags.DEFINE_multi_string("gin_file", [], "Gin config file(s); later files override earlier.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. \"make_optimizer.name='adamw'\".")
flags.DEFINE_multi_string("gin_search_paths", ["."], "Directories searched for gin files/includes.")
flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics.jsonl and config.gin go here.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes join.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool(
    "eval_only",
    False,
    "Evaluate the newest checkpoint in --workdir (else the configured model) and append the "
    "result to <workdir>/eval.jsonl and TensorBoard's tensorboard/eval_only (and, with "
    "TrainConfig.write_eval_completions, its replies to eval_completions.jsonl); no training, "
    "nothing else written.",
)
flags.DEFINE_string(
    "export_only",
    None,
    "Write the newest checkpoint in --workdir to this folder as a Hugging Face model (merged, "
    "plus adapter/ under LoRA); no training.",
)
flags.DEFINE_bool(
    "dry_run",
    False,
    "Read the model's config and tokenizer and the data, check the whole configuration, print "
    "what the run would do, and exit before the weights are read, anything compiles or is "
    "written.",
)
flags.DEFINE_string(
    "checkpoint_step",
    None,
    "With --eval_only or --export_only: this checkpoint step instead of the newest; with "
    "--eval_only also several, one after another ('10,20,30'), or 'all' kept in --workdir.",
)
flags.DEFINE_bool(
    "follow",
    False,
    "With --eval_only: evaluate each checkpoint a run training in --workdir commits, as it "
    "comes, skipping the steps eval.jsonl holds; stop once the last step "
    "(TrainConfig.num_steps) is evaluated, or after --follow_timeout_s without a new one.",
)
flags.DEFINE_float("follow_timeout_s", 3600.0, "--follow: give up after this long without one.")
flags.DEFINE_float("follow_poll_s", 30.0, "--follow: look for new checkpoints this often.")
FLAGS = flags.FLAGS


def parse_gin(files: list[str], bindings: list[str], search_paths: list[str]) -> None:
    """Loads gin files and bindings; raises gin's own error on an unknown name or bad value."""
    from grpo import configurables  # noqa: F401  (registers the configurables)

    for path in search_paths:
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)
    except (OSError, SyntaxError) as err:  # a gin file not found, a line that does not parse
        raise ValueError(f"gin: {err}") from err


def describe_runtime(mesh) -> list[str]:
    devices = jax.devices()
    return [
        f"backend {jax.default_backend()}, process {jax.process_index()}/{jax.process_count()}, "
        f"{len(devices)} devices ({jax.local_device_count()} local): {devices[0].device_kind}",
        f"mesh {dict(mesh.shape)}",
    ]


def _quiet_orbax(record) -> bool:
    """Orbax logs every save at INFO (dozens of lines); keep its warnings and errors only."""
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.eval_only and FLAGS.export_only:
        raise app.UsageError("--eval_only and --export_only: one at a time")
    if FLAGS.checkpoint_step is not None and not (FLAGS.eval_only or FLAGS.export_only):
        raise app.UsageError("--checkpoint_step needs --eval_only or --export_only")
    if FLAGS.follow and (not FLAGS.eval_only or FLAGS.checkpoint_step is not None):
        raise app.UsageError("--follow needs --eval_only, without --checkpoint_step")
    if min(FLAGS.follow_timeout_s, FLAGS.follow_poll_s) < 0:
        raise app.UsageError("--follow_timeout_s and --follow_poll_s: seconds, >= 0")
    steps = _checkpoint_steps(FLAGS.checkpoint_step)
    logging.get_absl_handler().addFilter(_quiet_orbax)
    from grpo import distributed

    started = time.perf_counter()
    try:
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        # After initialize: nothing may touch devices first.
        from grpo import checkpoint, configurables, train
        from grpo.experiment import check_writable_dir

        if FLAGS.export_only:  # reads the workdir, writes here
            check_writable_dir(FLAGS.export_only, "--export_only")
        else:
            check_writable_dir(FLAGS.workdir, "--workdir")
        parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
        experiment = configurables.build_experiment(
            read_params=not FLAGS.dry_run,
            eval_only=FLAGS.eval_only,
            trains=not (FLAGS.eval_only or FLAGS.export_only),
        )
    except (ValueError, FileNotFoundError) as err:  # bad input: one line, before any compile
        logging.error("invalid configuration: %s", err)
        sys.exit(2)
    operative = gin.operative_config_str()
    logging.info("operative gin config:\n%s", operative)
    for line in describe_runtime(experiment.mesh):
        logging.info("%s", line)
    if FLAGS.dry_run:
        for line in [*train.effective_batch_lines(experiment), train.held_memory_line(experiment)]:
            logging.info("%s", line)
        logging.info(
            "dry run: the configuration is valid (%d train / %d test examples); nothing compiled",
            len(experiment.train_examples),
            len(experiment.test_examples),
        )
        return
    if FLAGS.eval_only or FLAGS.export_only:
        _run_one_off(experiment, steps)
        return
    try:
        summary = train.train(experiment, FLAGS.workdir, config_text=operative)
    except checkpoint.CheckpointMismatch as err:  # bad input, found at the restore: one line
        logging.error("%s", err)
        sys.exit(2)
    except train.Preempted as stop:
        logging.warning("%s", stop)
        sys.exit(128 + signal.SIGTERM)
    except (train.NotFinite, train.OutOfMemory) as failed:
        logging.error("%s", failed)
        sys.exit(1)
    shown = lambda key: f"{summary[key]:.4f}" if key in summary else "n/a"  # none: no step ran
    logging.info(
        "done: %d steps, last reward %s, eval accuracy %s, wall %.1fs",
        summary["steps"],
        shown("reward_mean"),
        shown("eval_accuracy"),
        time.perf_counter() - started,
    )


def _checkpoint_steps(spec: str | None) -> list[int] | str | None:
    """--checkpoint_step as steps (a list), 'all', or None (the newest)."""
    if spec is None or (spec == "all" and FLAGS.eval_only):
        return spec
    try:
        steps = [int(part) for part in spec.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 0 or (len(steps) > 1 and not FLAGS.eval_only):
        several = ", steps 'N,M,...' or 'all'" if FLAGS.eval_only else ""
        raise app.UsageError(f"--checkpoint_step={spec}: want a step N{several}")
    return steps


def _run_one_off(experiment, steps: list[int] | str | None) -> None:
    """--eval_only or --export_only on checkpoints of --workdir; a missing step, or one that
    does not fit the config, exits 2."""
    from grpo import checkpoint, checkpoint_jobs

    try:
        if FLAGS.export_only:
            step = checkpoint_jobs.export_workdir(
                experiment, FLAGS.workdir, FLAGS.export_only, None if steps is None else steps[0]
            )
            logging.info("exported step %d to %s", step, FLAGS.export_only)
        elif FLAGS.follow:
            checkpoint_jobs.follow_checkpoints(
                experiment,
                FLAGS.workdir,
                poll_s=FLAGS.follow_poll_s,
                timeout_s=FLAGS.follow_timeout_s,
            )
        elif steps is None:
            checkpoint_jobs.evaluate_workdir(experiment, FLAGS.workdir)
        else:
            checkpoint_jobs.evaluate_checkpoints(
                experiment, FLAGS.workdir, None if steps == "all" else steps
            )
    except (FileNotFoundError, checkpoint.CheckpointMismatch) as err:
        logging.error("%s", err)
        sys.exit(2)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
