"""bench/gpu_target.py: the decode-step byte count from optimized HLO, and compiling the rollout
and the update for an H200 with no GPU present (needs `make gpu-target-deps`, else skipped)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from bench import gpu_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, WIDTH = 1024, 1024  # a 4 MB fp32 buffer, updated one 4 KB row per iteration


def _loop_hlo(read_whole_buffer: bool) -> str:
    def run(buf_RxW, x_W):
        def body(carry):
            i, total, buf_RxW = carry
            buf_RxW = jax.lax.dynamic_update_slice(buf_RxW, (x_W * i)[None], (i, 0))
            if read_whole_buffer:
                total = total + buf_RxW.sum()
            return i + 1, total, buf_RxW

        return jax.lax.while_loop(lambda c: c[0] < 8, body, (0, 0.0, buf_RxW))

    buf, x = jnp.zeros((ROWS, WIDTH)), jnp.ones(WIDTH)
    return jax.jit(run).lower(buf, x).compile().as_text()


def test_an_in_place_update_counts_only_the_row_it_touches():
    traffic = gpu_target.loop_traffic(_loop_hlo(read_whole_buffer=False))
    (moved,) = traffic["per_loop"]
    row = 4 * WIDTH
    assert 2 * row <= moved < 4 * row  # read x, write one row (+ a few scalars)
    # The body's kernels (XLA:CPU): the row update, the counter's add and a copy of it.
    assert traffic["kernels_per_loop"] == [3]


def test_reading_the_whole_buffer_counts_all_of_it():
    (moved,) = gpu_target.loop_traffic(_loop_hlo(read_whole_buffer=True))["per_loop"]
    assert 4 * ROWS * WIDTH <= moved < 4 * ROWS * WIDTH + 16 * WIDTH


# One layer's slice of a stack of 8 layers, read through a bitcast (as XLA:GPU emits a scanned
# layer's saved activations in the backward), scaled and converted: reads 1/8 of the stack.
_SLICE_THROUGH_BITCAST = """
%fused_slice (stack: bf16[8,1024,256], i: s32[]) -> f32[1024,256] {
  %stack = bf16[8,1024,256]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %flat = bf16[8,262144]{1,0} bitcast(%stack)
  %zero = s32[] constant(0)
  %layer = bf16[1,262144]{1,0} dynamic-slice(%flat, %i, %zero), dynamic_slice_sizes={1,262144}
  %rows = bf16[1024,256]{1,0} bitcast(%layer)
  ROOT %out = f32[1024,256]{1,0} convert(%rows)
}

ENTRY %main (stack: bf16[8,1024,256], i: s32[]) -> f32[1024,256] {
  %stack = bf16[8,1024,256]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %fusion = f32[1024,256]{1,0} fusion(%stack, %i), kind=kLoop, calls=%fused_slice
}
"""


def test_a_slice_read_through_a_bitcast_counts_only_the_slice():
    bound = gpu_target.roofline(_SLICE_THROUGH_BITCAST, gpu_target.TARGETS["h200"])
    layer = 1024 * 256
    assert bound["bytes"] == 2 * layer + 4 + 4 * layer  # the slice, the index, the fp32 output


def test_roofline_counts_matmul_flops_exactly_and_loops_by_trip_count():
    def run(a, b):
        return jax.lax.fori_loop(0, 8, lambda i, x: jnp.tanh(x @ b), a)

    n = 256
    hlo = jax.jit(run).lower(jnp.ones((n, n)), jnp.ones((n, n))).compile().as_text()
    target = gpu_target.TARGETS["h200"]
    bound = gpu_target.roofline(hlo, target)
    assert bound["flops"] == 8 * 2 * n**3
    # Each trip: the matmul reads two 256 KB matrices and writes one; tanh reads and writes one.
    assert bound["bytes"] >= 8 * 5 * 4 * n * n
    assert bound["matmul_s"] == pytest.approx(8 * 3 * 4 * n * n / target.bandwidth_bytes_per_s)
    assert bound["seconds"] == pytest.approx(bound["matmul_s"] + bound["other_s"])


_COPY_IN_A_BRANCH = """HloModule copies

%branch (p: (bf16[64,256])) -> bf16[64,256] {
  %p = (bf16[64,256]{1,0}) parameter(0)
  %x = bf16[64,256]{1,0} get-tuple-element(%p), index=0
  ROOT %copy.1 = bf16[64,256]{0,1} copy(%x)
}

%fused_copy (q: f32[1024]) -> f32[1024] {
  %q = f32[1024]{0} parameter(0)
  ROOT %copy.3 = f32[1024]{0} copy(%q)
}

