"""The trainer end to end: CLI, config dump, fail-fast bad input, exact resume, optimizers."""

import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from grpo import (
    checkpoint,
    checkpoint_jobs,
    configurables,
    evaluation,
    gather,
    profiling,
    sampling,
    train,
)
from grpo import experiment as experiment_lib
from grpo import metrics as metrics_lib
from grpo.data.gsm8k import load_examples
from grpo.models import loading, presets, splash
from grpo.models import transformer as tf
from grpo.models.config import ModelConfig
from grpo.phases import advantage, reward, rollout
from tests.log_tail import log_tail
from tests.tiny_experiment import tiny_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "gin/tests/tiny.gin")
# Timings and throughputs differ run to run; everything else must match exactly.
NONDETERMINISTIC = ("_seconds", "_per_s", "mfu")


def _cli(workdir, *bindings, timeout=600, flags=(), log_compiles=False):
    """`grpo.main` on tiny.gin; `log_compiles`: JAX logs "Compiling ..." for every compile."""
    cmd = [sys.executable, "-m", "grpo.main", f"--gin_file={TINY}", f"--workdir={workdir}"]
    cmd += [f"--gin_bindings={b}" for b in bindings] + list(flags)
    env = dict(os.environ, JAX_LOG_COMPILES="1") if log_compiles else None
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_runs_writes_metrics_checkpoint_and_config(tmp_path):
    result = _cli(
        tmp_path,
        "TrainConfig.num_steps=3",
        "TrainConfig.eval_every_steps=3",
        "TrainConfig.eval_samples=2",
        "TrainConfig.eval_pass_at=(1, 2)",
        "TrainConfig.eval_at_start=True",
        "TrainConfig.extra_eval_sets=('harder',)",
        "harder/make_dataset.source='synthetic'",
        "harder/make_dataset.difficulty=2",
        "harder/make_dataset.num_test=4",
        "TrainConfig.write_eval_completions=True",
        "TrainConfig.profile_steps=(3, 3)",
    )
    assert result.returncode == 0, log_tail(result.stderr)
    start, *rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    # A trace of step 3 alone, its phases named, beside TensorBoard's events.
    (trace,) = glob.glob(str(tmp_path / "tensorboard/plugins/profile/*/*.xplane.pb"))
    marked = _trace_marks(trace)
    assert marked["steps"] == {3}
    assert marked["phases"] >= {"rollout", "reward", "advantage", "update", "eval", "checkpoint"}
    assert start["step"] == 0 and "eval_accuracy" in start and "reward_mean" not in start
    for row in (start, rows[2]):
        for metric in ("eval_accuracy", "eval_mean_at_k", "eval_pass_at_k", "eval_maj_at_k"):
            assert 0 <= row[f"{metric}/harder"] <= 1
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "reward_mean",
        "loss",
        "kl",
        "entropy",
        "grad_norm",
        "learning_rate",
        "clip_frac_low",
        "clip_frac_high",
        "frac_reward_zero_std",
        "solve_all",
        "solve_none",
        "truncation_rate",
        "rollout_seconds",
        "update_seconds",
        "rollout_tokens_per_s",
    ):
        assert key in rows[0], key
    assert "eval_accuracy" in rows[2]
    assert 0 <= rows[2]["eval_mean_at_k"] <= rows[2]["eval_pass_at_k"] <= 1
    for row in (start, rows[2]):  # unbiased pass@1 is the mean, pass@n whether any is right
        assert row["eval_pass_at_1"] == pytest.approx(row["eval_mean_at_k"])
        assert row["eval_pass_at_2/harder"] == pytest.approx(row["eval_pass_at_k/harder"])
    # Every greedy eval reply, at steps 0 and 3: tiny.gin's 8 test problems and the 4 harder.
    replies = metrics_lib.read_metrics(tmp_path / metrics_lib.EVAL_COMPLETIONS_FILE)
    for step, row in ((0, start), (3, rows[2])):
        for name, count, suffix in (("test", 8, ""), ("harder", 4, "/harder")):
            mine = [r for r in replies if r["step"] == step and r["set"] == name]
            assert len(mine) == count
            assert np.mean([r["correct"] for r in mine]) == row["eval_accuracy" + suffix]
            assert np.mean([r["length"] for r in mine]) == row["eval_length_mean" + suffix]
    assert len(replies) == 2 * (8 + 4)
    # tiny.gin shows completions every 2 steps: all 8 of step 2, one group after another.
    completions = metrics_lib.read_metrics(tmp_path / "completions.jsonl")
    assert [r["step"] for r in completions] == [2] * 8
    assert np.mean([r["reward"] for r in completions]) == pytest.approx(rows[1]["reward_mean"])
    for group in (completions[:4], completions[4:]):
        assert len({r["question"] for r in group}) == 1
        assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-5)
    assert completions[0].keys() >= {"answer", "completion", "rewards", "length", "truncated"}
    assert os.path.isdir(tmp_path / "checkpoints" / "3")
    config = (tmp_path / "config.gin").read_text()
    assert "TrainConfig.num_steps = 3" in config
    assert "make_mesh.tp = 2" in config
    assert "step 3/3" in result.stderr
    assert "done: 3 steps" in result.stderr
    # --eval_only of every kept checkpoint (2 and 3): step 3's eval again, written beside,
    # nothing else.
    write_replies = "TrainConfig.write_eval_completions=True"
    flags = ["--eval_only", "--checkpoint_step=all"]
    result = _cli(tmp_path, "TrainConfig.num_steps=3", write_replies, flags=flags)
    assert result.returncode == 0, log_tail(result.stderr)
    evaluated = metrics_lib.read_metrics(tmp_path / metrics_lib.EVAL_FILE)
    greedy = ("eval_accuracy", "eval_length_mean", "eval_truncation_rate")
    assert [r["step"] for r in evaluated] == [2, 3]
    assert evaluated[1] == {"step": 3, **{key: rows[2][key] for key in greedy}}
    assert "eval of step 2: " in result.stderr and "eval of step 3: " in result.stderr
    assert (tmp_path / "config.gin").read_text() == config
    # ...and the same greedy replies as the run's own step-3 eval.
    again = metrics_lib.read_metrics(tmp_path / metrics_lib.EVAL_COMPLETIONS_FILE)[len(replies) :]
    assert [r for r in again if r["step"] == 3] == [
        r for r in replies if r["step"] == 3 and r["set"] == "test"
    ]
    assert len(again) == 2 * 8
    # --export_only of an older checkpoint; a step that is not there fails in one line.
    export = tmp_path / "step2"
    result = _cli(tmp_path, flags=[f"--export_only={export}", "--checkpoint_step=2"])
    assert result.returncode == 0, log_tail(result.stderr)
    assert json.loads((export / loading.EXPORT_INFO).read_text()) == {"step": 2}
    assert (export / "config.json").exists() and (export / "model.safetensors").exists()
    result = _cli(tmp_path, flags=["--eval_only", "--checkpoint_step=1"])
    assert result.returncode == 2
    assert "no checkpoint for step 1" in result.stderr and "available: [2, 3]" in result.stderr
    assert "Traceback" not in result.stderr
    # A resume that does not fit the checkpoints fails in one line and keeps the config that
    # wrote them.
    result = _cli(tmp_path, "TrainConfig.num_steps=4", "make_optimizer.name='adamw'")
    assert result.returncode == 2 and "does not fit this run's state" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "config.gin").read_text() == config
    # The finished run started again has nothing to do, and says so.
    metrics_before = (tmp_path / "metrics.jsonl").read_text()
    result = _cli(tmp_path, "TrainConfig.num_steps=3")
    assert result.returncode == 0, log_tail(result.stderr)
    assert "done: 3 steps, last reward n/a" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == metrics_before
    # Export and eval read only the policy, so the optimizer setting does not matter there.
    result = _cli(tmp_path, "make_optimizer.name='adamw'", flags=[f"--export_only={export}"])
    assert result.returncode == 0, log_tail(result.stderr)
    assert json.loads((export / loading.EXPORT_INFO).read_text()) == {"step": 3}


def _trace_marks(path):
    """The step numbers and the phase names a jax.profiler trace file holds."""
    marks = {"steps": set(), "phases": set()}
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for event in (e for line in plane.lines for e in line.events):
            stats = dict(event.stats)
            if "step_num" in stats:
                marks["steps"].add(stats["step_num"])
            marks["phases"].add(event.name)
    return marks


@pytest.mark.parametrize(
    "binding, message",
    [
        ("make_optimiser.name='adamw'", "make_optimiser"),  # misspelled configurable
        ("make_optimizer.nmae='adamw'", "nmae"),  # misspelled parameter
        ("make_optimizer.name='adamx'", "unknown optimizer 'adamx'"),  # bad value
        ("TrainConfig.num_steps='3'", "TrainConfig.num_steps must be int, got '3' (str)"),
        ("TrainConfig.num_steps = ", "gin: Unable to parse value"),
        ("make_rewards.overlong_buffer=17", "exceeds the token budget"),  # tiny.gin: 16 tokens
        ("make_model.adapter='/no/such/adapter'", "no PEFT adapter in /no/such/adapter"),
        ("TrainConfig.completions_per_micro_batch=2", "do not split over dp x fsdp = 4"),
    ],
)
def test_bad_bindings_fail_fast(tmp_path, binding, message):
    bindings = [binding] if isinstance(binding, str) else binding
    result = _cli(tmp_path, *bindings, timeout=120, log_compiles=True)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Compiling" not in result.stderr and not (tmp_path / "metrics.jsonl").exists()


