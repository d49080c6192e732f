"""One program on many processes, on one machine: two processes x 4 virtual CPU devices joined
over localhost (gloo collectives) must train like one process with 8 devices (LoRA, dynamic
sampling and tool calls included), survive a preemption and resume, refuse to start, quickly
and clearly, when a process is missing, and stop within the heartbeat timeout when a process
dies mid-run.

Every run is a subprocess of `grpo.main` with a `length` reward registered first (the tiny
random policy never solves a problem, so correctness rewards would give no gradient).
"""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from grpo import distributed
from grpo import metrics as metrics_lib
from grpo.models import loading
from tests.hf_models import save_classifier
from tests.log_tail import log_tail

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin/tests/tiny.gin")
ENTRY = (
    "from grpo.phases import reward\n"
    "reward.REWARD_FUNCTIONS['length'] = lambda completion, example: len(completion) / 100.0\n"
    # Equal rewards for odd answers (dynamic sampling's test): len() / 100 for the others.
    "reward.REWARD_FUNCTIONS['half_flat'] = lambda completion, example: (\n"
    "    0.0 if int(example['answer'].rsplit('####', 1)[1]) % 2 else len(completion) / 100.0)\n"
    # With FIRST_CALL set, every rollout's first round writes that tool call (tests/forced_calls).
    "import os\n"
    "if os.environ.get('FIRST_CALL'):\n"
    "    from grpo import sampling\n"
    "    from grpo.models import loading\n"
    "    from tests.forced_calls import first_rounds_call\n"
    "    tokenizer = loading.load_tokenizer('smollm2-135m-instruct')  # tiny.gin's\n"
    "    ids = tokenizer.encode(os.environ['FIRST_CALL'], add_special_tokens=False)\n"
    "    sampling.generate_in_rounds = first_rounds_call(sampling.generate_in_rounds, ids)\n"
    "from grpo import main\n"
    "main.run()\n"
)
BINDINGS = (
    "make_rewards.names=('length',)",
    "make_rewards.weights=(1.0,)",
    "TrainConfig.num_steps=4",  # eval (every 2 steps in tiny.gin) runs at steps 2 and 4
    # 4 prompts divide over dp x fsdp = 4, so each is prefilled once for its group, with the
    # prompt rows split across the processes.
    "TrainConfig.prompts_per_step=4",
)
NONDETERMINISTIC = ("_seconds", "_per_s", "mfu")
RUN_TIMEOUT_S = 300  # a hang (say, one process waiting in a collective) fails instead
# One process's metrics differ from two processes' only by float32 rounding: the cross-process
# all-reduce sums in another order. Measured: entropy and ratio_mean 1 ulp apart (rel 1.2e-7),
# the loss (a near-zero mean of O(1) terms that cancel, |loss| ~ 2e-7) up to 1.5e-8 apart
# (16 completions x 16 tokens per step); rewards bitwise equal, grad_norm and the trained
# params within rtol (but for rare sign flips, below). rtol is ~8 ulps; atol (~3x the loss's
# measured gap) covers the loss.
RTOL, ATOL = 1e-6, 5e-8
# abs_log_ratio_mean is itself float noise here: the sampler's and the trainer's fp32 log-probs
# differ by ~7e-8 per token (measured on tiny.gin), and each run rounds them its own way.
METRIC_ATOL = {"abs_log_ratio_mean": 2e-7}
# Lion (tiny.gin's optimizer) moves each weight by the lr times the sign of its momentum, so a
# momentum a few ulps from zero may take either sign when the cross-process sums round
# differently (the vocabulary-parallel log-softmax sums its softmax statistics across devices):
# seen once, 1 of 1.5M weights 1e-3 apart after 4 steps. At most that many weights may differ,
# by at most a flipped step per step.
PEAK_LR, MAX_FLIPPED = 1e-3, 1e-5


def _assert_params_close(two: np.ndarray, one: np.ndarray) -> None:
    apart = ~np.isclose(two, one, rtol=RTOL, atol=ATOL)
    assert apart.mean() <= MAX_FLIPPED, f"{apart.sum()} of {apart.size} weights differ"
    assert np.all(np.abs(two - one)[apart] <= 2 * PEAK_LR * 4 + ATOL)  # 4 steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    count = r"--xla_force_host_platform_device_count=\d+"
    flags = re.sub(count, "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/grpo-test-jax-cache")
    return env


