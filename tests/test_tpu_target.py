"""bench/tpu_target.py: the update compiled for a v6e-8 slice with no TPU present, sharded as the
trainer shards it; splash attention lowers to Mosaic kernels (needs `make tpu-target-deps`)."""

import json
import os
import subprocess
import sys

import pytest

from bench import tpu_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_libtpu = pytest.mark.skipif(
    not os.path.isdir(os.path.join(tpu_target.PLUGIN_DIR, "libtpu")),
    reason="no libtpu in .tpu-plugin/ (make tpu-target-deps)",
)


def _bench(module: str, *flags: str) -> dict:
    cmd = [sys.executable, "-m", f"bench.{module}", "--tpu_target=v6e-8", *flags]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match="unknown TPU target 'v5p-8'"):
        tpu_target.mesh("v5p-8")


@needs_libtpu
def test_update_with_auto_attention_compiles_splash_for_every_chip_of_a_v6e_8():
    shape = ("--preset=tiny-qwen2", "--batch=16", "--prompt_len=64", "--completion_len=64")
    # "auto" is splash when the mesh's chips are TPUs, though this process runs on a CPU.
    result = _bench("update", *shape, "--attention=auto", "--micro_batches=2")
    assert result["device"] == "TPU v6e-8 (compile only)"
    assert result["mesh"] == {"dp": 1, "fsdp": 8, "tp": 1}
    assert result["fits"] is True
    # Mosaic built the forward and both backward kernels (dq, dkv); einsum attention has none.
    assert result["mosaic_kernels"] >= 3
    assert _bench("update", *shape, "--attention=xla")["mosaic_kernels"] == 0
    # The micro-batch loop first, then the loops one micro-batch runs (layers, log-prob chunks).
    assert [loop["depth"] for loop in result["loop_collectives"]][:2] == [0, 1]


@needs_libtpu
def test_shared_prompts_compile_splash_with_queries_on_the_last_key_slots():
    # Mosaic, not Pallas' interpreter, builds the completions' kernels too (64 queries on the
    # last 64 of 128 key slots) beside the prompts' own: two sets of forward, dq and dkv.
    shape = ("--preset=tiny-qwen2", "--batch=16", "--prompt_len=64", "--completion_len=64")
    result = _bench("update", *shape, "--attention=auto", "--micro_batches=2", "--shared_prompts=8")
    assert result["fits"] is True and result["mosaic_kernels"] >= 6  # 8 here; 4 unshared


@needs_libtpu
def test_splash_compiles_per_shard_with_heads_split_over_tp():
    # tiny-qwen2's 4 query / 2 kv heads split over tp=2: each shard's kernel gets 2 + 1 heads.
    shape = ("--preset=tiny-qwen2", "--batch=16", "--prompt_len=64", "--completion_len=64")
    result = _bench("update", *shape, "--attention=splash", "--tpu_mesh=2,2,2")
    assert result["mesh"] == {"dp": 2, "fsdp": 2, "tp": 2}
    assert result["fits"] is True and result["mosaic_kernels"] >= 3


@needs_libtpu
def test_a_program_too_big_for_a_chip_is_reported_not_raised():
    # 0.5B, 64 rows x 2048 slots of fp32 scores in one micro-batch: far over 32 GB per chip.
    shape = ("--preset=qwen2.5-0.5b", "--batch=64", "--prompt_len=1024", "--completion_len=1024")
    result = _bench("update", *shape, "--attention=xla")
    assert result["fits"] is False
    assert "exceeds available HBM" in result["xla_says"]


@needs_libtpu
def test_rollout_compiles_for_every_chip_of_a_v6e_8():
    shape = ("--preset=tiny-qwen2", "--batch=16", "--num_samples=2", "--prompt_len=64")
    result = _bench("rollout", *shape, "--new_tokens=32")
    assert result["device"] == "TPU v6e-8 (compile only)"
    assert result["mesh"] == {"dp": 1, "fsdp": 8, "tp": 1}
    assert result["fits"] is True and result["compiled_temp_gb"] > 0
    assert result["mosaic_kernels"] == 0  # the sampler decodes with einsum attention
    # One decode loop; with fsdp-split weights each step all-reduces partial activations.
    (decode,) = result["decode_step_collectives"]
    assert decode["count"]["all-reduce"] > 0 and decode["mb"] >= 0
