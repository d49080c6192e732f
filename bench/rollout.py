"""Rollout throughput: new tokens/s of `grpo.phases.rollout.generate` at a fixed shape.

    python -m bench.rollout --preset=qwen2.5-0.5b --batch=256 --prompt_len=128 --new_tokens=256 \
        --hf_baseline --mem_bw_gbps=4800

Weights are random for `--preset` (shapes from grpo/models/presets.py) or loaded from `--model`
(a Hugging Face folder or a .gguf file). The only end id is the last vocabulary id, which random
(and real) weights practically never emit, so every sequence runs the full budget; the script
reports any that stopped early. Timings include prefill, follow a warm-up call (compilation), and
end with `block_until_ready`. `--hf_baseline` times transformers' `generate` (PyTorch, bf16,
random weights, same shape, `min_new_tokens=new_tokens`) in the same run. `--profile_dir` traces
one more call and prints its costliest XLA ops with the jax op each came from (where a decode
step's time goes: layer weights, attention over the cache, sampling over the vocabulary).

`--top_k`/`--top_p` truncate the sampled distribution (transformers' baseline too);
`--keep_sampling_mask` also records each token's kept ids (make_sampling.keep_sampling_mask):
time it against the same truncation without, side by side.

`--appended=N` also times the round after a tool call: a first round samples half the budget,
N tokens are appended (a tool's result), and the second half is sampled on the first round's
keys and values (`generate_in_rounds`), against a fresh prefill of the whole text (the prompt
bucket plus the budget, as the tool rounds ran before they kept the cache), side by side.

Memory-bandwidth bound: a decode step reads every parameter once (in the compute dtype) plus the
whole preallocated KV cache (attention runs over all prompt_len + new_tokens slots, masked), so
tokens/s <= batch * bandwidth / (param bytes + KV cache bytes).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench import common, gpu_target, hlo, tpu_target
from grpo import sharding
from grpo.models import loading, lora, presets
from grpo.models import transformer as tf
from grpo.models.config import ModelConfig
from grpo.phases import rollout
from grpo.phases.stop_strings import StopStrings

flags.DEFINE_string("preset", "tiny-qwen2", "Model shape from grpo/models/presets.py (random).")
flags.DEFINE_string("model", None, "A Hugging Face folder or .gguf file (overrides --preset).")
flags.DEFINE_string("dtype", "bfloat16", "Activation / matmul dtype.")
flags.DEFINE_string("param_dtype", "float32", "Dtype the params are held in (as the trainer).")
flags.DEFINE_integer("batch", 8, "Sequences (completions) per generate call.")
flags.DEFINE_integer("num_samples", 1, "Completions per prompt (batch / num_samples prompts).")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per sequence (no padding).")
flags.DEFINE_integer("new_tokens", 64, "New tokens per sequence.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("repetition_penalty", 1.0, "> 1: ids already in a row are drawn less often.")
flags.DEFINE_integer("top_k", 0, "> 0: draw from the top_k most likely ids (0: every id).")
flags.DEFINE_float("top_p", 1.0, "< 1: draw from the smallest set of ids this likely.")
flags.DEFINE_bool(
    "keep_sampling_mask", False, "Record each token's kept ids (needs --top_k > 0): their cost."
)
flags.DEFINE_integer("decode_segments", 1, "Decode loops, each attending to a longer cache prefix.")
flags.DEFINE_bool(
    "shared_prompt_decode", False, "Decode reads each prompt's cache once for its samples."
)
flags.DEFINE_list(
    "stop_strings", [], "Stop strings over a stand-in vocabulary that spells token i '<i>': "
    "each decode step pays their lookup, and (but for strings such as '<5><9>') none matches.",
)  # fmt: skip
flags.DEFINE_bool(
    "compact_rows", False, "Later decode segments run on the rows still going (needs segments)."
)
flags.DEFINE_float(
    "end_rate", 0.0,
    "> 0: this fraction of the vocabulary (evenly spaced ids) ends a row, so completions end at "
    "spread lengths (a long tail at small rates); 0: fixed-length generation.",
)  # fmt: skip
flags.DEFINE_integer("iters", 3, "Timed calls after the warm-up.")
flags.DEFINE_integer(
    "appended", 0, "> 0: also time the round after a tool call that appends this many tokens."
)
flags.DEFINE_integer("lora_rank", 0, "> 0: decode with fresh LoRA adapters attached (merged).")
flags.DEFINE_bool("hf_baseline", False, "Also time transformers' generate on the same shape.")
flags.DEFINE_float("mem_bw_gbps", None, "Device memory bandwidth, GB/s, for the roofline fraction.")
flags.DEFINE_string("profile_dir", None, "Trace one more call here; print the top ops.")
flags.DEFINE_enum(
    "gpu_target", None, sorted(gpu_target.TARGETS),
    "Compile only, for this GPU (no GPU needed; bench/gpu_target.py): memory and decode bytes.",
)  # fmt: skip
flags.DEFINE_enum(
    "tpu_target", None, sorted(tpu_target.TARGETS),
    "Compile only, for this TPU slice, fsdp over its chips (bench/tpu_target.py): memory.",
)  # fmt: skip
FLAGS = flags.FLAGS


def _model() -> tuple[ModelConfig, tf.Params]:
    overrides = dict(dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype)
    if FLAGS.model:
        load = loading.load_gguf if FLAGS.model.endswith(".gguf") else loading.load_hf_folder
        config, params = load(FLAGS.model, **overrides)
        return _with_adapters(config, jax.device_put(params))
    config = presets.preset(FLAGS.preset, **overrides)
    init = jax.jit(tf.init_params, static_argnums=0)
    return _with_adapters(config, init(config, jax.random.key(0)))


def _with_adapters(config: ModelConfig, params) -> tuple[ModelConfig, tf.Params]:
    """With --lora_rank, the config and params the trainer samples with: fresh adapters
    attached (the sampler merges them before decoding); else as they are."""
    config = common.with_lora(config, FLAGS.lora_rank)
    adapters, frozen = common.trainable_and_frozen(config, params)
    return config, lora.attach(frozen, adapters)


def _end_ids(vocab_size: int) -> tuple[int, ...]:
    """Without --end_rate the last id alone, which random weights practically never sample."""
    every = round(1 / FLAGS.end_rate) if FLAGS.end_rate else vocab_size
    return tuple(range(vocab_size - 1, -1, -every))


def _sampling(config: ModelConfig) -> rollout.SamplingConfig:
    return rollout.SamplingConfig(
        max_new_tokens=FLAGS.new_tokens,
        temperature=FLAGS.temperature,
        end_ids=_end_ids(config.vocab_size),
        pad_id=0,
        decode_segments=FLAGS.decode_segments,
        shared_prompt_decode=FLAGS.shared_prompt_decode,
        compact_rows=FLAGS.compact_rows,
        repetition_penalty=FLAGS.repetition_penalty,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        keep_sampling_mask=FLAGS.keep_sampling_mask,
        stop=_stand_in_stop_strings(config.vocab_size) if FLAGS.stop_strings else None,
    )


@functools.cache
def _stand_in_stop_strings(vocab_size: int) -> StopStrings:
    return StopStrings.build(FLAGS.stop_strings, [f"<{i}>".encode() for i in range(vocab_size)])


def _lower(config: ModelConfig, params, tokens, mask, key, mesh=None):
    """The lowered `generate` of this bench's flags (arrays or abstract stand-ins)."""
    return rollout._generate.lower(
        params, tokens, mask, key,
        model=config, sampling=_sampling(config), num_samples=FLAGS.num_samples, mesh=mesh,
    )  # fmt: skip


