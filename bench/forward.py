"""Forward throughput: tokens/s of the trainer's full-sequence forward at a fixed shape.

    python -m bench.forward --model=smollm2-135m-instruct --batch=8 --seq_len=128

Times two jitted functions on random tokens (no padding): `forward` alone (hidden states) and
`forward` + `token_logprobs` (what the trainer recomputes per completion token). Each is called
once to compile, then `--iters` times, each ending in `block_until_ready`. FLOPs are counted as
2 x matmul params x tokens plus attention (2 x 2 x layers x T^2/2 x heads x head_dim per
sequence, causal), so the GFLOP/s line is comparable across shapes.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from grpo.models import loading
from grpo.models.config import ModelConfig
from grpo.models.transformer import forward, token_logprobs

flags.DEFINE_string("model", loading.SMOLLM2_NAME, "Anything `loading.load_model` accepts.")
flags.DEFINE_string("dtype", "float32", "Activation / matmul dtype.")
flags.DEFINE_integer("batch", 8, "Sequences per call.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_integer("iters", 5, "Timed calls after the warm-up.")
FLAGS = flags.FLAGS


def _flops_per_call(config: ModelConfig, batch: int, seq_len: int, with_unembed: bool) -> float:
    d, f, dh = config.hidden_size, config.intermediate_size, config.head_dim
    attn_proj = d * dh * (2 * config.num_heads + 2 * config.num_kv_heads)
    matmul_params = config.num_layers * (attn_proj + 3 * d * f)
    if with_unembed:
        matmul_params += config.vocab_size * d
    attention = 2 * 2 * config.num_layers * config.num_heads * dh * seq_len * seq_len / 2
    return batch * (2 * matmul_params * seq_len + attention)


def _seconds_per_call(fn, iters: int) -> tuple[float, float]:
    """(warm-up seconds including compilation, mean seconds of the next `iters` calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn())
    return warmup, (time.perf_counter() - start) / iters


def main(argv: list[str]) -> None:
    del argv
    config, params, _ = loading.load_model(FLAGS.model, dtype=FLAGS.dtype)
    params = jax.device_put(params)
    batch, seq_len = FLAGS.batch, FLAGS.seq_len
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq_len)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    valid = jnp.ones((batch, seq_len), bool)

    @jax.jit
    def hidden_only(params, tokens):
        return forward(params, tokens, positions, valid, config=config)[0]

    @jax.jit
    def with_logprobs(params, tokens):
        hidden = forward(params, tokens, positions, valid, config=config)[0]
        return token_logprobs(params, hidden, tokens, config=config)

    device = jax.devices()[0]
    print(
        f"model={FLAGS.model} params={config.num_params / 1e6:.1f}M batch={batch} "
        f"seq_len={seq_len} dtype={config.dtype} device={device.platform}:{device.device_kind} "
        f"x{jax.device_count()} (one used)"
    )
    for name, fn, unembed in (
        ("forward", hidden_only, False),
        ("forward+logprobs", with_logprobs, True),
    ):
        warmup, seconds = _seconds_per_call(functools.partial(fn, params, tokens), FLAGS.iters)
        gflops = _flops_per_call(config, batch, seq_len, unembed) / seconds / 1e9
        print(
            f"{name}: {batch * seq_len / seconds:,.0f} tokens/s ({seconds * 1e3:.1f} ms/call, "
            f"{gflops:.1f} GFLOP/s; warm-up incl. compile {warmup:.1f} s; {FLAGS.iters} iters)"
        )


if __name__ == "__main__":
    app.run(main)