class _Run:
    """`grpo.main` started as processes `process_ids` of `num_processes` (1: no coordinator)."""

    def __init__(self, workdir, *bindings, num_processes=2, process_ids=None, env=None, flags=()):
        self.workdir = workdir
        process_ids = range(num_processes) if process_ids is None else process_ids
        stamp = time.time_ns()
        self.logs = [workdir.parent / f"{workdir.name}.{stamp}.p{i}.log" for i in process_ids]
        cmd = [sys.executable, "-c", ENTRY, f"--gin_file={TINY}", f"--workdir={workdir}"]
        cmd += [f"--gin_bindings={b}" for b in (*BINDINGS, *bindings)] + list(flags)
        if num_processes > 1:
            cmd += [f"--coordinator_address=localhost:{_free_port()}"]
            cmd += [f"--num_processes={num_processes}"]
        env = env or _env(devices=8 // num_processes)
        self.procs = []
        try:
            for log, i in zip(self.logs, process_ids, strict=True):
                flag = [f"--process_id={i}"] if num_processes > 1 else []
                with open(log, "w") as out:
                    self.procs.append(
                        subprocess.Popen(
                            cmd + flag, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env
                        )
                    )
        except BaseException:
            self.kill()
            raise

    def wait(self, timeout=RUN_TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def tails(self) -> str:
        return "\n".join(f"--- log {i}:\n{log_tail(self.output(i))}" for i in range(len(self.logs)))

    def rows(self) -> list[dict]:
        return metrics_lib.read_metrics(self.workdir / "metrics.jsonl")


def _finish(run: _Run, codes=(0,)) -> None:
    returncodes = run.wait()
    assert all(rc in codes for rc in returncodes), f"exit codes {returncodes}\n{run.tails()}"


def _deterministic(rows):
    return [{k: v for k, v in r.items() if not k.endswith(NONDETERMINISTIC)} for r in rows]


def _params(workdir):
    return load_file(workdir / "export" / "model.safetensors")


def _export(workdir):
    return f"TrainConfig.export_dir='{workdir / 'export'}'"


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """Bindings that add a tiny random reward model to the `length` reward, in training and in
    the evals: each process scores its own rows, at a width the processes agree on."""
    folder = tmp_path_factory.mktemp("reward_model")
    tokenizer = loading.load_tokenizer(loading.SMOLLM2_NAME)  # tiny.gin's
    save_classifier(folder, tokenizer, vocab=len(tokenizer))
    return (
        f"make_reward_model.source='{folder}'",
        "make_reward_model.dtype='float32'",
        "make_rewards.names=('length', 'reward_model')",
        "make_rewards.weights=(1.0, 0.1)",
        "TrainConfig.eval_rewards=True",
    )


@dataclasses.dataclass
class _PreemptedRun:
    """A run preempted, as its workdir stood then, and resumed to its end in that workdir."""

    preempted: _Run
    steps_saved: list[int]  # the metrics rows written before the resume
    checkpoints: list[str]  # the checkpoints saved before the resume
    resumed: _Run


@pytest.fixture(scope="module")
def preempted_two_processes(tmp_path_factory, reward_model):
    """A 4-step run on two processes, rewarded by a function and a reward model: SIGTERM
    reaches only process 1 after step 2 (as one host's preemption notice may arrive first),
    then the run resumes to its end. The tests below check the preemption, the whole run
    against one process's, and its checkpoints' export and evals."""
    workdir = tmp_path_factory.mktemp("multihost") / "two"
    rarely = "TrainConfig.checkpoint_every_steps=10"  # so only the SIGTERM save writes step 3
    preempted = _Run(workdir, rarely, *reward_model)
    try:
        while not (workdir / "metrics.jsonl").exists() or len(preempted.rows()) < 2:
            assert all(p.poll() is None for p in preempted.procs), preempted.tails()
            time.sleep(0.05)
        preempted.procs[1].send_signal(signal.SIGTERM)
        _finish(preempted, codes=(128 + signal.SIGTERM,))
    finally:
        preempted.kill()
    steps_saved = [r["step"] for r in preempted.rows()]
    checkpoints = sorted(os.listdir(workdir / "checkpoints"))
    resumed = _Run(workdir, rarely, _export(workdir), *reward_model)
    _finish(resumed)
    return _PreemptedRun(preempted, steps_saved, checkpoints, resumed)


@pytest.fixture(scope="module")
def two_processes(preempted_two_processes):
    """The run of `preempted_two_processes` as it ended."""
    return preempted_two_processes.resumed


def _assert_metrics_close(rows_one: list[dict], rows_two: list[dict]) -> None:
    for row_one, row_two in zip(rows_one, rows_two, strict=True):
        assert row_one.keys() == row_two.keys()
        for key, value in row_one.items():
            np.testing.assert_allclose(
                row_two[key],
                value,
                rtol=RTOL,
                atol=METRIC_ATOL.get(key, ATOL),
                err_msg=f"step {row_one['step']} {key}",
            )


@pytest.mark.slow
def test_two_processes_train_like_one(two_processes, reward_model, tmp_path):
    one = _Run(tmp_path / "one", _export(tmp_path / "one"), *reward_model, num_processes=1)
    _finish(one)
    assert "process 1/2, 8 devices (4 local)" in two_processes.output(1)
    rows_one, rows_two = _deterministic(one.rows()), _deterministic(two_processes.rows())
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4]
    assert all(r["reward/reward_model"] != 0 for r in rows_two)
    assert rows_two[1]["eval_reward/reward_model"] != 0
    assert "eval_accuracy" in rows_two[1] and "eval_accuracy" in rows_two[3]
    assert rows_two[-1]["grad_norm"] > 0  # the runs really trained
    _assert_metrics_close(rows_one, rows_two)
    # completions.jsonl: every process's rows, gathered onto process 0 in batch order.
    logged = [
        metrics_lib.read_metrics(run.workdir / "completions.jsonl") for run in (one, two_processes)
    ]
    steps = [r["step"] for r in logged[1]]
    assert steps == [2] * (len(steps) // 2) + [4] * (len(steps) // 2)  # tiny.gin: every 2 steps
    for record_one, record_two in zip(*logged, strict=True):
        for key in ("question", "answer", "completion", "length", "truncated", "correct"):
            assert record_two[key] == record_one[key], key
        for key in ("reward", "advantage"):
            np.testing.assert_allclose(record_two[key], record_one[key], rtol=RTOL, atol=ATOL)
        assert record_two["rewards"] == record_one["rewards"]
    params_one, params_two = _params(tmp_path / "one"), _params(two_processes.workdir)
    assert params_one.keys() == params_two.keys()
    for name in params_one:
        _assert_params_close(params_two[name], params_one[name])
    assert not (two_processes.workdir / "config.gin.tmp").exists()
    assert "make_mesh.tp = 2" in (two_processes.workdir / "config.gin").read_text()


@pytest.mark.slow
def test_two_processes_export_a_checkpoint_as_their_run_did(two_processes, tmp_path):
    # Each process restores the params alone (under another optimizer setting, which export
    # ignores); the export equals the one the run wrote at its end, bitwise.
    export = tmp_path / "export"
    run = _Run(
        two_processes.workdir, "make_optimizer.name='adamw'", flags=[f"--export_only={export}"]
    )
    _finish(run)
    params_run, params_export = (
        _params(two_processes.workdir),
        load_file(export / "model.safetensors"),
    )
    assert params_export.keys() == params_run.keys()
    for name in params_run:
        np.testing.assert_array_equal(params_export[name], params_run[name], err_msg=name)


@pytest.mark.slow
def test_two_processes_evaluate_every_checkpoint_as_their_run_did(two_processes):
    # Both processes take process 0's list of the kept checkpoints (3 and 4), one after the
    # other; step 4 scores as the run's own eval at step 4 did. Then again, following the run.
    run = _Run(two_processes.workdir, flags=["--eval_only", "--checkpoint_step=all"])
    _finish(run)
    eval_file = two_processes.workdir / "eval.jsonl"
    evaluated = metrics_lib.read_metrics(eval_file)
    assert [r["step"] for r in evaluated] == [3, 4]
    last = two_processes.rows()[-1]
    assert evaluated[1] == {key: last[key] for key in evaluated[1]}
    # A follower that had evaluated step 3 when it stopped, restarted: both processes take
    # process 0's word on what is left (step 4, the run's last), evaluate it, and stop.
    eval_file.write_text(eval_file.read_text().splitlines(keepends=True)[0])
    run = _Run(two_processes.workdir, flags=["--eval_only", "--follow", "--follow_timeout_s=60"])
    _finish(run)
    assert metrics_lib.read_metrics(eval_file) == evaluated


@pytest.mark.slow
def test_dynamic_sampling_lora_and_tools_on_two_processes_train_as_one(tmp_path):
    # Every process gathers every round and picks the same groups, then takes its own rows:
    # the steps match one process's, extra rounds included. The runs train LoRA adapters too
    # (each process builds the same adapters; the frozen base is sharded like the params),
    # two optimizer updates a step, and gather each round's solved prompts (none, here).
    # Every reply calls the calculator first: each process runs its own rows' calls, and all
    # of them agree on when the tool rounds end.
    bindings = (
        "make_rewards.names=('half_flat',)",
        "make_model.lora_rank=4",
        "TrainConfig.prompts_per_update=2",
        "TrainConfig.retire_solved_prompts=True",
        "TrainConfig.max_sampling_rounds=4",
        "TrainConfig.num_steps=2",
        "TrainConfig.eval_every_steps=0",
        "make_tools.names=('calculator',)",
        "make_tools.result_template=' = {output}'",  # short: 14 of the 16 tokens, 2 to go on
    )
    call = {"FIRST_CALL": "<calculator>2+3</calculator>"}
    runs = [
        _Run(tmp_path / "two", *bindings, env=_env(4, **call)),
        _Run(tmp_path / "one", *bindings, num_processes=1, env=_env(8, **call)),
    ]
    for run in runs:
        _finish(run)
    two, one = (_deterministic(run.rows()) for run in runs)
    assert max(r["sampling_rounds"] for r in one) > 1, "the seed should need a second round"
    assert all(r["tool_call_rate"] == 1.0 and r["tool_error_rate"] == 0.0 for r in two)
    _assert_metrics_close(one, two)
    logged = [metrics_lib.read_metrics(run.workdir / "completions.jsonl") for run in runs]
    called = "<calculator>2+3</calculator> = 5"
    assert logged[0] and all(r["completion"].startswith(called) for r in logged[0])
    assert any(len(r["completion"]) > len(called) for r in logged[0]), "no second round"
    assert [r["completion"] for r in logged[0]] == [r["completion"] for r in logged[1]]


@pytest.mark.slow
def test_preempted_processes_save_the_same_step_and_resume_from_it(preempted_two_processes):
    # Both processes saved step 3 and exited 143 together (process 1 sees the signal during
    # step 3 at the latest); the resumed run went on from there (to one process's result:
    # test_two_processes_train_like_one; bitwise exact resumes: test_train).
    run = preempted_two_processes
    preempted, resumed = run.preempted, run.resumed
    assert run.steps_saved == [1, 2, 3], preempted.tails()
    assert "preempted after step 3" in preempted.output(0)
    assert run.checkpoints == ["3"]
    assert "resumed from 3 at step 3" in resumed.output(0)


@pytest.mark.parametrize("process_id", [0, 1])  # 0 hosts the coordinator; 1 finds none
def test_missing_process_fails_fast(tmp_path, process_id):
    timeout_s = 3
    env = _env(4, **{distributed.ENV_TIMEOUT: str(timeout_s)})
    tick = time.monotonic()
    run = _Run(tmp_path / "alone", process_ids=[process_id], env=env)
    (returncode,) = run.wait(timeout=60)
    elapsed = time.monotonic() - tick
    output = run.output(0)
    assert returncode == distributed.EXIT_JOIN_FAILED, log_tail(output)
    who = rf"process {process_id} of 2 \(coordinator localhost:\d+\)"
    assert re.search(f"{who}: the processes did not all join within {timeout_s} s", output)
    assert elapsed < timeout_s + 30, elapsed  # start-up + timeout, not a hang
    assert not (tmp_path / "alone" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dead", [1, 0])  # 0 hosts the coordinator
def test_a_dead_process_stops_the_other_within_the_heartbeat(tmp_path, dead):
    """SIGKILL (an OOM kill, a lost host) leaves no chance to save: the survivor must not wait in
    a collective forever, nor for JAX's default 100 s, but exit non-zero soon after the
    heartbeat timeout. The last checkpoint stays as it was."""
    heartbeat_s = 5
    workdir = tmp_path / "killed"
    env = _env(4, **{distributed.ENV_HEARTBEAT: str(heartbeat_s)})
    run = _Run(workdir, "TrainConfig.num_steps=1000", env=env)
    try:
        while not (workdir / "metrics.jsonl").exists() or len(run.rows()) < 1:
            assert all(p.poll() is None for p in run.procs), run.tails()
            time.sleep(0.05)
        run.procs[dead].kill()
        survivor, deadline = run.procs[1 - dead], time.monotonic() + heartbeat_s + 30
        while survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # Measured: the survivor of a dead process 1 hangs past 65 s with JAX's default 100 s
        # heartbeat; a dead coordinator takes the survivor down at once either way.
        late = f"still running {heartbeat_s + 30} s after the kill"
        assert survivor.poll() is not None, f"{late}\n{run.tails()}"
        assert survivor.returncode != 0, run.tails()
    finally:
        run.kill()
