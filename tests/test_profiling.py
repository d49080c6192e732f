"""The profile window's start and stop, and the phase timer (no real trace: see test_train's
CLI test for one)."""

import jax
import pytest

from grpo import profiling


@pytest.fixture
def traces(monkeypatch):
    """Records jax.profiler start/stop calls instead of tracing."""
    calls = []

    def start_trace(logdir, profiler_options):
        # Without the Python tracer (profiling.trace_options), host marks and device ops kept.
        assert profiler_options.python_tracer_level == 0
        assert profiler_options.host_tracer_level == jax.profiler.ProfileOptions().host_tracer_level
        calls.append(("start", logdir))

    monkeypatch.setattr(jax.profiler, "start_trace", start_trace)
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
    return calls


def _run(window, steps, calls):
    """Runs `steps` through the window; returns the calls seen before/after each step."""
    seen = []
    for step in steps:
        with window.step(step):
            seen.append((step, len(calls)))
    return seen


def test_the_window_traces_its_steps_alone(traces):
    window = profiling.Window((2, 3), "/logs")
    seen = _run(window, range(1, 6), traces)
    # Started just before step 2, stopped just after step 3, nothing more.
    assert seen == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert traces == [("start", "/logs"), ("stop",)]
    window.stop()  # the run's end: nothing running, nothing to stop
    assert traces == [("start", "/logs"), ("stop",)]


def test_a_resumed_run_starts_its_trace_inside_the_window(traces):
    window = profiling.Window((2, 4), "/logs")
    _run(window, range(3, 6), traces)
    assert traces == [("start", "/logs"), ("stop",)]


def test_a_run_resumed_past_the_window_traces_nothing(traces):
    _run(profiling.Window((2, 4), "/logs"), range(5, 7), traces)
    assert traces == []


def test_a_run_that_ends_inside_the_window_stops_its_trace(traces):
    window = profiling.Window((2, 10), "/logs")
    with pytest.raises(RuntimeError):
        with window.step(2):
            raise RuntimeError("preempted")
    assert traces == [("start", "/logs")]
    window.stop()
    window.stop()
    assert traces == [("start", "/logs"), ("stop",)]


def test_only_the_first_process_traces(traces, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    _run(profiling.Window((1, 2), "/logs"), range(1, 3), traces)
    assert traces == []


def test_phases_add_their_seconds(monkeypatch):
    clock = iter([10.0, 12.5, 20.0, 21.0])
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: next(clock))
    seconds = {}
    with profiling.Phase("rollout", seconds) as first:
        pass
    with profiling.Phase("rollout", seconds):
        pass
    assert first.seconds == 2.5
    assert seconds == {"rollout": 3.5}