# The same refusals in-process (each CLI case above costs a process start): every one comes
# from the configuration alone, before the weights would be read.
@pytest.mark.parametrize(
    "binding, message",
    [
        ("make_model.lora_targets=('q',)", "need make_model.lora_rank > 0"),  # not ignored
        (
            ("make_rewards.names=('no_such_module:fn',)", "make_rewards.weights=(1.0,)"),
            "cannot import reward function 'no_such_module:fn'",
        ),
        (("make_model.lora_rank=4", "make_model.lora_targets=('qkv',)"), "LoRA targets must be"),
        ("TrainConfig.ref_sync_every_steps=2", "needs a reference of its own to move"),
        ("make_dataset.num_train=1", "1 train examples are fewer than one step's"),
        ("make_lr_schedule.peak_value=-1e-6", "learning rates must be >= 0"),
        ("make_model.dtype='fp8'", "dtype must be bfloat16|float32"),
        ("make_model.param_dtype='bfloat16'", "a step under 1/256 of a weight rounds away"),
        ("make_loss.max_completion_length=16", "it needs make_loss.aggregation="),  # else unused
        ("make_model.attention_impl='cudnn'", "'cudnn' needs an NVIDIA GPU"),  # not after a rollout
        ("make_sampling.max_new_tokens=None", "max_new_tokens must be int, got None"),
        (
            ("TrainConfig.best_export_dir='/tmp/best'", "TrainConfig.eval_every_steps=0"),
            "eval_every_steps=0 makes none (or bind it for a follower alone",
        ),
    ],
)
def test_bad_bindings_are_refused_by_the_configuration_alone(length_reward, binding, message):
    bindings = [binding] if isinstance(binding, str) else binding
    with pytest.raises(ValueError, match=re.escape(message)):
        _experiment(*bindings, read_params=False)


def test_the_effective_batch_counts_each_shared_prompt_once(length_reward):
    # tiny.gin: 2 prompts x 4 samples in one micro-batch; prompts up to 128 tokens, 16 new.
    lines = {
        shared: experiment_lib.effective_batch_lines(
            _experiment(f"TrainConfig.shared_prompt_forward={shared}", read_params=False)
        )[-1]
        for shared in (False, True)
    }
    assert lines[False] == "batch per micro-batch (1 per update): 8 completions, <= 1152 tokens"
    assert lines[True] == (
        "batch per micro-batch (1 per update): 8 completions, <= 384 tokens; each of its 2 "
        "prompts run once for its group"
    )


def test_dry_run_checks_everything_and_compiles_nothing(tmp_path):
    result = _cli(
        tmp_path / "run",
        "TrainConfig.micro_batch_width_buckets=3",
        flags=["--dry_run"],
        timeout=120,
        log_compiles=True,
    )
    assert result.returncode == 0, log_tail(result.stderr)
    assert "dry run: the configuration is valid (64 train / 8 test examples)" in result.stderr
    assert "batch per step: 2 prompts x 4 samples" in result.stderr
    assert "1 update(s) per step (1 pass(es) x 1 mini-batch(es))" in result.stderr
    assert "batch per update: 2 prompts, 8 completions" in result.stderr
    assert "sorted by length, each at the narrowest of 3 widths" in result.stderr
    assert "held per device (GB): params " in result.stderr
    assert "a rollout's KV cache adds " in result.stderr
    assert "Compiling" not in result.stderr and not (tmp_path / "run").exists()


def test_real_weights_are_read_once_every_check_has_passed(monkeypatch, length_reward):
    reads = []
    monkeypatch.setattr(loading, "params_from_hf_state_dict", lambda *args: reads.append(args))
    monkeypatch.setattr(loading, "_open_gguf", functools.cache(loading._open_gguf))  # parse once
    real = "make_model.preset=None"  # SmolLM2's GGUF weights, not tiny.gin's random ones
    for unused in ("make_model.seed=1", "make_model.tokenizer='Qwen/Qwen2.5-0.5B-Instruct'"):
        with pytest.raises(ValueError, match="make_model.tokenizer and seed are a preset's"):
            _experiment(real, unused, read_params=False)
    with pytest.raises(ValueError, match="do not split over dp x fsdp"):
        _experiment(real, "TrainConfig.completions_per_micro_batch=2")
    # A device too small for the state alone (135M params and their Lion state in fp32, over
    # tiny.gin's fsdp x tp = 4 shards), as a GPU would report it.
    small_gpu = type("Gpu", (), {"memory_stats": lambda self: {"bytes_limit": 10**8}})()
    with monkeypatch.context() as patch:
        patch.setattr(jax, "local_devices", lambda: [small_gpu])
        with pytest.raises(ValueError, match=r"needs 0.322 GB per device .*than the 0.1 GB JAX"):
            _experiment(real)
        # An eval or an export holds no optimizer state.
        _experiment(real, eval_only=True, read_params=False)
        _experiment(real, trains=False, read_params=False)
    assert not reads
    assert _experiment(real, read_params=False).params is None  # --dry_run
    assert not reads
    _experiment(real)
    assert len(reads) == 1


