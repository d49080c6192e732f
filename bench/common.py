"""Shared pieces of the update and step benches: model shapes, random inputs, timing, memory,
MFU and the op-level profile summary."""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grpo import flops, optim, profiling
from grpo.models import lora, presets
from grpo.models import transformer as tf
from grpo.models.config import ATTENTION_IMPLS, LoraConfig, ModelConfig
from grpo.types import Batch, TrainState

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-shape flags every bench shares."""
    parser.add_argument("--preset", default="tiny-qwen2", choices=sorted(presets.PRESETS))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activations")
    parser.add_argument("--param_dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--remat", default="dots", choices=("none", "full", "dots"))
    parser.add_argument("--attention", default="xla", choices=ATTENTION_IMPLS)
    parser.add_argument("--optimizer", default="lion", help="a grpo.optim.make_optimizer name")
    parser.add_argument("--mu_dtype", default=None, choices=("bfloat16",), help="first moment")
    parser.add_argument("--micro_batches", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.0, help="> 0 adds the reference pass")
    parser.add_argument("--logprob_chunk", type=int, default=128)
    parser.add_argument("--peak_tflops", type=float, default=None, help="override for MFU")
    parser.add_argument("--profile_dir", default=None, help="jax.profiler trace of one step")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return presets.preset(
        args.preset,
        dtype=DTYPES[args.dtype],
        param_dtype=DTYPES[args.param_dtype],
        remat=args.remat,
        attention_impl=args.attention,
    )


def with_lora(config: ModelConfig, rank: int) -> ModelConfig:
    """The config with rank-`rank` LoRA adapters on every projection (0: none)."""
    return config.replace(lora=LoraConfig(rank)) if rank else config


def trainable_and_frozen(config: ModelConfig, params: tf.Params) -> tuple[Any, Any]:
    """(trainable, frozen) as the trainer holds them: the params and None, or fresh LoRA
    adapters (abstract if `params` are) and the frozen params."""
    if config.lora is None:
        return params, None
    init = lambda: lora.init_adapters(
        tf.param_shapes(config)["layers"], config.lora, jax.random.key(1)
    )
    abstract = isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
    return (jax.eval_shape(init) if abstract else jax.jit(init)()), params


def random_params(config: ModelConfig, seed: int = 0) -> tf.Params:
    """Random weights made on the device in one jit (no host copy of a large model)."""
    return jax.jit(tf.init_params, static_argnums=0)(config, jax.random.key(seed))


def train_state(params: tf.Params, tx, seed: int = 0) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optim.init_opt_state(tx, params),
        rng=jax.random.key(seed),
    )


def make_tx(args: argparse.Namespace):
    """`--optimizer` (and `--mu_dtype`) with the trainer's defaults, at a constant learning rate."""
    schedule = optim.make_lr_schedule(1, type="constant", warmup_ratio=0.0)
    return optim.make_optimizer(schedule, name=args.optimizer, mu_dtype=args.mu_dtype)


