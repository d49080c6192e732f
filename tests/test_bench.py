"""Smoke tests: every bench runs end to end on tiny-qwen2 with one timed iteration, so none rots.

The update and step benches share one shape (4 completions x (8 + 8) tokens), so their update
compiles once per session (the persistent compilation cache in conftest).
"""

import json
import os
import subprocess
import sys

import pytest

from bench import common, step, update
from grpo.models import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset=tiny-qwen2"]


def test_update_bench_reports_throughput_mfu_memory_and_torch_ratio():
    result = update.main(
        [*TINY, "--batch=4", "--prompt_len=8", "--completion_len=8", "--iters=1", "--warmup=0"]
        + ["--peak_tflops=1", "--torch_baseline", "--torch_threads=1"]
    )
    assert result["tokens"] == 4 * 16
    assert result["update_tokens_per_s"] > 0 and result["torch_tokens_per_s"] > 0
    # MFU is achieved FLOP/s over the overridden 1 TFLOP/s peak.
    assert result["mfu"] == pytest.approx(result["achieved_tflops"], rel=0.01, abs=1e-4)
    assert result["compiled_argument_gb"] >= 0 and "compiled_temp_gb" in result
    assert result["peak_device_gb"] == "n/a"  # the CPU allocator keeps no high-water mark


def test_update_bench_times_the_high_entropy_token_mask_over_kept_ids():
    result = update.main(
        [*TINY, "--batch=4", "--prompt_len=8", "--completion_len=8", "--iters=1", "--warmup=0"]
        + ["--top_entropy_quantile=0.2", "--kept_ids=4"]
    )
    assert result["top_entropy_quantile"] == 0.2 and result["kept_ids"] == 4
    assert result["update_tokens_per_s"] > 0


def test_update_bench_times_mini_batch_updates_with_shared_prompts_in_width_buckets():
    result = update.main(
        [*TINY, "--batch=4", "--prompt_len=8", "--completion_len=8", "--iters=1", "--warmup=0"]
        + ["--updates=2", "--beta=0.1", "--shared_prompts=2"]
        + ["--min_completion_len=1", "--width_buckets=2", "--group_length_spread=0.2"]
    )
    assert result["updates"] == 2 and result["update_tokens_per_s"] > 0
    assert result["shared_prompts"] == 2 and result["ref_tokens_per_s"] > 0
    assert result["width_buckets"] == 2 and result["group_length_spread"] == 0.2
    for bad in (
        ["--updates=3"],
        ["--shared_prompts=3"],
        ["--shared_prompts=2", "--torch_baseline"],
        ["--group_length_spread=0.2"],  # needs random lengths
        ["--min_completion_len=1", "--group_length_spread=1.5"],
    ):
        with pytest.raises(SystemExit):
            update.main([*TINY, "--batch=4", *bad])


def test_random_lengths_run_alike_within_a_group_when_asked():
    config = presets.preset("tiny-qwen2")
    lengths = lambda **kw: common.random_batch(
        config, 64, 4, 100, min_completion_len=10, prompt_group=8, **kw
    ).completion_mask_BxC.sum(axis=1)
    alike = lengths(group_length_spread=0.0).reshape(8, 8)
    assert (alike == alike[:, :1]).all() and len(set(alike[:, 0])) > 1
    near = lengths(group_length_spread=0.1).reshape(8, 8)  # each in L x [0.9, 1.1], rounded
    assert (near >= 10).all() and (near <= 100).all()
    assert (near.max(axis=1) <= near.min(axis=1) * 1.1 / 0.9 + 1).all()
    assert (near.max(axis=1) > near.min(axis=1)).any()
    alone = lengths().reshape(8, 8)  # each row's own draw: groups spread as wide as the batch
    assert (alone.max(axis=1) - alone.min(axis=1)).mean() > 40


def test_update_bench_counts_valid_tokens_of_random_lengths_in_width_buckets():
    result = update.main(
        [*TINY, "--batch=4", "--prompt_len=8", "--completion_len=8", "--iters=1", "--warmup=0"]
        + ["--micro_batches=2", "--min_completion_len=1", "--width_buckets=2", "--beta=0.1"]
    )
    assert result["width_buckets"] == 2 and result["ref_tokens_per_s"] > 0
    assert 4 * 8 + 4 <= result["valid_tokens"] < result["tokens"] == 4 * 16
    with pytest.raises(SystemExit):
        update.main([*TINY, "--min_completion_len=1", "--torch_baseline"])


def test_update_bench_sizes_lora_with_no_base_optimizer_state_or_reference_copy():
    # 0.5B, abstract (nothing allocated): tiny-qwen2's gigabytes round to 0.
    shape = ["--preset=qwen2.5-0.5b", "--batch=4", "--prompt_len=8", "--completion_len=8"]
    shape.append("--beta=0.1")
    full = update.main([*shape, "--compile_only"])
    adapters = update.main([*shape, "--compile_only", "--lora_rank=4"])
    assert adapters["lora_rank"] == 4 and full["ref_params_gb"] > 0
    assert adapters["ref_params_gb"] == 0  # the frozen base is the reference
    # Arguments: params + Lion state, against the frozen base + adapters + their state.
    assert adapters["compiled_argument_gb"] < 0.6 * full["compiled_argument_gb"]
    assert adapters["update_peak_estimate_gb"] < full["update_peak_estimate_gb"]


def test_step_bench_times_every_phase_with_reference():
    result = step.main(
        [*TINY, "--prompts=2", "--group=2", "--prompt_len=8", "--new_tokens=8", "--steps=1"]
        + ["--beta=0.1", "--shared_prompts"]
    )
    assert result["shared_prompts"] is True
    phases = [result[f"{name}_s"] for name in step.PHASES]
    assert all(seconds > 0 for seconds in phases)
    assert result["step_s"] == pytest.approx(sum(phases), abs=1e-3)
    assert 0 < result["rollout_share"] < 1
    assert result["update_mfu"] == "n/a"  # no peak known for CPU


def test_rollout_bench_runs_and_profiles(tmp_path):
    # absl flags: bench.rollout and bench.forward define the same flag names, so run it alone.
    cmd = [sys.executable, "-m", "bench.rollout", "--preset=tiny-qwen2", "--batch=2"]
    cmd += ["--prompt_len=4", "--new_tokens=4", "--iters=1", f"--profile_dir={tmp_path}"]
    cmd += ["--stop_strings=</answer>,<never>", "--appended=1", "--top_k=3", "--keep_sampling_mask"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["new_tokens_per_s"] > 0 and result["stop_strings"] == ["</answer>", "<never>"]
    assert result["round_on_context_s"] > 0 and result["round_prefilled_s"] > 0
    assert (
        result["kept_ids_per_token"] == 3 and result["kept_ids_bytes"] == 2 * 4 * 3 * 4
    )  # the sampler's record
    assert result["top_ops"] and all(op["ms"] >= 0 for op in result["top_ops"])
    # The decode loop's ops are named after their jax source (so a profile says what is slow).
    assert any("while" in op["from"] for op in result["top_ops"]), result["top_ops"]