@pytest.mark.parametrize(
    "where",
    [
        "workdir",
        "TrainConfig.export_dir",  # written after the last step
        "TrainConfig.best_export_dir",
    ],
)
def test_output_folders_that_cannot_be_written_fail_fast(tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    workdir = blocker / "run" if where == "workdir" else tmp_path / "run"
    bindings = [] if where == "workdir" else [f"{where}='{blocker / 'hf'}'"]
    result = _cli(workdir, *bindings, timeout=120, log_compiles=True)
    assert result.returncode == 2, log_tail(result.stderr)
    assert f"{blocker} is a file, not a directory" in result.stderr
    assert "Compiling" not in result.stderr and not (tmp_path / "run").exists()


def test_a_folder_that_refuses_writes_is_named(tmp_path, monkeypatch):
    def refuse(dir):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(experiment_lib.tempfile, "mkdtemp", refuse)
    with pytest.raises(ValueError, match=f"--workdir={tmp_path}/new: cannot write in {tmp_path} "):
        experiment_lib.check_writable_dir(str(tmp_path / "new"), "--workdir")


def test_a_url_is_refused_as_an_output_folder(tmp_path):
    with pytest.raises(ValueError, match="--workdir=gs://bucket/run: a URL; give a local path"):
        experiment_lib.check_writable_dir("gs://bucket/run", "--workdir")
    assert not os.path.exists("gs:")


def test_attention_kernels_are_refused_off_their_platform():
    tiny = lambda **kw: presets.preset("tiny-qwen2", **kw)
    check = configurables._check_attention_platform
    check(tiny(attention_impl="cudnn"), "gpu")  # bf16 activations by default
    with pytest.raises(ValueError, match=r"dtype='bfloat16' \(this run: gpu, float32\)"):
        check(tiny(attention_impl="cudnn", dtype="float32"), "gpu")
    with pytest.raises(ValueError, match="a TPU kernel: on a GPU use 'cudnn'"):
        check(tiny(attention_impl="splash"), "gpu")
    check(tiny(attention_impl="splash"), "cpu")  # interpreted, as the tests run it
    check(tiny(attention_impl="auto"), "gpu")
    tf.check_shared_prompt_attention(tiny(attention_impl="splash"))
    with pytest.raises(ValueError, match="not attention_impl='cudnn' \\(self-attention only\\)"):
        tf.check_shared_prompt_attention(tiny(attention_impl="cudnn"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint_step=2"], "--checkpoint_step needs --eval_only or --export_only"),
        (["--export_only=/tmp/x", "--checkpoint_step=all"], "--checkpoint_step=all: want a step N"),
        (["--eval_only", "--checkpoint_step=2,x"], "want a step N, steps 'N,M,...' or 'all'"),
        (["--eval_only", "--export_only=/tmp/x"], "--eval_only and --export_only: one at a time"),
        (["--eval_only", "--follow", "--checkpoint_step=2"], "--follow needs --eval_only, with"),
        (["--eval_only", "--follow", "--follow_poll_s=-1"], "--follow_poll_s: seconds, >= 0"),
        (["--gin_file=gin/no_such.gin"], "invalid configuration: gin: Unable to open file"),
        (
            ["--eval_only", "--gin_bindings=make_dataset.test_split=None"]
            + ["--gin_bindings=TrainConfig.eval_every_steps=0"],  # (a run's own evals refuse it)
            "--eval_only needs test examples; make_dataset.test_split gives none",
        ),
    ],
)
def test_bad_flag_combinations_fail_fast(tmp_path, flags, message):
    result = _cli(tmp_path, flags=flags, timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "prompts, per_micro, micro_batches",
    [(16, 16, 8), (16, None, 1), (1, 16, 1)],  # gsm8k.gin's cap; no cap; its smoke run (8 < 16)
)
def test_completions_per_micro_batch_caps_a_pass(prompts, per_micro, micro_batches):
    config = train.TrainConfig(prompts_per_step=prompts, completions_per_micro_batch=per_micro)
    assert config.num_micro_batches == micro_batches


def test_prompts_per_update_splits_each_pass_into_mini_batches():
    config = train.TrainConfig(
        prompts_per_step=16, prompts_per_update=4, num_iterations=2, completions_per_micro_batch=8
    )
    assert (config.updates_per_pass, config.updates_per_step) == (4, 8)
    assert (config.completions_per_update, config.num_micro_batches) == (32, 4)
    with pytest.raises(ValueError, match="completions_per_micro_batch=24 must divide the 32 "):
        _ = dataclasses.replace(config, completions_per_micro_batch=24).num_micro_batches


def test_a_micro_batch_that_does_not_divide_the_step_is_refused():
    config = train.TrainConfig(prompts_per_step=3, completions_per_micro_batch=16)
    with pytest.raises(ValueError, match="completions_per_micro_batch=16 must divide the 24"):
        _ = config.num_micro_batches


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0), "TrainConfig.num_steps must be >= 1, got 0"),
        (dict(num_generations=1), "num_generations must be >= 2: a completion's advantage"),
        (dict(micro_batch_width_buckets=0), "TrainConfig.micro_batch_width_buckets must be >= 1"),
        (dict(checkpoints_to_keep=0), "TrainConfig.checkpoints_to_keep must be >= 1, got 0"),
        (dict(eval_prompts_per_batch=0), "TrainConfig.eval_prompts_per_batch must be >= 1"),
        (dict(eval_every_steps=-1), "TrainConfig.eval_every_steps must be >= 0 (0: never)"),
        (dict(checkpoint_every_steps=-5), "TrainConfig.checkpoint_every_steps must be >= 0"),
        (dict(show_completions_every_steps=-1), "show_completions_every_steps must be >= 0"),
        (dict(eval_examples=0), "TrainConfig.eval_examples must be >= 1 or None (all), got 0"),
        (dict(completions_per_micro_batch=0), "completions_per_micro_batch must be >= 1 or None"),
        (dict(prompt_buckets=()), "TrainConfig.prompt_buckets must be token counts >= 1, got ()"),
        (dict(completion_buckets=[64, 0]), "completion_buckets must be token counts >= 1"),
        (dict(reward_timeout_s=0.0), "TrainConfig.reward_timeout_s must be > 0, got 0.0"),
        (dict(seed=-1), "TrainConfig.seed must be >= 0, got -1"),
        (dict(prompts_per_update=3), "prompts_per_update=3 must divide prompts_per_step=16"),
        (dict(prompts_per_update=0), "prompts_per_update=0 must divide prompts_per_step=16"),
        (dict(eval_samples=-1), "TrainConfig.eval_samples must be >= 0"),
        (dict(eval_temperature=0.0), "TrainConfig.eval_temperature must be > 0"),
        (dict(eval_temperature=0.6), "needs TrainConfig.eval_samples > 0"),  # else unused
        (dict(eval_pass_at=(1,)), "it needs TrainConfig.eval_samples > 0"),
        (dict(eval_samples=4, eval_pass_at=(1, 5)), "distinct k in [1, eval_samples=4]"),
        (dict(eval_samples=4, eval_pass_at=(2, 2)), "distinct k in [1, eval_samples=4]"),
        (dict(advantage_scale="std"), "advantage_scale must be one of group|batch|none|rloo"),
        (dict(reward_aggregation="sum"), "reward_aggregation must be one of sum_then_normalize|"),
        (
            dict(reward_aggregation="normalize_then_sum", advantage_scale="batch"),
            "it needs advantage_scale='group', not 'batch'",
        ),
        (dict(max_prompt_tokens=1025), "max_prompt_tokens must be in [1, 1024]"),
        (dict(question_template="Solve: {q}"), "must hold {question} once"),
        (dict(extra_eval_sets=("a", "a")), "extra_eval_sets must be distinct gin scope names"),
        (dict(ref_sync_alpha=0.0), "ref_sync_alpha in (0, 1]"),
        (dict(ref_sync_alpha=0.9), "ref_sync_alpha needs ref_sync_every_steps > 0"),
        (dict(best_export_metric="eval_pass_at_k"), "valid: eval_accuracy"),  # no eval_samples
        (dict(best_export_metric="eval_length_mean"), "is not a metric the eval reports"),
        (dict(extra_eval_sets=("math-500",)), "extra_eval_sets must be distinct gin scope names"),
        (dict(extra_train_sets=("a", "a")), "extra_train_sets must be distinct gin scope names"),
        (dict(system_prompt="Write \frac{1}{2}"), "holds the control character \\f (a LaTeX"),
        (dict(question_template="{question} \boxed{}"), "holds the control character \\b"),
        (dict(answer_match="sympy"), "answer match must be one of numeric, math_verify"),
        (dict(use_chat_template=False), "the question template is the whole prompt"),
        (
            dict(use_chat_template=False, system_prompt=None, chat_template_kwargs={"a": 1}),
            "set system_prompt=None and no chat_template_kwargs",
        ),
        (dict(profile_steps=(0, 2)), "1 <= first <= last <= num_steps=100"),
        (dict(profile_steps=(5, 4)), "TrainConfig.profile_steps=(5, 4) must be (first, last)"),
        (dict(num_steps=3, profile_steps=[2, 4]), "profile_steps=(2, 4) must be"),  # gin: lists
        (dict(profile_steps=(2,)), "TrainConfig.profile_steps must be tuple[int, int] | None"),
        (
            dict(shared_prompt_forward=True, completions_per_micro_batch=4),  # groups of 8
            "4 completions per micro-batch are not a multiple of num_generations=8",
        ),
    ],
)
def test_train_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.TrainConfig(**kwargs)


def _length_reward(completion, example):
    """Varies across random completions, so even a tiny random policy gets a gradient."""
    return len(completion) / 100.0


def _half_flat_reward(completion, example):
    """Equal rewards for problems with an odd answer; the reply's length for the others."""
    answer = int(example["answer"].rsplit("####", 1)[1])
    return 0.0 if answer % 2 else len(completion) / 100.0


def _record_generate(monkeypatch, record):
    """Makes the trainer's rollout call `record(prompt_tokens, kwargs)` before sampling."""
    generate = sampling.generate

    def recording_generate(params, tokens, mask, key, **kwargs):
        record(tokens, kwargs)
        return generate(params, tokens, mask, key, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording_generate)


@pytest.fixture
def length_reward(monkeypatch):
    monkeypatch.setitem(reward.REWARD_FUNCTIONS, "length", _length_reward)


def _experiment(*bindings, read_params=True, eval_only=False, trains=True):
    """tiny.gin's experiment with the length reward and `bindings`, built as main builds it."""
    length = ("make_rewards.names=('length',)", "make_rewards.weights=(1.0,)")
    return tiny_experiment(
        *length, *bindings, read_params=read_params, eval_only=eval_only, trains=trains
    )


def _train_in_process(workdir, *bindings, stop_after=None):
    """Runs the trainer as main does; optionally SIGTERMs itself after step `stop_after`."""
    experiment = _experiment(*bindings)
    write = metrics_lib.MetricsWriter.write

    def write_then_maybe_stop(self, step, values):
        write(self, step, values)
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)

    original = metrics_lib.MetricsWriter.write
    metrics_lib.MetricsWriter.write = write_then_maybe_stop
    try:
        return train.train(experiment, str(workdir))
    finally:
        metrics_lib.MetricsWriter.write = original


def _deterministic(rows):
    return [{k: v for k, v in r.items() if not k.endswith(NONDETERMINISTIC)} for r in rows]


