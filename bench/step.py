"""End-to-end GRPO step, split by phase: rollout, reward, advantage, reference, update.

    python -m bench.step --preset=qwen2.5-1.5b --prompts=16 --group=8 --prompt_len=256 \
        --new_tokens=1024 --micro_batches=16 --beta=0.04

Runs the trainer's phases (grpo.phases.*) in the order and with the host syncs of
`grpo.train.run_step`, on random weights of a named shape and random prompts (every slot real).
Generation has a fixed length: the only end id is the last vocabulary id, which random weights
rarely sample and which never ends the loop unless every row emits it (rows that ended early are
counted); completions are not trimmed to buckets, so every step has the same shapes. The reward
is the trainer's host scorer (GSM8K correctness, format, tag count) on the completion ids written
as text, a cheap stand-in for detokenisation; random text scores 0, so advantages (and the printed
loss) are 0, which changes no shape and no cost of the update. `--warmup` steps (compilation) are
dropped; the mean of `--steps` timed steps is printed per phase, with the rollout's share.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from grpo import flops
from grpo.phases import reward as reward_phase
from grpo.phases import rollout as rollout_phase
from grpo.phases import update
from grpo.phases.advantage import group_advantages
from grpo.types import Batch, Rollout

PHASES = ("rollout", "reward", "advantage", "reference", "update")
_EXAMPLE = {"question": "Mia has 3 apples and buys 4 more. How many?", "answer": "3+4=7\n#### 7"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=32, help="fixed completion length")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument(
        "--shared_prompts",
        action="store_true",
        help="the update and reference pass run each prompt once for its group "
        "(TrainConfig.shared_prompt_forward); --micro_batches must divide --prompts",
    )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be >= 1, got {args.warmup} and {args.steps}")
    rows = args.prompts * args.group
    if args.micro_batches < 1 or rows % args.micro_batches:
        parser.error(f"--micro_batches={args.micro_batches} does not divide {rows} completions")
    if args.shared_prompts and args.prompts % args.micro_batches:
        parser.error(f"--shared_prompts: --micro_batches must divide --prompts={args.prompts}")
    return args


class StepRunner:
    """The phases of one GRPO step over a fixed random prompt batch, timed per phase."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config = common.model_config(args)
        self.loss = update.LossConfig(beta=args.beta, logprob_chunk=args.logprob_chunk)
        self.tx = common.make_tx(args)
        params = common.random_params(self.config)
        # The frozen reference is a copy of the initial policy (the state's params are donated),
        # in the compute dtype, as the trainer holds it.
        self.ref_params = None
        if args.beta > 0:
            frozen = self.config.frozen_dtype
            self.ref_params = jax.tree.map(lambda w: jnp.array(w, frozen, copy=True), params)
        self.state = common.train_state(params, self.tx)
        rng = np.random.default_rng(0)
        vocab = self.config.vocab_size
        # As the trainer does on one device: each prompt prefilled once, `group` samples of it.
        self.prompts_BxP = rng.integers(0, vocab - 1, (args.prompts, args.prompt_len), np.int32)
        self.prompt_mask_BxP = np.ones_like(self.prompts_BxP, bool)
        self.sampling = rollout_phase.SamplingConfig(
            max_new_tokens=args.new_tokens,
            temperature=args.temperature,
            end_ids=(vocab - 1,),
            pad_id=0,
        )
        self.prompt_group = args.group if args.shared_prompts else 1
        self.update_fn = update.make_update_fn(
            model=self.config,
            tx=self.tx,
            loss=self.loss,
            num_micro_batches=args.micro_batches,
            group_size=args.group,
            prompt_group=self.prompt_group,
        )
        self.ref_fn = None
        if args.beta > 0:
            self.ref_fn = update.make_reference_logps_fn(
                self.config,
                self.loss,
                num_micro_batches=args.micro_batches,
                prompt_group=self.prompt_group,
            )
        self.compiled_update = None  # compiled ahead of time on the first batch

    def step(self, index: int) -> tuple[dict[str, float], Rollout, dict[str, Any]]:
        """One GRPO step; returns seconds per phase, the rollout and the update's metrics."""
        args, seconds = self.args, {}
        tick = time.perf_counter()
        rollout = rollout_phase.generate(
            self.state.params,
            self.prompts_BxP,
            self.prompt_mask_BxP,
            jax.random.key(index),
            model=self.config,
            sampling=self.sampling,
            num_samples=args.group,
        )
        rollout = jax.block_until_ready(rollout_phase.trim_completions(rollout, ()))
        texts = _as_text(np.asarray(rollout.completion_tokens_BxC), np.asarray(rollout.lengths_B))
        seconds["rollout"], tick = _lap(tick)

        rewards = reward_phase.score(
            texts, [_EXAMPLE] * len(texts), rewards=reward_phase.RewardConfig()
        )
        seconds["reward"], tick = _lap(tick)

        advantages_B = group_advantages(jnp.asarray(rewards.total), group_size=args.group)
        batch = Batch.from_rollout(rollout, jax.block_until_ready(advantages_B))
        seconds["advantage"], tick = _lap(tick)

        if self.ref_fn is not None:
            ref_logps_BxC = jax.block_until_ready(self.ref_fn(self.ref_params, batch))
            batch = batch.replace(ref_logps_BxC=ref_logps_BxC)
        seconds["reference"], tick = _lap(tick)

        if self.compiled_update is None:
            self.compiled_update = self.update_fn.lower(self.state, batch).compile()
        self.state, metrics = self.compiled_update(self.state, batch)
        metrics = jax.device_get(metrics)
        seconds["update"], _ = _lap(tick)
        return seconds, rollout, metrics


