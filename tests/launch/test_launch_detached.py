"""The detached wrapper with real short processes, and the monitor that reads its files."""

import os
import signal
import time

import pytest
from launch_fakes import kill_runs

from launch import detached, remote
from launch.detached import State, WorkerStatus
from launch.shell import LaunchError, Runner

RUNNER = Runner()
LOCAL = remote.LocalTarget()


@pytest.fixture
def root(tmp_path):
    (tmp_path / "repo").mkdir()
    yield str(tmp_path)
    kill_runs(tmp_path)


def start(root: str, job: list[str], name: str = "job") -> int:
    started = detached.start(RUNNER, LOCAL, root, name, job)
    (pid,) = started.values()
    return int(pid)


def wait_done(root: str, name: str = "job", timeout_s: float = 5.0) -> WorkerStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        (status,) = detached.probe(RUNNER, LOCAL, root, name, 20, show=False).values()
        if status.state is not State.RUNNING or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def read(root: str, name: str, suffix: str) -> str:
    with open(os.path.join(root, "runs", name + suffix)) as f:
        return f.read()


@pytest.mark.parametrize(
    "job, state, code, summary",
    [
        (["true"], State.SUCCEEDED, 0, "succeeded(0)"),
        (["sh", "-c", "echo to stderr >&2; exit 3"], State.FAILED, 3, "failed(3)"),
        (["sh", "-c", "kill -TERM $$"], State.KILLED, 143, "killed(SIGTERM)"),
        (["sh", "-c", "kill -KILL $$"], State.KILLED, 137, "killed(SIGKILL)"),
    ],
)
def test_exit_code_recorded(root, job, state, code, summary):
    start(root, job)
    status = wait_done(root)
    assert (status.state, status.exit_code, status.summary()) == (state, code, summary)
    assert status.exit_status == code
    assert read(root, "job", ".exit") == f"{code}\n"
    assert read(root, "job", ".log").endswith(f"[launch] exit code {code}\n")
    assert not os.path.exists(os.path.join(root, "runs", "job.exit.tmp"))


def test_log_and_step_progress_while_running(root):
    start(root, ["sh", "-c", "echo 'step 1/3 | reward 0.1'; echo 'Step 2/3'; sleep 30"])
    time.sleep(0.3)
    status = wait_done(root, timeout_s=0)
    assert status.state is State.RUNNING and status.step == (2, 3)
    assert status.tail == ("step 1/3 | reward 0.1", "Step 2/3") and status.log_lines == 2
    assert status.summary() == "running step 2/3"


def test_stop_records_the_signal(root):
    pid = start(root, ["sleep", "30"])
    assert os.getpgid(pid) == pid  # setsid: the wrapper leads its own process group
    assert detached.stop(RUNNER, LOCAL, root, "job") == {os.uname().nodename: "143"}
    status = wait_done(root)
    assert (status.state, status.summary()) == (State.KILLED, "killed(SIGTERM)")
    # Stopping an ended job is a no-op.
    assert detached.stop(RUNNER, LOCAL, root, "job") == {os.uname().nodename: "not-running"}


def test_stop_kills_a_job_that_ignores_term(root):
    start(root, ["sh", "-c", "trap '' TERM; sleep 30"])
    stopped = detached.stop(RUNNER, LOCAL, root, "job", grace_s=1)
    assert stopped == {os.uname().nodename: "137"}
    status = wait_done(root)
    assert (status.state, status.summary()) == (State.KILLED, "killed(SIGKILL)")


def test_term_to_the_wrapper_is_forwarded(root):
    pid = start(root, ["sleep", "30"])
    os.kill(pid, signal.SIGTERM)
    assert wait_done(root).exit_code == 143


def test_lost_when_the_wrapper_is_killed(root):
    pid = start(root, ["sleep", "30"])
    os.killpg(pid, signal.SIGKILL)
    status = wait_done(root)
    assert (status.state, status.exit_code, status.exit_status) == (State.LOST, None, 1)
    assert not os.path.exists(os.path.join(root, "runs", "job.exit"))


def test_missing_run(root):
    (status,) = detached.probe(RUNNER, LOCAL, root, "nope", 5).values()
    assert status.state is State.MISSING and status.exit_status == 1


def test_refuses_to_restart_a_running_job(root):
    start(root, ["sleep", "30"])
    with pytest.raises(LaunchError, match="1 workers reported|0/1"):
        start(root, ["true"])
    assert wait_done(root, timeout_s=0).state is State.RUNNING  # the first one is untouched


def test_watch_prints_each_line_once(root):
    job = "for i in 1 2 3 4; do echo step $i/4; sleep 0.15; done; exit 5"
    start(root, ["sh", "-c", job])
    lines = []
    status, timed_out = detached.watch(
        RUNNER, LOCAL, root, "job", poll_s=0.05, timeout_s=10, out=lines.append
    )
    assert not timed_out and status.summary() == "failed(5) step 4/4"
    log = [line for line in lines if not line.startswith("[launch] ") or "exit code" in line]
    assert log == [f"step {i}/4" for i in range(1, 5)] + ["[launch] exit code 5"]
    assert lines[-1].endswith(": failed(5) step 4/4")


def test_watch_times_out(root):
    start(root, ["sleep", "30"])
    status, timed_out = detached.watch(RUNNER, LOCAL, root, "job", poll_s=0.05, timeout_s=0.2,
                                       out=lambda _: None)  # fmt: skip
    assert timed_out and status.state is State.RUNNING


@pytest.mark.parametrize(
    "exit_code, alive, state",
    [
        (None, True, State.RUNNING),
        (None, False, State.LOST),
        (0, False, State.SUCCEEDED),
        (0, True, State.SUCCEEDED),  # .exit is written just before the wrapper exits
        (1, False, State.FAILED),
        (127, False, State.FAILED),
        (130, False, State.KILLED),
        (255, False, State.FAILED),  # not 128 + a signal number
    ],
)
def test_job_state(exit_code, alive, state):
    assert detached.job_state(exit_code, alive) is state


def test_parse_probe_and_overall():
    output = "\n".join(
        [
            "SSH: Attempting to connect to worker 0...",
            "LAUNCH w0 state pid=11 alive=1 exit=- lines=7",
            "LAUNCH w1 state pid=12 alive=0 exit=3 lines=2",
            "LAUNCH w0 step I1128 step 5/100 | reward 0.5",
            "LAUNCH w1 log Traceback (most recent call last):",
            "LAUNCH w1 log ",
            "LAUNCH w2 state missing",
        ]
    )
    statuses = detached.parse_probe(output)
    assert statuses["w0"] == WorkerStatus("w0", State.RUNNING, None, 11, (5, 100), 7, ())
    assert statuses["w1"] == WorkerStatus(
        "w1", State.FAILED, 3, 12, None, 2, ("Traceback (most recent call last):", "")
    )
    assert statuses["w2"].state is State.MISSING
    assert detached.overall(statuses).host == "w1"  # the first worker that ended badly
    running, done = statuses["w0"], WorkerStatus("w3", State.SUCCEEDED, 0)
    assert detached.overall({"w0": running, "w3": done}) is running
    assert detached.overall({"w3": done}) is done
    assert detached.overall({}).state is State.LOST


def test_bad_run_name():
    with pytest.raises(ValueError, match="run name"):
        detached.start_script("r", "a b;rm", ["true"])