def _small_answers_right(completion, example, **kwargs):
    """Every reply to a problem whose answer is below 6 is right; none to the others."""
    return int(example["answer"].rsplit("####", 1)[1]) < 6


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "dynamic_lora", "ref_sync", "retire_mini_batches"])
def test_resume_after_sigterm_is_exact(tmp_path, length_reward, monkeypatch, variant):
    # dynamic: extra rollout rounds draw prompts inside a step; the stream must still resume
    # where the step left it. lora: the checkpoint holds the adapters; the base is reloaded.
    # ref_sync: the KL reference becomes the policy at step 2 (alpha 1), so step 3's KL is 0;
    # the checkpoint must carry that reference (the reloaded model's would give KL > 0). With
    # adaptive entropy control at a target above the tiny model's entropy, whose state the
    # checkpoint must carry too (a fresh controller would apply no bonus at step 3).
    # mini_batches: two optimizer updates per step; the resumed run must still count GRPO steps.
    # The second is off the policy, where the off-policy sequence mask drops drifted negatives
    # and the KL estimate is importance weighted.
    # retire: 4 problems, 2 a step; the two with answers below 6 are always solved in epoch 0
    # (steps 1-2) and must stay out of steps 3-4, also after the resume.
    # plain: also resumed on another mesh, fsdp 8 instead of dp 2 x fsdp 2 x tp 2 (another
    # slice after a preemption): the checkpoint is resharded onto the new layout, and the run
    # goes on as it would have, up to float summation order.
    # Variants that cannot clash share a case (each case trains three times).
    common = ["TrainConfig.eval_every_steps=0"]
    retire, mini_batches = "retire" in variant, "mini_batches" in variant
    dynamic, lora = "dynamic" in variant, "lora" in variant
    if retire:
        monkeypatch.setattr(reward, "is_correct", _small_answers_right)
        common += [
            "TrainConfig.retire_solved_prompts=True",
            "make_dataset.num_train=4",
            "TrainConfig.show_completions_every_steps=1",
        ]
    if mini_batches:
        common += [
            "TrainConfig.prompts_per_update=1",
            "make_loss.beta=0.1",
            "make_loss.off_policy_mask_threshold=1e-4",
            "make_loss.kl_importance_weighted=True",
        ]
    if variant == "ref_sync":
        common += [
            "make_loss.beta=0.1",
            "TrainConfig.ref_sync_every_steps=2",
            "TrainConfig.ref_sync_alpha=1.0",
            "make_loss.entropy_target=100.0",
            "make_loss.entropy_coeff=0.01",
            "make_loss.entropy_coeff_delta=0.01",
        ]
    if dynamic:
        monkeypatch.setitem(reward.REWARD_FUNCTIONS, "length", _half_flat_reward)
        common.append("TrainConfig.max_sampling_rounds=3")
    if lora:
        common.append("make_model.lora_rank=4")
    export = "TrainConfig.export_dir='{}'"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train_in_process(straight, *common, export.format(straight / "export"))
    with pytest.raises(train.Preempted):
        _train_in_process(resumed, *common, stop_after=2)
    assert [r["step"] for r in metrics_lib.read_metrics(resumed / "metrics.jsonl")] == [1, 2]
    if variant == "plain":
        other_mesh = tmp_path / "other_mesh"
        shutil.copytree(resumed, other_mesh)
        _train_in_process(
            other_mesh, *common, "make_mesh.dp=1", "make_mesh.fsdp=8", "make_mesh.tp=1"
        )
    _train_in_process(resumed, *common, export.format(resumed / "export"))

    rows_a = _deterministic(metrics_lib.read_metrics(straight / "metrics.jsonl"))
    rows_b = _deterministic(metrics_lib.read_metrics(resumed / "metrics.jsonl"))
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert rows_a == rows_b  # bitwise on CPU: same program, same inputs, same RNG keys
    if variant == "plain":  # the same samples and rewards; sums in another order
        rows_c = _deterministic(metrics_lib.read_metrics(other_mesh / "metrics.jsonl"))
        assert rows_c[:2] == rows_a[:2] and len(rows_c) == 4
        for a, c in zip(rows_a[2:], rows_c[2:], strict=True):
            assert a.keys() == c.keys()
            for key in a:
                assert c[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert rows_a[-1]["grad_norm"] > 0  # the runs really trained
    if dynamic:
        assert sum(r["sampling_rounds"] for r in rows_a[2:]) > 2, "resumed steps took one round"
    if variant == "ref_sync":
        assert [r["kl"] == 0.0 for r in rows_a] == [True, False, True, False]
        coeffs = [r["entropy_coeff"] for r in rows_a]  # none before an entropy was measured
        assert coeffs == pytest.approx([0.0, 0.02, 0.03, 0.04])
    if mini_batches:  # the schedule spans 8 updates: the last is still above 0
        assert rows_a[-1]["learning_rate"] > 0 and rows_a[0]["kl"] > 0
        assert max(r["off_policy_masked_frac"] for r in rows_a) > 0
    if retire:
        _check_solved_prompts_retired(straight, rows_a)
    params_a = load_file(straight / "export" / "model.safetensors")
    params_b = load_file(resumed / "export" / "model.safetensors")
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name], err_msg=name)


def _record_width_buckets(monkeypatch) -> list[tuple[str, int, int]]:
    """(pass, micro-batches, width buckets) of each update and reference function built."""
    built = []
    for name, attribute in (("update", "make_update_fn"), ("reference", "make_reference_logps_fn")):
        make = getattr(train, attribute)

        def record(*args, name=name, make=make, **kwargs):
            built.append((name, kwargs["num_micro_batches"], kwargs["width_buckets"]))
            return make(*args, **kwargs)

        monkeypatch.setattr(train, attribute, record)
    return built


def _check_solved_prompts_retired(workdir, rows):
    completions = metrics_lib.read_metrics(workdir / "completions.jsonl")
    solved = lambda record: int(record["answer"]) < 6
    assert all(r["correct"] == solved(r) for r in completions)
    epoch_0 = [r for r in completions if r["step"] <= 2]
    assert len({r["question"] for r in epoch_0}) == 4
    assert len({r["question"] for r in epoch_0 if solved(r)}) == 2  # synthetic answers 7 5 3 29
    at_step_1 = len({r["question"] for r in epoch_0 if r["step"] == 1 and solved(r)})
    assert [r["retired_prompts"] for r in rows] == [at_step_1, 2, 2, 2]
    assert [(r["solve_all"], r["solve_none"]) for r in rows] == [
        (at_step_1 / 2, 1 - at_step_1 / 2),
        (1 - at_step_1 / 2, at_step_1 / 2),
        (0.0, 1.0),
        (0.0, 1.0),
    ]
    assert not any(solved(r) for r in completions if r["step"] > 2)


