"""What a profile of a training run shows, and when one is taken.

The loop marks every phase (`Phase`: rollout, reward, advantage, reference, update, eval,
checkpoint) as a named range and every step as a step (`Window.step`), so a `jax.profiler`
trace reads as the step loop does; the marks cost next to nothing while no trace runs. An
error that leaves a phase remembers it (`failed_phase`), so the app can say where it failed.
`Window` traces the steps `TrainConfig.profile_steps` names into the run's TensorBoard folder
(`<workdir>/tensorboard/plugins/profile/<time>/<host>.xplane.pb`, for TensorBoard's Profile tab
or xprof): the device ops and the host's marks, without JAX's Python function tracer
(`trace_options`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jax
from absl import logging


class Phase:
    """`with Phase("rollout", seconds):` adds the block's wall seconds to `seconds["rollout"]`
    (and to `.seconds`); in a trace, the block is a range of that name."""

    def __init__(self, name: str, seconds: dict[str, float] | None = None):
        self.name = name
        self.seconds = 0.0
        self._totals = seconds
        self._annotation = jax.profiler.TraceAnnotation(name)

    def __enter__(self) -> Phase:
        self._annotation.__enter__()
        self._tick = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, error: BaseException | None, tb: Any) -> None:
        self.seconds = time.perf_counter() - self._tick
        self._annotation.__exit__(exc_type, error, tb)
        if self._totals is not None:
            self._totals[self.name] = self._totals.get(self.name, 0.0) + self.seconds
        if error is not None and failed_phase(error) is None:  # the innermost phase names it
            error.grpo_phase = self.name


def failed_phase(error: BaseException) -> str | None:
    """The innermost `Phase` that `error` left, if any."""
    return getattr(error, "grpo_phase", None)


def trace_options() -> jax.profiler.ProfileOptions:
    """JAX's defaults, less the Python function tracer. To start and stop, that tracer sets a
    hook on every thread's state from the tracing thread, which on Python < 3.13 races with the
    threads the trainer runs beside a step (orbax's async save, the reward workers) starting
    and exiting: the likeliest cause of a CI run's segfault in its traced step (BUILD_NOTES).
    The marks above and the device ops are what a step's profile is read for; without the
    tracer a tiny.gin step's trace is 7.8 MB, not 12."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options


class Window:
    """Traces the steps `first..last` of `steps` (None: none) into `logdir`, on process 0.

    The trace starts before the first of them this run takes (a resumed run may start inside
    the window) and stops after the last, or at `stop` (the run ended early: preempted, not
    finite, or an error).
    """

    def __init__(self, steps: tuple[int, int] | None, logdir: str):
        self._steps = steps if jax.process_index() == 0 else None
        self._logdir = logdir
        self._traced: list[int] = []  # steps of the running trace
        self._tracing = False

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """One step of the loop: marked as step `step` in any trace; traced in the window."""
        in_window = self._steps is not None and self._steps[0] <= step <= self._steps[1]
        if in_window and not self._tracing:
            jax.profiler.start_trace(self._logdir, profiler_options=trace_options())
            self._tracing = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        if in_window:
            self._traced.append(step)
            if step == self._steps[1]:
                self.stop()

    def stop(self) -> None:
        """Ends the trace, if one runs, and says where it went."""
        if not self._tracing:
            return
        jax.profiler.stop_trace()
        self._tracing = False
        steps = f"{self._traced[0]}-{self._traced[-1]}" if self._traced else "none finished"
        logging.info("profile of steps %s written under %s", steps, self._logdir)
