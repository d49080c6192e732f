"""tiny.gin's experiment with more gin bindings, built as `grpo.main` builds it (shared by the
tests that run the trainer in process on it)."""

import os

import gin
from grpo import configurables
from grpo import main as grpo_main
from grpo.experiment import Experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin/tests/tiny.gin")


def tiny_experiment(*bindings: str, read_params: bool) -> Experiment:
    """`read_params=False`: as `--dry_run` builds it, the weights not read."""
    gin.clear_config()
    grpo_main.parse_gin([TINY], list(bindings), [REPO])
    try:
        return configurables.build_experiment(read_params=read_params)
    finally:
        gin.clear_config()