@pytest.mark.slow
def test_a_stop_string_ends_sampled_and_eval_replies(tmp_path, length_reward):
    # "e" is in many of SmolLM2's tokens, so the tiny random policy meets it within a few: no
    # reply may run on to the budget with an "e" in it, in the steps or in the eval.
    _train_in_process(
        tmp_path,
        "make_sampling.stop_strings=('e',)",
        "TrainConfig.num_steps=2",
        "TrainConfig.write_eval_completions=True",
    )
    rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    sampled = metrics_lib.read_metrics(tmp_path / "completions.jsonl")
    replies = metrics_lib.read_metrics(tmp_path / metrics_lib.EVAL_COMPLETIONS_FILE)
    for records in (sampled, replies):
        assert not [r for r in records if r["truncated"] and "e" in r["completion"]]
        stopped = [r for r in records if not r["truncated"] and "e" in r["completion"]]
        assert len(stopped) >= len(records) // 4, records
    assert rows[-1]["completion_length_mean"] < 8 and rows[-1]["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizers_train(tmp_path, length_reward, optimizer):
    summary = _train_in_process(
        tmp_path,
        f"make_optimizer.name='{optimizer}'",
        "TrainConfig.num_steps=2",
        "TrainConfig.eval_every_steps=0",
    )
    rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    assert summary["steps"] == 2
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert json.loads(json.dumps(rows))  # plain JSON scalars


@pytest.mark.slow
def test_kl_to_the_frozen_reference_with_one_prefill_per_prompt(
    tmp_path, length_reward, monkeypatch
):
    # 4 prompts divide over tiny.gin's dp x fsdp = 4 batch shards, so each prompt is prefilled
    # once and its 4 samples share the cache. (Tests with 2 prompts cover the fallback: rows
    # repeated on the host.) The run also adds the overlong penalty and the length reward, and
    # runs the update's and the reference pass's 2 micro-batches length-sorted, in 2 widths.
    calls = []
    _record_generate(
        monkeypatch, lambda tokens, kwargs: calls.append((tokens.shape[0], kwargs["num_samples"]))
    )
    width_buckets = _record_width_buckets(monkeypatch)
    _train_in_process(
        tmp_path,
        "TrainConfig.micro_batch_width_buckets=2",
        "make_loss.beta=0.04",
        "make_optimizer.name='adamw'",
        "TrainConfig.num_steps=2",
        "TrainConfig.prompts_per_step=4",
        "TrainConfig.eval_every_steps=0",
        "make_rewards.overlong_buffer=8",
        "make_rewards.overlong_weight=0.5",
        "make_rewards.length_reward_weight=0.3",
    )
    assert calls == [(4, 4), (4, 4)]
    assert set(width_buckets) == {("update", 2, 2), ("reference", 2, 2)}
    rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    for row in rows:  # a truncated completion's penalty is -1; one in the buffer's is in (-1, 0]
        assert -1.0 <= row["reward/overlong"] <= -row["truncation_rate"]
        assert -0.5 <= row["reward/length_reward"] <= 0.0  # a random policy is never right
        total = row["reward/length"] + 0.5 * row["reward/overlong"]
        total += 0.3 * row["reward/length_reward"]
        np.testing.assert_allclose(row["reward_mean"], total, rtol=1e-5)
    first, second = rows
    assert first["kl"] == 0.0  # step 1 samples from the reference itself
    assert second["kl"] > 0.0  # after one update the policy has moved away from it
    assert "reference_seconds" in first


@pytest.mark.slow
def test_splash_attention_trains_like_einsum_attention(tmp_path, length_reward, monkeypatch):
    # The sampler decodes with einsum attention either way, so step 1 samples the same
    # completions and the update differs only in its attention kernel, which must run per
    # shard of tiny.gin's mesh (a TPU kernel cannot be partitioned by XLA).
    sharded_calls = []
    specs = splash._specs
    monkeypatch.setattr(splash, "_specs", lambda *a: sharded_calls.append(a) or specs(*a))
    rows = {}
    for impl in ("xla", "splash"):
        _train_in_process(
            tmp_path / impl,
            f"make_model.attention_impl='{impl}'",
            "TrainConfig.num_steps=1",
            "TrainConfig.eval_every_steps=0",
        )
        (rows[impl],) = metrics_lib.read_metrics(tmp_path / impl / "metrics.jsonl")
    assert sharded_calls  # the update traced splash under train's mesh
    assert rows["xla"]["grad_norm"] > 0
    for key in ("loss", "entropy", "grad_norm", "reward_mean"):
        assert rows["splash"][key] == pytest.approx(rows["xla"][key], rel=1e-4, abs=1e-7), key


@pytest.mark.slow
def test_shared_prompt_forward_trains_like_the_per_completion_forward(
    tmp_path, length_reward, monkeypatch
):
    # tiny.gin's mesh (dp 2 x fsdp 2 x tp 2); 4 prompts x 4 in 2 mini-batch updates of 2
    # micro-batches, so each micro-batch is one group: one prompt row over 4 batch shards. The
    # KL reference pass shares prompts too (the second update's KL is > 0), and attends with
    # splash (per shard, in Pallas' interpreter; the sampler decodes with einsum attention
    # either way). Same sampled completions, same metrics. (With width buckets too: the update
    # tests; here they would double the compile.)
    groups_traced = []
    shared_forward = tf.forward_shared_prompts
    monkeypatch.setattr(
        tf,
        "forward_shared_prompts",
        lambda *args, **kw: groups_traced.append(kw["group"]) or shared_forward(*args, **kw),
    )
    splash_widths = []  # (queries, keys) of each splash call traced
    splash_attention = splash.attention
    monkeypatch.setattr(
        splash,
        "attention",
        lambda q, k, *rest: (
            splash_widths.append((q.shape[1], k.shape[1])) or splash_attention(q, k, *rest)
        ),
    )
    rows = {}
    for shared in (False, True):
        _train_in_process(
            tmp_path / str(shared),
            "make_loss.beta=0.04",
            "TrainConfig.num_steps=1",
            "TrainConfig.prompts_per_step=4",
            "TrainConfig.prompts_per_update=2",
            "TrainConfig.completions_per_micro_batch=4",
            "TrainConfig.eval_every_steps=0",
            f"TrainConfig.shared_prompt_forward={shared}",
            f"make_model.attention_impl={'splash' if shared else 'xla'!r}",
        )
        rows[shared] = _deterministic(
            metrics_lib.read_metrics(tmp_path / str(shared) / "metrics.jsonl")
        )
    assert groups_traced and set(groups_traced) == {4}  # the update's and the reference's
    assert any(queries < keys for queries, keys in splash_widths)  # completions after prompts
    assert rows[True][-1]["kl"] > 0
    for plain, shared in zip(rows[False], rows[True], strict=True):
        assert plain.keys() == shared.keys()
        for key, value in plain.items():
            assert shared[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def _steps_without(rows, key):
    return [{k: v for k, v in r.items() if k != key} for r in _deterministic(rows)]


@pytest.mark.slow
def test_dynamic_sampling_fills_the_step_with_groups_whose_rewards_differ(tmp_path, monkeypatch):
    monkeypatch.setitem(reward.REWARD_FUNCTIONS, "length", _half_flat_reward)
    prompts_per_round = []
    _record_generate(
        monkeypatch, lambda tokens, kwargs: prompts_per_round.append(np.asarray(tokens).tobytes())
    )
    _train_in_process(
        tmp_path,
        "TrainConfig.max_sampling_rounds=4",
        "TrainConfig.num_steps=3",
        "TrainConfig.eval_every_steps=0",
        "TrainConfig.show_completions_every_steps=1",
    )
    rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    rounds = [r["sampling_rounds"] for r in rows]
    assert max(rounds) > 1, "the seed should need a second round somewhere"
    assert len(prompts_per_round) == sum(rounds)  # one rollout per round...
    assert len(set(prompts_per_round)) == sum(rounds)  # ...each of fresh prompts
    for row in rows:
        if row["sampling_rounds"] < 4:  # found enough: no equal-reward group trains
            assert row["frac_reward_zero_std"] == 0.0, row
        assert row["grad_norm"] > 0
    # The kept rows keep their own problems: each logged reward is its reply's to its problem.
    completions = metrics_lib.read_metrics(tmp_path / "completions.jsonl")
    assert [r["step"] for r in completions] == [1] * 8 + [2] * 8 + [3] * 8
    for record in completions:
        example = {"question": record["question"], "answer": f"#### {record['answer']}"}
        assert record["reward"] == pytest.approx(_half_flat_reward(record["completion"], example))


@pytest.mark.slow
def test_dynamic_sampling_keeps_a_first_round_whose_groups_all_differ(tmp_path, length_reward):
    # With every group informative the first round is the step: same batch, same metrics.
    common = ("TrainConfig.num_steps=2", "TrainConfig.eval_every_steps=0")
    _train_in_process(tmp_path / "one", *common)
    _train_in_process(tmp_path / "dynamic", *common, "TrainConfig.max_sampling_rounds=3")
    one = metrics_lib.read_metrics(tmp_path / "one" / "metrics.jsonl")
    dynamic = metrics_lib.read_metrics(tmp_path / "dynamic" / "metrics.jsonl")
    assert [r["sampling_rounds"] for r in dynamic] == [1, 1]
    assert all(r["frac_reward_zero_std"] == 0.0 for r in one)
    assert _steps_without(dynamic, "sampling_rounds") == _deterministic(one)


@pytest.mark.slow
def test_lora_trains_adapters_on_a_frozen_base(tmp_path, length_reward, monkeypatch):
    placed = []  # host trees placed on the mesh as model params
    place = train.place_params
    monkeypatch.setattr(
        train,
        "place_params",
        lambda mesh, model, host: placed.append(host) or place(mesh, model, host),
    )
    targets = ("q", "o", "down")
    export = tmp_path / "hf"
    _train_in_process(
        tmp_path,
        "make_model.lora_rank=4",
        f"make_model.lora_targets={targets}",
        "make_loss.beta=0.04",
        "make_optimizer.name='adamw'",
        "TrainConfig.num_steps=2",
        "TrainConfig.eval_every_steps=0",
        f"TrainConfig.export_dir='{export}'",
    )
    assert len(placed) == 1, "the frozen base is the KL reference too: no second copy"
    first, second = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    assert first["kl"] == 0.0 and second["kl"] > 0.0  # fresh adapters start at the base
    assert first["grad_norm"] > 0 and second["grad_norm"] > 0
    # The sampler decodes with the adapters the update trains: one update per rollout scores
    # its tokens with the sampling policy (a sampler on the bare base is off by ~2e-4 here).
    assert second["ratio_mean"] == pytest.approx(1.0, abs=2e-5)

    config = ModelConfig.from_hf(json.loads((export / "config.json").read_text()))
    exported = loading.params_from_hf_state_dict(load_file(export / "model.safetensors"), config)
    base = placed[0]
    for name in ("embed", "final_norm"):
        np.testing.assert_array_equal(exported[name], base[name], err_msg=name)
    for name, value in base["layers"].items():
        moved = not np.array_equal(exported["layers"][name], value)
        assert moved == (name in targets), name
    adapter = load_file(export / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * len(targets) * config.num_layers  # lora_A and lora_B per module


@pytest.mark.slow
def test_best_export_keeps_the_best_eval_across_a_resume(tmp_path, length_reward, monkeypatch):
    # The chosen metric, an extra set's accuracy, reads 0.2, 0.5, 0.3 (then SIGTERM), and 0.4
    # after the resume: the best export is step 2's, and the resumed run, which has not beaten
    # it, leaves it alone. (The main set's accuracy, 1 minus it, would pick step 1.)
    accuracies = iter([0.2, 0.5, 0.3, 0.4])

    def stand_in(exp, params, on_replies):
        accuracy = next(accuracies)
        return {"eval_accuracy": 1 - accuracy, "eval_accuracy/hard": accuracy}

    monkeypatch.setattr(evaluation, "evaluate", stand_in)
    best, final = tmp_path / "best", tmp_path / "final"
    common = [
        "TrainConfig.eval_every_steps=1",
        f"TrainConfig.best_export_dir='{best}'",
        "TrainConfig.extra_eval_sets=('hard',)",
        "hard/make_dataset.source='synthetic'",
        "TrainConfig.best_export_metric='eval_accuracy/hard'",
    ]
    info = lambda: json.loads((best / loading.EXPORT_INFO).read_text())
    with pytest.raises(train.Preempted):
        _train_in_process(tmp_path / "run", *common, stop_after=3)
    assert info() == {"step": 2, "eval_accuracy/hard": 0.5}
    _train_in_process(tmp_path / "run", *common, f"TrainConfig.export_dir='{final}'")
    assert next(accuracies, None) is None  # the resumed run evaluated step 4 only
    assert info() == {"step": 2, "eval_accuracy/hard": 0.5}
    best_weights, final_weights = (load_file(d / "model.safetensors") for d in (best, final))
    assert best_weights.keys() == final_weights.keys()
    assert any(not np.array_equal(best_weights[k], final_weights[k]) for k in best_weights)


@pytest.mark.slow
def test_eval_only_evaluates_the_newest_checkpoint_or_the_starting_policy(
    tmp_path, length_reward, monkeypatch
):
    # A stand-in eval that fingerprints the params it is given (adapters attached under LoRA).
    fingerprint = lambda params: float(
        sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(params))
    )
    stand_in = lambda exp, params, on_replies=None: {"eval_accuracy": fingerprint(params)}
    monkeypatch.setattr(evaluation, "evaluate", stand_in)
    bindings = (
        "make_model.lora_rank=4",
        "TrainConfig.num_steps=2",
        "TrainConfig.eval_at_start=True",
    )
    _train_in_process(tmp_path / "run", *bindings, "TrainConfig.eval_every_steps=2")
    start, _, last = metrics_lib.read_metrics(tmp_path / "run" / "metrics.jsonl")
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    # A save in flight from a run still writing here: eval must not clean it up.
    in_flight = tmp_path / "run" / "checkpoints" / "3.orbax-checkpoint-tmp"
    in_flight.mkdir()
    experiment = _experiment(*bindings)
    newest = {"step": 2, "eval_accuracy": last["eval_accuracy"]}
    assert checkpoint_jobs.evaluate_workdir(experiment, str(tmp_path / "run")) == newest
    assert checkpoint_jobs.evaluate_workdir(experiment, str(tmp_path / "fresh")) == {
        "step": 0,
        "eval_accuracy": start["eval_accuracy"],
    }
    assert start["eval_accuracy"] != last["eval_accuracy"]  # the adapters trained
    assert not (tmp_path / "fresh" / "checkpoints").exists()
    # Every kept checkpoint (tiny.gin keeps two), oldest first; a step not there fails first.
    with pytest.raises(FileNotFoundError, match=r"step 7 .*available: \[1, 2\]"):
        checkpoint_jobs.evaluate_checkpoints(experiment, str(tmp_path / "run"), [2, 7])
    first, again = checkpoint_jobs.evaluate_checkpoints(experiment, str(tmp_path / "run"))
    assert first["step"] == 1 and again == newest
    assert first["eval_accuracy"] not in (start["eval_accuracy"], last["eval_accuracy"])
    assert metrics_lib.read_metrics(tmp_path / "run" / metrics_lib.EVAL_FILE) == [
        newest,
        first,
        newest,
    ]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_before
    assert in_flight.exists()


@pytest.mark.slow
def test_a_follower_evaluates_each_checkpoint_as_the_run_saves_it(
    tmp_path, length_reward, monkeypatch, caplog
):
    # The stand-in eval fingerprints the params; the run evaluates every step with it too.
    fingerprint = lambda params: float(
        sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(params))
    )
    stand_in = lambda exp, params, on_replies=None: {"eval_accuracy": fingerprint(params)}
    monkeypatch.setattr(evaluation, "evaluate", stand_in)
    run = tmp_path / "run"
    # The follower starts before the run saves anything; each time it waits, the run trains
    # on: to step 2, then (resumed) to step 4. tiny.gin saves every step and keeps two, so
    # steps 3 and 4 are left of the second part; step 3 is deleted as the follower reads it.
    parts = iter(["TrainConfig.num_steps=2", "TrainConfig.num_steps=4"])
    waits = []

    def train_on(seconds):
        waits.append(seconds)
        _train_in_process(run, next(parts), "TrainConfig.eval_every_steps=1")

    restore = checkpoint_jobs._checkpointed_params

    def deleted_as_read(exp, reader, step):
        if step == 3:
            shutil.rmtree(run / "checkpoints" / "3")
        return restore(exp, reader, step)

    monkeypatch.setattr(checkpoint_jobs, "_checkpointed_params", deleted_as_read)
    # The follower keeps the best checkpoint exported (the run's own evals would, were they on).
    best = tmp_path / "best"
    follower_config = ("TrainConfig.eval_every_steps=0", f"TrainConfig.best_export_dir='{best}'")
    follower = _experiment("TrainConfig.num_steps=4", *follower_config, eval_only=True)
    follow = functools.partial(checkpoint_jobs.follow_checkpoints, poll_s=0.5, timeout_s=60)
    caplog.set_level("INFO")
    results = follow(follower, str(run), wait=train_on)
    assert waits == [0.5, 0.5]
    assert caplog.text.count("waiting for a new checkpoint in ") == 2  # once per wait
    own = {r["step"]: r["eval_accuracy"] for r in metrics_lib.read_metrics(run / "metrics.jsonl")}
    assert results == [{"step": s, "eval_accuracy": own[s]} for s in (1, 2, 4)]
    assert len(set(own.values())) == 4  # each step another policy
    assert metrics_lib.read_metrics(run / metrics_lib.EVAL_FILE) == results
    assert "checkpoint 3 was deleted before its eval; skipped" in caplog.text
    assert list((run / "tensorboard" / "eval_only").glob("events.out.tfevents.*"))
    top = max(results, key=lambda r: r["eval_accuracy"])
    best_info = lambda: json.loads((best / loading.EXPORT_INFO).read_text())
    assert best_info() == top
    # Started again: the last step is evaluated, so nothing to do.
    assert follow(follower, str(run), wait=train_on) == []
    # A follower stopped before step 4's line, restarted, for a run meant to go to step 5 that
    # saves no more: it evaluates step 4 alone, then gives up. The export there (planted: an
    # unbeatable step 2) stays.
    (run / metrics_lib.EVAL_FILE).write_text("".join(json.dumps(r) + "\n" for r in results[:2]))
    unbeaten = {"step": 2, "eval_accuracy": 1e9}
    (best / loading.EXPORT_INFO).write_text(json.dumps(unbeaten))
    exported = load_file(best / "model.safetensors")
    longer = _experiment("TrainConfig.num_steps=5", *follower_config, eval_only=True)
    assert (
        checkpoint_jobs.follow_checkpoints(longer, str(run), poll_s=0.5, timeout_s=0) == results[2:]
    )
    assert "and step 5 (the last) not evaluated: stopped following" in caplog.text
    assert waits == [0.5, 0.5]
    assert best_info() == unbeaten
    again = load_file(best / "model.safetensors")
    for name in exported:
        np.testing.assert_array_equal(again[name], exported[name], err_msg=name)


@pytest.mark.parametrize("bindings", [(), ("make_model.lora_rank=4",)], ids=["full", "lora"])
def test_eval_and_export_restore_onto_the_trainers_layout(bindings, length_reward):
    # The params of a checkpoint are restored straight onto this abstract layout: it must be
    # the one the trainer places, sharding and dtype too.
    exp = _experiment(*bindings)
    placed, _ = train.trainable_and_frozen(exp, train.place_params(exp.mesh, exp.model, exp.params))
    abstract = train.abstract_trainable(exp)
    assert jax.tree.structure(abstract) == jax.tree.structure(placed)
    for want, got in zip(jax.tree.leaves(placed), jax.tree.leaves(abstract), strict=True):
        assert (got.shape, got.dtype, got.sharding) == (want.shape, want.dtype, want.sharding)


@pytest.mark.slow
def test_export_only_writes_a_checkpoint_as_the_run_would(tmp_path, length_reward):
    # LoRA, so the export merges the adapters and writes them alone too. tiny.gin saves every
    # step and keeps two: steps 1 and 2 of a 2-step run.
    bindings = ("make_model.lora_rank=4", "TrainConfig.num_steps=2")
    run, final = tmp_path / "run", tmp_path / "final"
    _train_in_process(run, *bindings, f"TrainConfig.export_dir='{final}'")
    experiment = _experiment(*bindings)
    assert checkpoint_jobs.export_workdir(experiment, str(run), str(tmp_path / "newest")) == 2
    assert (
        checkpoint_jobs.export_workdir(experiment, str(run), str(tmp_path / "first"), step=1) == 1
    )
    read = lambda d, f="model.safetensors": load_file(tmp_path / d / f)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        newest, run_end = read("newest", name), read("final", name)
        assert newest.keys() == run_end.keys()
        for key in newest:  # bitwise: the same params through the same export
            np.testing.assert_array_equal(newest[key], run_end[key], err_msg=key)
    first, newest = read("first"), read("newest")
    assert any(not np.array_equal(first[k], newest[k]) for k in first)  # step 1 is another policy
    info = json.loads((tmp_path / "first" / loading.EXPORT_INFO).read_text())
    assert info == {"step": 1}
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint_jobs.export_workdir(experiment, str(tmp_path / "empty"), str(tmp_path / "none"))
    full_fine_tuning = _experiment("TrainConfig.num_steps=2")
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"step 2 .* LoRA setting\?"):
        checkpoint_jobs.export_workdir(full_fine_tuning, str(run), str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .*available: \[1, 2\]"):
        checkpoint_jobs.evaluate_workdir(experiment, str(run), step=7)


@pytest.mark.slow
def test_a_diverged_update_stops_the_run_before_it_is_saved(tmp_path, length_reward):
    # A learning rate of 1e30 blows the params up within a few steps.
    with pytest.raises(train.NotFinite, match=r"step (\d+): non-finite loss") as error:
        _train_in_process(
            tmp_path,
            "make_lr_schedule.type='constant'",
            "make_lr_schedule.peak_value=1e30",
            "TrainConfig.eval_every_steps=0",
        )
    step = int(re.search(r"step (\d+)", str(error.value)).group(1))
    rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == step and not np.isfinite(rows[-1]["loss"])
    assert all(np.isfinite(r["loss"]) for r in rows[:-1])
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved and max(saved) == step - 1  # tiny.gin saves every step
    assert f"the last checkpoint is step {step - 1}" in str(error.value)


OUT_OF_MEMORY = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.50GiB.\nmore"


def test_running_out_of_device_memory_names_the_phase_and_what_shrinks_it(
    tmp_path, length_reward, monkeypatch
):
    def sample(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(OUT_OF_MEMORY)

    monkeypatch.setattr(sampling, "sample", sample)
    with pytest.raises(train.OutOfMemory) as error:
        _train_in_process(tmp_path, "TrainConfig.eval_every_steps=0")
    assert str(error.value) == (
        "out of device memory in the rollout phase (RESOURCE_EXHAUSTED: Out of memory while "
        "trying to allocate 9.50GiB.); try " + train._SHRINKS["rollout"] + "; the last "
        "checkpoint: no checkpoint yet"
    )
    assert "make_sampling.max_new_tokens" in train._SHRINKS["rollout"]


@pytest.mark.parametrize(
    "phase, advice",
    [
        ("update", "TrainConfig.completions_per_micro_batch"),
        ("reward", "make_reward_model.dtype='bfloat16'"),
        (None, "--dry_run prints"),
    ],
)
def test_out_of_memory_advice_follows_the_innermost_phase(phase, advice):
    error = jax.errors.JaxRuntimeError(OUT_OF_MEMORY)
    if phase:
        with pytest.raises(jax.errors.JaxRuntimeError), profiling.Phase("eval"):
            with profiling.Phase(phase):
                raise error
    message = str(train._out_of_memory(error, 7))
    where = f"in the {phase} phase" if phase else "between phases"
    assert message.startswith(f"out of device memory {where} (RESOURCE_EXHAUSTED")
    assert advice in message and message.endswith("the last checkpoint: step 7")
    other = jax.errors.JaxRuntimeError("INTERNAL: something else")
    assert train._out_of_memory(other, 7) is None


def _expansion_rows(n: int, first: int) -> list[dict]:
    """Made-up MATH-style rows whose answers are polynomials: no number to compare."""
    rows = []
    for a in range(first, first + n):
        b = a + 1
        rows.append(
            {
                "problem": f"Expand (x+{a})(x+{b}).",
                "solution": f"Multiply out: $\\boxed{{x^2+{a + b}x+{a * b}}}$.",
                "level": a % 3,
            }
        )
    return rows


def _reordered(final: str) -> str:
    """`x^2+Bx+C` written backwards: equal as math, different as text."""
    return "+".join(reversed(final.split("+")))


def test_math_style_data_without_a_math_match_fails_before_compiling(tmp_path, length_reward):
    data = tmp_path / "math"
    data.mkdir()
    for split, first in (("train", 1), ("test", 50)):
        rows = _expansion_rows(4, first)
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = (
        f"make_dataset.source='{data}'",
        "make_dataset.question_field='problem'",
        "make_dataset.answer_field='solution'",
        "make_dataset.answer_format='boxed'",
    )
    with pytest.raises(ValueError, match=r"train example 0: reference answer 'x\^2\+3x\+2' is"):
        _experiment(*columns)
    math_match = ("TrainConfig.answer_match='math_verify'", "make_dataset.keep_fields=('level',)")
    assert _experiment(*columns, *math_match).test_examples[0] == {
        "question": "Expand (x+50)(x+51).",
        "answer": "Multiply out: $\\boxed{x^2+101x+2550}$.\n#### x^2+101x+2550",
        "level": 2,  # kept for custom reward functions
    }


@pytest.mark.slow
def test_math_style_data_trains_with_math_verify_answers(tmp_path, monkeypatch):
    # MATH-style rows, a boxed solution each, through the whole loop. The replies are replaced
    # after sampling (the update still trains on the sampled tokens): even rows answer with the
    # reference rewritten (equal only as math), odd rows with a wrong polynomial. So rewards,
    # accuracy and eval each read exactly half right, and every check went through math-verify.
    data = tmp_path / "math"
    data.mkdir()
    for split, first in (("train", 1), ("test", 50)):
        rows = _expansion_rows(8 if split == "train" else 4, first)
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sample = sampling.sample

    def answering_sample(exp, params, examples, key, sampling, samples):
        sampled = sample(exp, params, examples, key, sampling, samples)
        finals = [reward.extract_reference_answer(e["answer"]) for e in examples]
        replies = [
            f"<answer>{_reordered(finals[i // samples]) if i % 2 == 0 else 'x^2+1'}</answer>"
            for i in range(len(sampled.texts))
        ]
        return sampled._replace(texts=replies)

    monkeypatch.setattr(sampling, "sample", answering_sample)
    _train_in_process(
        tmp_path / "run",
        f"make_dataset.source='{data}'",
        "make_dataset.question_field='problem'",
        "make_dataset.answer_field='solution'",
        "make_dataset.answer_format='boxed'",
        "make_rewards.names=('correctness_math_verify',)",
        "TrainConfig.answer_match='math_verify'",
        "TrainConfig.num_steps=2",
        "TrainConfig.show_completions_every_steps=1",
    )
    rows = metrics_lib.read_metrics(tmp_path / "run" / "metrics.jsonl")
    for row in rows:
        assert row["reward_mean"] == row["accuracy"] == 0.5
        assert row["reward_failures/correctness_math_verify"] == 0
    assert rows[-1]["eval_accuracy"] == 0.5
    completions = metrics_lib.read_metrics(tmp_path / "run" / "completions.jsonl")
    assert len(completions) == 2 * 8
    for i, record in enumerate(completions):
        assert record["correct"] == (i % 2 == 0) == record["rewards"]["correctness_math_verify"]
        assert re.fullmatch(r"x\^2\+\d+x\+\d+", record["answer"])  # the boxed final
        if i % 2 == 0:
            assert record["completion"] == f"<answer>{_reordered(record['answer'])}</answer>"


def test_examples_with_prompts_over_the_limit_are_dropped_at_start(length_reward, caplog):
    from grpo.data.prompts import encode_prompts

    full = _experiment()
    lengths = [
        len(p) for p in encode_prompts(full.tokenizer, [e["question"] for e in full.train_examples])
    ]
    limit = int(np.median(lengths))
    expected = [e for e, n in zip(full.train_examples, lengths, strict=True) if n <= limit]
    assert 0 < len(expected) < len(full.train_examples)
    trimmed = _experiment(f"TrainConfig.max_prompt_tokens={limit}")
    assert trimmed.train_examples == expected  # in order
    dropped = len(full.train_examples) - len(expected)
    assert (
        f"dropped {dropped} of {len(lengths)} train examples: prompts over {limit}" in caplog.text
    )
    with pytest.raises(ValueError, match="every train prompt is longer than 1 tokens"):
        _experiment("TrainConfig.max_prompt_tokens=1")


def test_the_question_template_reaches_the_sampled_prompts(length_reward):
    exp = _experiment("TrainConfig.question_template='{question} Be brief.'")
    tokens, mask = sampling.prompts_for(exp, exp.train_examples[:2], 1)
    text = exp.tokenizer.decode(np.asarray(tokens)[0][np.asarray(mask)[0].astype(bool)])
    assert exp.train_examples[0]["question"] + " Be brief." in text


def test_a_prompt_without_the_chat_template_is_the_question_template_alone(length_reward):
    exp = _experiment(
        "TrainConfig.use_chat_template=False",
        "TrainConfig.system_prompt=None",
        "TrainConfig.question_template='Q: {question}\\nA:'",
        read_params=False,
    )
    tokens, mask = sampling.prompts_for(exp, exp.train_examples[:1], 1)
    prompt = np.asarray(tokens)[0][np.asarray(mask)[0].astype(bool)].tolist()
    assert prompt == exp.tokenizer.encode(f"Q: {exp.train_examples[0]['question']}\nA:")
    assert "<|im_start|>" not in exp.tokenizer.decode(prompt)  # SmolLM2 has a chat template


def test_extra_train_sets_join_the_main_train_split(length_reward):
    exp = _experiment(
        "TrainConfig.extra_train_sets=('harder',)",
        "harder/make_dataset.source='synthetic'",
        "harder/make_dataset.difficulty=2",
        "harder/make_dataset.num_train=5",
    )
    main = load_examples("synthetic", "train", num_examples=64)  # tiny.gin's
    harder = load_examples("synthetic", "train", num_examples=5, difficulty=2)
    tagged = lambda examples, name: [{**e, train.SOURCE: name} for e in examples]
    assert exp.train_examples == tagged(main, "main") + tagged(harder, "harder")
    assert exp.test_examples == load_examples("synthetic", "test", num_examples=8)  # unchanged
    with pytest.raises(ValueError, match="extra_train_sets names 'x', but gin binds no x/make_"):
        _experiment("TrainConfig.extra_train_sets=('x',)")


def test_extra_eval_sets_load_in_their_gin_scope(length_reward):
    exp = _experiment(
        "TrainConfig.extra_eval_sets=('harder',)",
        "harder/make_dataset.source='synthetic'",
        "harder/make_dataset.difficulty=2",
        "harder/make_dataset.num_test=5",
    )
    assert exp.extra_eval_sets == {
        "harder": load_examples("synthetic", "test", num_examples=5, difficulty=2)
    }
    assert exp.test_examples == load_examples("synthetic", "test", num_examples=8)  # tiny.gin's
    with pytest.raises(ValueError, match="names 'other', but gin binds no other/make_dataset.sou"):
        _experiment("TrainConfig.extra_eval_sets=('other',)")


@pytest.mark.parametrize("sync_every, dtype", [(0, jnp.bfloat16), (2, jnp.float32)])
def test_the_frozen_reference_is_held_in_the_compute_dtype(
    tmp_path, length_reward, sync_every, dtype
):
    # bf16 compute on fp32 weights: the frozen reference in bf16 gives the same log-probs
    # (test_update); a moving one (ref sync) accumulates small steps, so it stays fp32.
    exp = _experiment(
        "make_model.dtype='bfloat16'",
        "make_loss.beta=0.04",
        f"TrainConfig.ref_sync_every_steps={sync_every}",
    )
    runtime = train._build_runtime(exp, str(tmp_path))
    runtime.checkpointer.close()
    runtime.metrics.close()
    reference = jax.tree.map(gather.all_rows, runtime.ref_params)
    assert {leaf.dtype for leaf in jax.tree.leaves(reference)} == {jnp.dtype(dtype)}
    expected = jax.tree.map(lambda w: np.asarray(w).astype(dtype), exp.params)
    jax.tree.map(np.testing.assert_array_equal, reference, expected)
    assert {leaf.dtype for leaf in jax.tree.leaves(runtime.state.params)} == {jnp.dtype("float32")}


def _held_by_first_device(tree) -> float:
    first = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == first
    )


@pytest.mark.parametrize(
    "bindings, held",
    [
        (("make_loss.beta=0.04",), {"params", "optimizer state", "KL reference"}),
        (("make_model.lora_rank=4",), {"params", "optimizer state", "frozen base"}),
    ],
)
def test_the_memory_held_per_device_is_what_the_run_places(tmp_path, length_reward, bindings, held):
    # tiny.gin's 2 x 2 x 2 mesh, bf16 compute on fp32 weights; adamw (two moments, one in bf16).
    exp = _experiment(
        *bindings,
        "make_model.dtype='bfloat16'",
        "make_optimizer.name='adamw'",
        "make_optimizer.mu_dtype='bfloat16'",
    )
    expected = train.held_memory_gb(exp)
    assert set(expected) == held
    runtime = train._build_runtime(exp, str(tmp_path))
    runtime.checkpointer.close()
    runtime.metrics.close()
    placed = {
        "params": runtime.state.params,
        "optimizer state": runtime.state.opt_state,
        "KL reference": runtime.ref_params,
        "frozen base": runtime.frozen_params,
    }
    for name, gb in expected.items():
        assert gb * 1e9 == pytest.approx(_held_by_first_device(placed[name]), rel=1e-9), name
    assert "held per device (GB): params " in train.held_memory_line(exp)


def test_a_rollouts_kv_cache_per_device_is_what_the_decode_lays_out(length_reward):
    # tiny.gin: 2 prompts x 4 samples a step, evals of 8 prompts, prompt buckets up to 128, 16
    # new tokens; tiny-qwen2 (2 layers, 2 KV heads of 8) in bf16 on dp x fsdp x tp = 2 x 2 x 2.
    # Per device: 8 rows / 4 = 2; per row and slot, keys and values of 2 layers x 1 head (tp
    # splits the 2) x 8 x 2 bytes = 64 bytes, plus the slot's valid flag.
    exp = _experiment("make_model.dtype='bfloat16'", read_params=False)
    slots = 128 + 16
    assert train.rollout_cache_gb(exp) == pytest.approx(
        {"training": 2 * slots * 65 / 1e9, "eval": 2 * slots * 65 / 1e9}, rel=1e-12
    )
    cache = jax.jit(lambda: rollout._constrain_cache(tf.init_cache(exp.model, 8, slots), exp.mesh))
    assert _held_by_first_device(cache()) == 2 * slots * 65 + 4  # + the int32 write index
    # Tools: the rounds after a call prefill the budget, then sample it; 3 samples per eval
    # prompt; no eval rollout without evals.
    tools = _experiment(
        "make_model.dtype='bfloat16'",
        "make_tools.names=('calculator',)",
        "TrainConfig.eval_samples=3",
        read_params=False,
    )
    assert train.rollout_cache_gb(tools) == pytest.approx(
        {"training": 2 * (128 + 32) * 65 / 1e9, "eval": 6 * (128 + 32) * 65 / 1e9}, rel=1e-12
    )
    no_evals = _experiment("TrainConfig.eval_every_steps=0", read_params=False)
    assert set(train.rollout_cache_gb(no_evals)) == {"training"}


def test_a_run_whose_rollout_cannot_fit_beside_its_state_fails_before_loading(
    monkeypatch, length_reward
):
    exp = _experiment("TrainConfig.eval_every_steps=0", read_params=False)
    state = sum(train.held_memory_gb(exp).values())
    cache = train.rollout_cache_gb(exp)["training"]
    monkeypatch.setattr(train, "_device_limit_gb", lambda: state + cache * 1.01)
    train.check_state_fits(exp)
    monkeypatch.setattr(train, "_device_limit_gb", lambda: state + cache * 0.99)
    with pytest.raises(ValueError, match=r"the training rollout's KV cache \(.* GB per device\)"):
        train.check_state_fits(exp)
    monkeypatch.setattr(train, "_device_limit_gb", lambda: state * 0.99)
    with pytest.raises(ValueError, match="the run's state needs"):
        train.check_state_fits(exp)


def test_device_memory_metrics_take_the_fullest_device(monkeypatch):
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    gpus = [Device({"bytes_in_use": 3e9, "peak_bytes_in_use": 7e9}), Device({"bytes_in_use": 4e9})]
    monkeypatch.setattr(jax, "local_devices", lambda: gpus)
    assert train.device_memory_metrics() == {
        "device_memory_in_use_gb": 4.0,
        "device_memory_peak_gb": 7.0,
    }
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(None)])  # a CPU
    assert train.device_memory_metrics() == {}


