"""tiny.gin's experiment with more gin bindings, built as `grpo.main` builds it (shared by the
tests that run the trainer in process on it)."""

import os

import gin
from grpo import configurables
from grpo import main as grpo_main
from grpo.experiment import Experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin/tests/tiny.gin")


def tiny_experiment(
    *bindings: str, read_params: bool, eval_only: bool = False, trains: bool = True
) -> Experiment:
    """`read_params=False`: as `--dry_run` builds it, the weights not read; `eval_only` and
    `trains` as `configurables.build_experiment` takes them."""
    gin.clear_config()
    grpo_main.parse_gin([TINY], list(bindings), [REPO])
    try:
        return configurables.build_experiment(
            read_params=read_params, eval_only=eval_only, trains=trains
        )
    finally:
        gin.clear_config()