ENTRY %main (x: bf16[64,256], y: f32[8], z: f32[1024]) -> f32[8] {
  %x = bf16[64,256]{1,0} parameter(0)
  %y = f32[8]{0} parameter(1)
  %z = f32[1024]{0} parameter(2)
  %copy.2 = f32[8]{0} copy(%y)
  %fusion = f32[1024]{0} fusion(%z), kind=kLoop, calls=%fused_copy
  ROOT %negate = f32[8]{0} negate(%copy.2)
}
"""


def test_copied_bytes_counts_each_copy_into_a_buffer_once():
    # The branch's copy and the entry's; the one inside a fusion writes no buffer of its own.
    assert gpu_target.copied_bytes(_COPY_IN_A_BRANCH) == 2 * 64 * 256 + 4 * 8


def test_unknown_target_is_named():
    with pytest.raises(ValueError, match="unknown GPU target 'a100'"):
        gpu_target.device("a100")


def _bench(module: str, *flags: str) -> dict:
    cmd = [sys.executable, "-m", f"bench.{module}", "--gpu_target=h200", *flags]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


needs_plugin = pytest.mark.skipif(
    not os.path.isdir(os.path.join(gpu_target.PLUGIN_DIR, "jax_plugins")),
    reason="no CUDA plugin in .cuda-plugin/ (make gpu-target-deps)",
)


@needs_plugin
def test_rollout_compiles_for_h200_and_decode_reads_the_cache_once_per_segment():
    shape = ("--preset=tiny-qwen2", "--batch=64", "--prompt_len=192", "--new_tokens=64")
    result = _bench("rollout", *shape)
    assert result["device"] == "NVIDIA H200 (compile only)"
    assert result["compiled_temp_gb"] > 0
    # The cache dominates this shape. Writing each layer's cache back whole made a step move
    # 5.8x the weights + cache; reading it once (plus logits, softmax, norms) is 2.5x.
    assert result["decode_step_mb"] < 3.5 * result["weights_and_cache_mb"], result
    # Two decode segments: the first attends to 192 + 32 of the 256 slots, so it moves less, in
    # the same kernels. Attending to a prefix sliced out of the whole cache made XLA copy the
    # keys' prefix every step: 4.8 MB in 45 kernels (BUILD_NOTES, segmented decode).
    split = _bench("rollout", *shape, "--decode_segments=2")
    first, second = split["per_segment_mb"]
    assert first < second == result["decode_step_mb"], split
    assert split["decode_step_kernels"] == 2 * result["decode_step_kernels"], split
    # Compacted: the second segment also compiles at 32, 16 and 8 of the 64 rows, each step
    # moving less; at all the rows, as much as without compaction.
    compacted = _bench("rollout", *shape, "--decode_segments=2", "--compact_rows")
    ((whole, *narrower),) = compacted["per_width_mb"]
    assert whole == second and narrower == sorted(narrower, reverse=True), compacted
    assert narrower[-1] < whole / 4, compacted
    # Nothing cache-sized is copied: when the all-rows branch looped in place over a cache that
    # the other branches read, XLA copied it whole (2.3 MB here; BUILD_NOTES, compacted decode).
    assert compacted["copied_mb"] < compacted["weights_and_cache_mb"] / 4, compacted


@needs_plugin
def test_lora_adapters_leave_the_h200_decode_step_as_it_was():
    # The sampler merges the adapters into its weights once, before the loop: the decode step
    # moves the same bytes in the same kernels as without them.
    shape = ("--preset=tiny-qwen2", "--batch=64", "--prompt_len=64", "--new_tokens=32")
    plain, adapted = _bench("rollout", *shape), _bench("rollout", *shape, "--lora_rank=8")
    assert adapted["lora_rank"] == 8
    for key in ("decode_step_mb", "decode_step_kernels"):
        assert adapted[key] == plain[key], key


@needs_plugin
def test_update_compiles_for_h200_with_a_memory_estimate():
    # A real size (GB are rounded to 3 places), at a short sequence so it compiles in seconds.
    result = _bench(
        "update", "--preset=qwen2.5-0.5b", "--batch=2", "--prompt_len=8", "--completion_len=8",
        "--beta=0.1",
    )  # fmt: skip
    assert result["device"] == "NVIDIA H200 (compile only)"
    params_gb = 4 * result["params_m"] / 1e3  # fp32
    # The frozen reference is held in the compute dtype, bf16: half the params' bytes.
    assert result["ref_params_gb"] == pytest.approx(params_gb / 2, rel=0.01)
    # The state (params + Lion's momentum) is the argument; the reference params come on top.
    assert result["compiled_argument_gb"] >= 2 * params_gb
    assert result["update_peak_estimate_gb"] >= 2.5 * params_gb
    # The roofline: XLA's matmuls do at least the model's FLOPs, and the MFU bound is a fraction.
    model_tflops = result["model_gflops_per_token"] * result["tokens"] / 1e3
    assert result["hlo_tflops"] >= model_tflops * 0.99
    assert result["roofline_s"] == pytest.approx(
        result["roofline_matmul_s"] + result["roofline_other_s"], abs=2e-4
    )
    assert 0 < result["roofline_mfu"] < 1 and result["roofline_top"]