def test_moved_reference_mixes_in_fp32_and_keeps_each_dtype():
    ref = {"w": jnp.array([1.0, 2.0], jnp.float32), "e": jnp.array([4.0], jnp.bfloat16)}
    policy = {"w": jnp.array([3.0, 0.0], jnp.float32), "e": jnp.array([8.0], jnp.bfloat16)}
    moved = train._moved_reference(ref, policy, jnp.float32(0.25))  # donates ref
    np.testing.assert_allclose(moved["w"], [1.5, 1.5])  # 0.25 * 3 + 0.75 * 1, 0.75 * 2
    assert moved["e"].dtype == jnp.bfloat16 and float(moved["e"][0]) == 5.0


@pytest.mark.slow
def test_a_batched_reward_scores_each_step_in_one_call(tmp_path, monkeypatch):
    calls = []

    @reward.batched_reward
    def length_rank(completions, examples):
        """Each reply's length rank within the step, over the batch: needs the whole batch."""
        calls.append(len(completions))
        order = np.argsort([len(c) for c in completions], kind="stable")
        ranks = np.empty(len(completions))
        ranks[order] = np.arange(len(completions))
        return ranks / (len(completions) - 1)

    monkeypatch.setitem(reward.REWARD_FUNCTIONS, "length", length_rank)
    _train_in_process(tmp_path, "TrainConfig.num_steps=2", "TrainConfig.eval_every_steps=0")
    rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    assert calls == [8, 8]  # tiny.gin: 2 prompts x 4 samples a step, one process
    for row in rows:
        assert row["reward_mean"] == pytest.approx(0.5)  # ranks 0..7 over 7
        assert row["reward_failures/length"] == 0 and row["grad_norm"] > 0