def _compile(config: ModelConfig, params, tokens, mask, key):
    return _lower(config, params, tokens, mask, key).compile()


def _abstract_inputs(config: ModelConfig):
    """Abstract params (adapters attached under LoRA), prompt tokens, prompt mask and key of
    this bench's shape."""
    params = jax.eval_shape(lambda: tf.init_params(config, jax.random.key(0)))
    _, params = _with_adapters(config, params)
    prompts = (FLAGS.batch // FLAGS.num_samples, FLAGS.prompt_len)
    return (
        params,
        jax.ShapeDtypeStruct(prompts, jnp.int32),
        jax.ShapeDtypeStruct(prompts, jnp.bool_),
        jax.eval_shape(lambda: jax.random.key(1)),
    )


def _compile_for_tpu_target() -> dict:
    """--tpu_target: XLA's per-chip memory analysis of `generate`, sharded as the trainer runs
    it (params fsdp, rows over the batch axes)."""
    if FLAGS.model or FLAGS.lora_rank:
        raise app.UsageError("--tpu_target compiles a --preset shape without LoRA")
    mesh = tpu_target.mesh(FLAGS.tpu_target)
    config = presets.preset(FLAGS.preset, dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype)
    params, tokens, mask, key = _abstract_inputs(config)
    params, (tokens, mask) = tpu_target.on_mesh(mesh, config, params, (tokens, mask))
    key = tpu_target.place(key, sharding.replicated(mesh))
    header = _compile_only_header(tpu_target.TARGETS[FLAGS.tpu_target], config)
    lower = lambda: _lower(config, params, tokens, mask, key, mesh)
    compile_s, (compiled, refused) = common.timed(lambda: tpu_target.compile_for(mesh, lower))
    if compiled is None:
        return {**header, **refused}
    memory = common.memory_analysis(compiled)
    return {
        **header,
        "compile_s": round(compile_s, 2),
        "mesh": dict(mesh.shape),  # GB are per chip
        **{f"compiled_{k}": v for k, v in memory.items()},
        **tpu_target.fit(FLAGS.tpu_target, compiled, common.live_gb(memory)),
        # Per chip and decode step (one entry per decode segment's loop).
        "decode_step_collectives": hlo.collectives_report(compiled.as_text()),
    }


def _compile_only_header(target, config: ModelConfig) -> dict:
    return {
        "device": target.compile_only_label,
        "model": FLAGS.preset,
        "dtype": config.dtype,
        "batch": FLAGS.batch,
        "prompt_len": FLAGS.prompt_len,
        "new_tokens": FLAGS.new_tokens,
        "lora_rank": FLAGS.lora_rank,
        **_decode_knobs(),
    }


def _decode_knobs() -> dict:
    return {
        "num_samples": FLAGS.num_samples,
        "decode_segments": FLAGS.decode_segments,
        "shared_prompt_decode": FLAGS.shared_prompt_decode,
        "compact_rows": FLAGS.compact_rows,
        "repetition_penalty": FLAGS.repetition_penalty,
        "top_k": FLAGS.top_k,
        "top_p": FLAGS.top_p,
        "keep_sampling_mask": FLAGS.keep_sampling_mask,
        "end_rate": FLAGS.end_rate,
    }


def _compile_for_gpu_target() -> dict:
    """--gpu_target: XLA's memory analysis of `generate` and the bytes one decode step moves."""
    if FLAGS.model:
        raise app.UsageError("--gpu_target compiles a --preset shape; drop --model")
    target = gpu_target.TARGETS[FLAGS.gpu_target]
    on = gpu_target.device(FLAGS.gpu_target)
    config = presets.preset(FLAGS.preset, dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype)
    config = common.with_lora(config, FLAGS.lora_rank)
    start = time.perf_counter()
    compiled = _compile(config, *gpu_target.abstract(_abstract_inputs(config), on))
    compile_s = time.perf_counter() - start
    hlo_text = compiled.as_text()
    traffic = gpu_target.loop_traffic(hlo_text)
    # Decode segments run one loop each (with --compact_rows, each later one a loop per width:
    # all the rows, a half, ...); weigh each segment's all-rows loop by the steps it runs.
    ends = rollout.segment_ends(FLAGS.new_tokens, FLAGS.decode_segments)
    widths = len(rollout.compaction_widths(FLAGS.batch)) if FLAGS.compact_rows else 1
    loops_mb = [b / 1e6 for b in traffic["per_loop"]]
    if len(loops_mb) != 1 + (len(ends) - 1) * widths:
        raise RuntimeError(f"{len(loops_mb)} loops compiled for {len(ends)} segments")
    by_segment = [loops_mb[:1]] + [
        loops_mb[i : i + widths] for i in range(1, len(loops_mb), widths)
    ]
    kernels = [traffic["kernels_per_loop"][0]] + traffic["kernels_per_loop"][1::widths]
    steps = np.diff([1, *ends])
    step_mb = float(np.dot([mb[0] for mb in by_segment], steps) / steps.sum())
    ideal = _bytes_per_step(config)
    return {
        **_compile_only_header(target, config),
        "compile_s": round(compile_s, 2),
        **{f"compiled_{k}": v for k, v in common.memory_analysis(compiled).items()},
        "decode_step_mb": round(step_mb, 1),
        "per_segment_mb": [round(mb[0], 1) for mb in by_segment],
        # --compact_rows: each later segment's step at all its rows, a half, a quarter, an eighth
        **(
            {"per_width_mb": [[round(b, 1) for b in mb] for mb in by_segment[1:]]}
            if widths > 1
            else {}
        ),
        "decode_step_kernels": kernels,  # per segment
        "copied_mb": round(gpu_target.copied_bytes(hlo_text) / 1e6, 1),
        "weights_and_cache_mb": round(ideal / 1e6, 1),
        "bw_bound_tokens_per_s": round(FLAGS.batch * target.bandwidth_bytes_per_s / step_mb / 1e6),
        "decode_step_top": traffic["top"],
    }


def _time_calls(fn, iters: int) -> tuple[float, float, object]:
    """(first call seconds, mean seconds of the next `iters` calls, last result)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        out = jax.block_until_ready(fn())
    return first, (time.perf_counter() - start) / iters, out


def _round_after_a_call(config: ModelConfig, params, tokens, mask, sampling) -> dict:
    """--appended: seconds of the round after a call on the first round's context, and of the
    same round prefilled afresh, each sampling the rest of the budget."""
    half, rows = FLAGS.new_tokens // 2, FLAGS.batch
    room = np.full(rows, FLAGS.new_tokens - half - FLAGS.appended, np.int32)
    if room.min() < 1:
        raise app.UsageError("--appended must leave budget after half of --new_tokens")
    first, context = rollout.generate_in_rounds(
        params, tokens, mask, jax.random.key(1),
        model=config, sampling=sampling, num_samples=FLAGS.num_samples,
        budget_B=np.full(rows, half, np.int32),
    )  # fmt: skip
    sampled = np.asarray(first.completion_tokens_BxC)[:, :half]
    appended = np.random.default_rng(1).integers(0, config.vocab_size - 1, (rows, FLAGS.appended))
    window = np.concatenate([sampled[:, -1:], appended], axis=1).astype(np.int32)
    whole = np.concatenate([np.repeat(tokens, FLAGS.num_samples, 0), sampled, appended], axis=1)
    whole, whole_mask = rollout.pad_prompts(
        whole.tolist(), pad_id=0, buckets=[FLAGS.prompt_len + FLAGS.new_tokens]
    )
    on = functools.partial(
        rollout.generate_in_rounds, params, window, np.ones_like(window, bool), jax.random.key(2),
        model=config, sampling=sampling, num_samples=1, budget_B=room,
    )  # fmt: skip
    prefilled = functools.partial(
        rollout.generate, params, whole, whole_mask, jax.random.key(2),
        model=config, sampling=sampling, num_samples=1, budget_B=room,
    )  # fmt: skip

    def on_context_s() -> float:  # the context is donated: each call gets a copy of its own
        copy = jax.block_until_ready(jax.tree.map(jnp.copy, context))
        start = time.perf_counter()
        jax.block_until_ready(on(context=copy))
        return time.perf_counter() - start

    on_context_s()  # compile
    on_context = min(on_context_s() for _ in range(FLAGS.iters))
    _, again, _ = _time_calls(prefilled, FLAGS.iters)
    return {
        "appended": FLAGS.appended,
        "round_on_context_s": round(on_context, 4),
        "round_prefilled_s": round(again, 4),
        "prefilled_over_context": round(again / on_context, 2),
    }


def _kept_ids(kept_BxCxK: jax.Array | None) -> dict:
    """What --keep_sampling_mask recorded: ids per token and their size (none without it)."""
    if kept_BxCxK is None:
        return {"kept_ids_per_token": 0, "kept_ids_bytes": 0}
    return {"kept_ids_per_token": kept_BxCxK.shape[-1], "kept_ids_bytes": kept_BxCxK.nbytes}


def _bytes_per_step(config: ModelConfig) -> int:
    """The weights and the KV cache: every row's prompt and completion slots, or with
    --shared_prompt_decode each prompt's once."""
    prompt_rows = FLAGS.batch // FLAGS.num_samples if FLAGS.shared_prompt_decode else FLAGS.batch
    slots = prompt_rows * FLAGS.prompt_len + FLAGS.batch * FLAGS.new_tokens
    kv = 2 * config.num_layers * slots * config.num_kv_heads * config.head_dim
    return (config.num_params + kv) * jnp.dtype(config.dtype).itemsize


def _hf_tokens_per_s(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = config.to_hf()
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size - 1, (batch, prompt_len), device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=FLAGS.temperature > 0,
        pad_token_id=0,
    )
    if FLAGS.temperature > 0:
        kwargs.update(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)

    def run():
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    return batch * new_tokens / seconds


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.batch % FLAGS.num_samples:
        raise ValueError(f"--batch={FLAGS.batch} is not a multiple of --num_samples")
    if FLAGS.gpu_target and FLAGS.tpu_target:
        raise app.UsageError("--gpu_target or --tpu_target, not both")
    if FLAGS.gpu_target:
        common.print_result(_compile_for_gpu_target())
        return
    if FLAGS.tpu_target:
        common.print_result(_compile_for_tpu_target())
        return
    config, params = _model()
    prompts = FLAGS.batch // FLAGS.num_samples
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size - 1, (prompts, FLAGS.prompt_len), dtype=np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    sampling = _sampling(config)

    def call():
        return rollout.generate(
            params, tokens, mask, jax.random.key(1),
            model=config, sampling=sampling, num_samples=FLAGS.num_samples,
        )  # fmt: skip

    first, seconds, out = _time_calls(call, FLAGS.iters)
    # The loop stops early only if every row ended; count the steps it actually ran.
    lengths = np.asarray(out.lengths_B)
    steps = int(np.max(lengths))
    new_tokens = FLAGS.batch * steps
    result = {
        "device": jax.devices()[0].device_kind,
        "model": FLAGS.model or FLAGS.preset,
        "params": config.num_params,
        "dtype": config.dtype,
        "batch": FLAGS.batch,
        "prompt_len": FLAGS.prompt_len,
        "new_tokens": FLAGS.new_tokens,
        "lora_rank": FLAGS.lora_rank,
        "stop_strings": FLAGS.stop_strings,
        **_decode_knobs(),
        "steps_run": steps,
        "rows_ended_early": int(np.sum(~np.asarray(out.truncated_B))),
        "compile_and_first_s": round(first, 2),
        "seconds": round(seconds, 4),
        "ms_per_step": round(1e3 * seconds / steps, 3),
        "new_tokens_per_s": round(new_tokens / seconds, 1),  # rows x steps run
        # With --end_rate, rows end early: the completions' own tokens.
        "mean_completion_len": round(float(lengths.mean()), 1),
        "completion_tokens_per_s": round(float(lengths.sum()) / seconds, 1),
        **_kept_ids(out.kept_ids_BxCxK),
    }
    if FLAGS.mem_bw_gbps:
        step_bytes = _bytes_per_step(config)
        bound = FLAGS.batch * FLAGS.mem_bw_gbps * 1e9 / step_bytes
        result["bytes_per_step_mb"] = round(step_bytes / 1e6, 1)
        result["bw_bound_tokens_per_s"] = round(bound, 1)
        result["frac_of_bw_bound"] = round(new_tokens / seconds / bound, 3)
    if FLAGS.profile_dir:
        with common.maybe_trace(FLAGS.profile_dir):
            jax.block_until_ready(call())
        # The traced executable's HLO (from the compilation cache), to name each op's jax source.
        compiled = _compile(config, params, tokens, mask, jax.random.key(1))
        result["top_ops"] = common.top_ops(FLAGS.profile_dir, compiled.as_text())
    if FLAGS.appended:
        result.update(_round_after_a_call(config, params, tokens, mask, sampling))
    if FLAGS.hf_baseline:
        hf = _hf_tokens_per_s(config, FLAGS.batch, FLAGS.prompt_len, FLAGS.new_tokens)
        result["hf_new_tokens_per_s"] = round(hf, 1)
        result["speedup_vs_hf"] = round(new_tokens / seconds / hf, 2)
    common.print_result(result)


if __name__ == "__main__":
    app.run(main)