def _lap(tick: float) -> tuple[float, float]:
    now = time.perf_counter()
    return now - tick, now


def _as_text(tokens_BxC: np.ndarray, lengths_B: np.ndarray) -> list[str]:
    return [" ".join(map(str, row[:n])) for row, n in zip(tokens_BxC, lengths_B, strict=True)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    runner = StepRunner(args)
    tick = time.perf_counter()
    for index in range(args.warmup):
        runner.step(index)
    warmup_s = time.perf_counter() - tick
    totals = dict.fromkeys(PHASES, 0.0)
    for index in range(args.warmup, args.warmup + args.steps):
        with common.maybe_trace(args.profile_dir if index == args.warmup else None):
            seconds, rollout, metrics = runner.step(index)
        for name, value in seconds.items():
            totals[name] += value
    phase_s = {name: total / args.steps for name, total in totals.items()}
    step_s = sum(phase_s.values())
    rows = args.prompts * args.group
    config = runner.config
    update_flops = flops.training_flops(
        config, rows, args.prompt_len, args.new_tokens, runner.prompt_group
    )
    peak = common.peak_flops_per_s(args.peak_tflops)
    result: dict[str, Any] = {
        "bench": "step",
        "device": f"{jax.devices()[0].platform}:{common.device_kind()}",
        "preset": args.preset,
        "params_m": round(config.num_params / 1e6, 1),
        "completions": rows,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "micro_batches": args.micro_batches,
        "shared_prompts": args.shared_prompts,
        "beta": args.beta,
        "optimizer": args.optimizer,
        "mu_dtype": args.mu_dtype,
        "remat": config.remat,
        "warmup_s": round(warmup_s, 2),
        "step_s": round(step_s, 4),
        **{f"{name}_s": round(value, 4) for name, value in phase_s.items()},
        "rollout_share": round(phase_s["rollout"] / step_s, 3),
        "rows_ended_early": int(np.sum(~np.asarray(rollout.truncated_B))),
        "rollout_new_tokens_per_s": round(rows * args.new_tokens / phase_s["rollout"], 1),
        "update_tokens_per_s": round(
            rows * (args.prompt_len + args.new_tokens) / phase_s["update"], 1
        ),
        "update_mfu": "n/a" if peak is None else round(update_flops / phase_s["update"] / peak, 4),
        "peak_device_gb": common.gb(common.peak_device_bytes()),
        **{
            f"update_compiled_{k}": v
            for k, v in common.memory_analysis(runner.compiled_update).items()
        },
        "loss": float(metrics["loss"]),
    }
    if args.profile_dir:
        result["top_ops"] = common.top_ops(args.profile_dir, runner.compiled_update.as_text())
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(parse_args(argv))
    common.print_result(result)
    return result


if __name__ == "__main__":
    main()