@pytest.mark.slow
def test_normalize_then_sum_takes_each_rewards_own_group_advantage(tmp_path, length_reward):
    # Two terms: the length reward (weight 1) and the overlong penalty (0.5), -length / 16 over
    # the whole 16-token budget; a stop string ends replies at varied lengths.
    _train_in_process(
        tmp_path,
        "TrainConfig.reward_aggregation='normalize_then_sum'",
        "make_rewards.overlong_buffer=16",
        "make_rewards.overlong_weight=0.5",
        "make_sampling.stop_strings=('e',)",
        "TrainConfig.num_steps=1",
        "TrainConfig.eval_every_steps=0",
        "TrainConfig.show_completions_every_steps=1",
    )
    records = metrics_lib.read_metrics(tmp_path / "completions.jsonl")
    terms = np.array([[r["rewards"]["length"], r["rewards"]["overlong"]] for r in records])
    expected = advantage.decoupled_advantages(
        jnp.asarray(terms, jnp.float32), jnp.array([1.0, 0.5]), group_size=4
    )
    np.testing.assert_allclose([r["advantage"] for r in records], expected, rtol=1e-6)
    assert np.std(terms[:, 1]) > 0  # both terms vary, so each counts
    (row,) = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    assert row["grad_norm"] > 0


def test_a_run_without_test_examples_must_not_evaluate(length_reward):
    no_test = "make_dataset.test_split=None"
    with pytest.raises(ValueError, match=r"no test examples \(make_dataset.test_split=None\)"):
        _experiment(no_test)  # tiny.gin evaluates every 2 steps
    assert _experiment(no_test, "TrainConfig.eval_every_steps=0").test_examples == []