def random_batch(
    config: ModelConfig,
    rows: int,
    prompt_len: int,
    completion_len: int,
    seed: int = 0,
    min_completion_len: int | None = None,
    prompt_group: int = 1,
    group_length_spread: float | None = None,
) -> Batch:
    """A host (numpy) Batch with every prompt slot valid and every completion slot too, the most
    tokens a shape holds; or, given `min_completion_len`, completions of lengths drawn uniformly
    from [min_completion_len, completion_len], each row alone, or with `group_length_spread` s
    one length L per group and its rows' within L x [1 - s, 1 + s] (a prompt's completions
    run to similar lengths). Rows come in groups of `prompt_group` that share a prompt, as a
    step's do. No reference log-probs. Host arrays, so a PyTorch baseline can run before JAX
    claims the device."""
    rng = np.random.default_rng(seed)
    tokens = lambda n, r=rows: rng.integers(0, config.vocab_size, (r, n)).astype(np.int32)
    batch = Batch(
        prompt_tokens_BxP=np.repeat(tokens(prompt_len, rows // prompt_group), prompt_group, 0),
        prompt_mask_BxP=np.ones((rows, prompt_len), bool),
        completion_tokens_BxC=tokens(completion_len),
        completion_mask_BxC=np.ones((rows, completion_len), bool),
        # Near a random-weight model's own log-probs (~ -log V), so ratios stay near 1.
        old_logps_BxC=(
            -np.log(config.vocab_size) + 0.1 * rng.standard_normal((rows, completion_len))
        ).astype(np.float32),
        advantages_B=rng.standard_normal(rows).astype(np.float32),
        truncated_B=np.ones(rows, bool),  # every completion fills its budget
    )
    if min_completion_len is None:
        return batch
    lengths = rng.integers(min_completion_len, completion_len + 1, rows)
    if group_length_spread is not None:
        groups = rows // prompt_group
        base = np.repeat(rng.integers(min_completion_len, completion_len + 1, groups), prompt_group)
        jitter = rng.uniform(1 - group_length_spread, 1 + group_length_spread, rows)
        lengths = np.clip(np.rint(base * jitter), min_completion_len, completion_len).astype(int)
    return batch.replace(
        completion_mask_BxC=np.arange(completion_len)[None] < lengths[:, None],
        truncated_B=lengths == completion_len,
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, waiting for the device."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def device_kind() -> str:
    return jax.devices()[0].device_kind


def peak_flops_per_s(override_tflops: float | None) -> float | None:
    """One device's bf16 peak: the override, else the table in grpo.flops (None on CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    return flops.peak_flops(device_kind())


def peak_device_bytes() -> int | None:
    """The device allocator's high-water mark since start (GPU/TPU); None where not tracked."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def memory_analysis(compiled) -> dict[str, float]:
    """XLA's static buffer sizes of a compiled executable, in GB (works on CPU too)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    sizes = {
        "argument_gb": analysis.argument_size_in_bytes,
        "output_gb": analysis.output_size_in_bytes,
        "temp_gb": analysis.temp_size_in_bytes,
        "alias_gb": analysis.alias_size_in_bytes,
    }
    return {name: round(size / 1e9, 3) for name, size in sizes.items()}


def live_gb(memory: dict[str, float]) -> float:
    """What an executable holds at its peak by `memory_analysis`: arguments, temporaries and the
    outputs not aliased to (donated) arguments."""
    held = memory["argument_gb"] + memory["output_gb"] + memory["temp_gb"]
    return held - memory["alias_gb"]


def gb(size: int | None) -> float | str:
    return "n/a" if size is None else round(size / 1e9, 3)


@contextlib.contextmanager
def maybe_trace(profile_dir: str | None) -> Iterator[None]:
    if profile_dir is None:
        yield
        return
    with jax.profiler.trace(profile_dir, profiler_options=profiling.trace_options()):
        yield


def top_ops(profile_dir: str, hlo_text: str = "", count: int = 15) -> list[dict[str, Any]]:
    """The costliest XLA ops of the newest trace under `profile_dir`: total ms and calls summed
    over every thread/stream, and the jax op that each came from (from `hlo_text`'s metadata)."""
    paths = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"{profile_dir}: no *.xplane.pb trace found")
    data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
    total_ms: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if _is_xla_op(line.name, event):
                    total_ms[event.name] += event.duration_ns / 1e6
                    calls[event.name] += 1
    ranked = sorted(total_ms.items(), key=lambda kv: -kv[1])[:count]
    return [
        {"op": name, "ms": round(ms, 2), "calls": calls[name], "from": _jax_op(hlo_text, name)}
        for name, ms in ranked
    ]


_CONTAINER_OP = re.compile(r"(while|call|conditional)(\.\d+)?")


def _is_xla_op(line_name: str, event) -> bool:
    # Loops and calls contain other ops, which are counted themselves.
    if _CONTAINER_OP.fullmatch(event.name):
        return False
    # GPU/TPU planes have an "XLA Ops" line; on CPU, op events carry an `hlo_op` stat.
    return "XLA Ops" in line_name or any(name == "hlo_op" for name, _ in event.stats)


def _jax_op(hlo_text: str, op: str) -> str:
    """The `op_name` metadata (the jax source op path) of HLO instruction `op`, shortened."""
    match = re.search(rf"\n\s*(?:ROOT )?%?{re.escape(op)} = .*?op_name=\"([^\"]*)\"", hlo_text)
    return match.group(1)[-90:] if match else ""


def print_result(result: dict[str, Any]) -> None:
    """One `key: value` line each, then the whole result as one JSON line (for BUILD_NOTES)."""
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")
    print(json.dumps(result))