@pytest.mark.slow
def test_mixed_train_sets_report_each_sets_reward_and_accuracy(tmp_path, length_reward):
    # Equal halves of two generated sets; every completion is logged with its set.
    _train_in_process(
        tmp_path,
        "TrainConfig.extra_train_sets=('harder',)",
        "harder/make_dataset.source='synthetic'",
        "harder/make_dataset.difficulty=2",
        "harder/make_dataset.num_train=64",
        "TrainConfig.num_steps=3",
        "TrainConfig.eval_every_steps=0",
        "TrainConfig.show_completions_every_steps=1",
    )
    rows = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
    completions = metrics_lib.read_metrics(tmp_path / "completions.jsonl")
    for row in rows:
        mine = [c for c in completions if c["step"] == row["step"]]
        for name in {c["set"] for c in mine}:
            rewards = [c["reward"] for c in mine if c["set"] == name]
            assert row[f"reward_mean/{name}"] == pytest.approx(np.mean(rewards), rel=1e-5)
            correct = [c["correct"] for c in mine if c["set"] == name]
            assert row[f"accuracy/{name}"] == pytest.approx(np.mean(correct))
    assert {c["set"] for c in completions} == {"main", "harder"}  # both sets were drawn


def test_accuracy_reuses_a_reward_that_makes_the_same_answer_check(monkeypatch):
    def no_second_pass(*args, **kwargs):
        raise AssertionError("the answers were checked twice")

    monkeypatch.setattr(reward, "check_answers", no_second_pass)
    scored = reward.RewardResult(
        total=np.zeros(3, np.float32),
        per_function={"correctness_last_number": np.array([1.0, 0.0, 1.0], np.float32)},
        failures={},
    )
    cfg = train.TrainConfig(answer_last_number_fallback=True)
    correct = train._answer_checks(cfg, ["a", "b", "c"], [{}] * 3, scored)
    np.testing.assert_array_equal(correct, [1.0, 0.0, 1.0])
    with pytest.raises(AssertionError, match="checked twice"):  # another check: a pass of its own
        train._answer_checks(train.TrainConfig(), ["a", "b", "c"], [{}] * 3, scored)
