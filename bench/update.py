"""Update throughput: tokens/s, MFU and memory of `grpo.phases.update.make_update_fn`.

    python -m bench.update --preset=qwen2.5-1.5b --batch=64 --prompt_len=256 --completion_len=768 \
        --micro_batches=8 --torch_baseline

Random weights of a named shape (grpo/models/presets.py) and a random Batch with every slot valid
(B x (P + C) tokens), or with `--min_completion_len` completions of random lengths, where
`--width_buckets` > 1 lets length-sorted micro-batches run narrower (tokens/s and MFU then count
the valid tokens only). With `--shared_prompts` G rows share each prompt, which runs once for
them (tokens/s counts every row's tokens; MFU the FLOPs run, grpo/flops.py). The update is
compiled ahead of time (its memory analysis is printed), run `--warmup` times, then timed over
`--iters` calls that each end in `block_until_ready`. With
`--beta > 0` the reference log-prob pass is built and timed too (the trainer runs it once per
rollout, before the update). MFU counts model FLOPs (grpo/flops.py: 6 x matmul params per token,
plus attention, plus the unembedding over completion slots; remat not counted) over the update's
seconds and the device's dense bf16 peak. `--torch_baseline` times a forward + backward of the
same-shaped transformers model (bf16 on GPU, fp32 on CPU, random weights) on the same tokens, in
the same micro-batches, and prints the ratio. The JAX update also runs the optimizer; the PyTorch
baseline does not, so the ratio slightly favours PyTorch.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, gpu_target, hlo, tpu_target
from grpo import flops, optim, sharding
from grpo.models.config import ModelConfig
from grpo.phases import update
from grpo.types import Batch, TrainState


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser)
    parser.add_argument("--batch", type=int, default=8, help="sequences (completions)")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--completion_len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument("--iters", type=int, default=3, help="timed calls")
    parser.add_argument("--torch_baseline", action="store_true")
    parser.add_argument("--torch_threads", type=int, default=None, help="CPU baseline threads")
    parser.add_argument(
        "--compile_only", action="store_true", help="memory analysis only: allocate, run nothing"
    )
    parser.add_argument(
        "--lora_rank", type=int, default=0, help="> 0: train LoRA adapters on a frozen base"
    )
    parser.add_argument(
        "--updates",
        type=int,
        default=1,
        help="optimizer updates per batch, one per mini-batch (TrainConfig.prompts_per_update); "
        "--micro_batches then counts per update",
    )
    parser.add_argument(
        "--top_entropy_quantile",
        type=float,
        default=1.0,
        help="< 1: only the top tokens by entropy learn (one more forward pass per update)",
    )
    parser.add_argument(
        "--min_completion_len",
        type=int,
        default=None,
        help="completion lengths drawn uniformly from [this, --completion_len]; default: all full",
    )
    parser.add_argument(
        "--group_length_spread",
        type=float,
        default=None,
        help="with --min_completion_len: one length L drawn per group of --shared_prompts rows, "
        "theirs within L x [1 - this, 1 + this]; default: each row's drawn alone",
    )
    parser.add_argument(
        "--width_buckets",
        type=int,
        default=1,
        help="> 1: length-sorted micro-batches, each at the narrowest of this many widths "
        "(TrainConfig.micro_batch_width_buckets)",
    )
    parser.add_argument(
        "--shared_prompts",
        type=int,
        default=1,
        help="G > 1: rows in groups of G share a prompt, run once per group "
        "(TrainConfig.shared_prompt_forward); micro-batches hold whole groups",
    )
    parser.add_argument(
        "--kept_ids",
        type=int,
        default=0,
        help="K > 0: each token's log-prob over K kept ids, the sampled one among them "
        "(make_sampling.keep_sampling_mask with top_k = K)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--gpu_target",
        choices=sorted(gpu_target.TARGETS),
        help="--compile_only for this GPU, on any machine (bench/gpu_target.py)",
    )
    target.add_argument(
        "--tpu_target",
        choices=sorted(tpu_target.TARGETS),
        help="--compile_only for this TPU slice, fsdp over its chips (bench/tpu_target.py)",
    )
    parser.add_argument(
        "--tpu_mesh",
        default="1,-1,1",
        help="dp,fsdp,tp of the --tpu_target mesh (-1: the remaining chips)",
    )
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters}, {args.warmup}")
    if min(args.micro_batches, args.updates) < 1 or args.batch % (
        args.micro_batches * args.updates
    ):
        parser.error(
            f"--updates={args.updates} x --micro_batches={args.micro_batches} does not divide "
            f"--batch={args.batch}"
        )
    if args.torch_baseline and args.updates > 1:
        parser.error("--torch_baseline times one update per batch: leave --updates at 1")
    if args.torch_baseline and args.min_completion_len is not None:
        parser.error("--torch_baseline runs every slot: leave out --min_completion_len")
    if args.min_completion_len is not None and not 1 <= args.min_completion_len <= (
        args.completion_len
    ):
        parser.error(f"--min_completion_len must be in [1, --completion_len={args.completion_len}]")
    if args.width_buckets < 1:
        parser.error(f"--width_buckets must be >= 1, got {args.width_buckets}")
    if args.group_length_spread is not None and (
        args.min_completion_len is None or not 0 <= args.group_length_spread <= 1
    ):
        parser.error("--group_length_spread: a value in [0, 1], with --min_completion_len")
    if args.shared_prompts < 1 or args.batch % (
        args.micro_batches * args.updates * args.shared_prompts
    ):
        parser.error(
            f"--shared_prompts={args.shared_prompts} must split every micro-batch of --batch="
            f"{args.batch} into whole groups"
        )
    if args.shared_prompts > 1 and args.torch_baseline:
        parser.error("--shared_prompts: leave out --torch_baseline (it runs every prompt)")
    if args.lora_rank and args.tpu_target:
        parser.error("--lora_rank is sized with --gpu_target or on this machine, not --tpu_target")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    return common.with_lora(common.model_config(args), args.lora_rank)


def loss_config(args: argparse.Namespace) -> update.LossConfig:
    return update.LossConfig(
        beta=args.beta,
        logprob_chunk=args.logprob_chunk,
        top_entropy_quantile=args.top_entropy_quantile,
    )


def _update_fn(config: ModelConfig, tx, loss: update.LossConfig, args: argparse.Namespace):
    return update.make_update_fn(
        model=config,
        tx=tx,
        loss=loss,
        num_micro_batches=args.micro_batches,
        width_buckets=args.width_buckets,
        updates_per_batch=args.updates,
        group_size=args.shared_prompts,
        prompt_group=args.shared_prompts,
    )


def reference_logps(config: ModelConfig, loss: update.LossConfig, params, batch: Batch, args):
    """(compile + first call seconds, mean seconds, batch with ref_logps) for beta > 0."""
    micro_batches = args.micro_batches * args.updates  # the trainer's: same micro-batch size
    ref_fn = update.make_reference_logps_fn(
        config,
        loss,
        num_micro_batches=micro_batches,
        width_buckets=args.width_buckets,
        prompt_group=args.shared_prompts,
    )
    first, ref_logps = common.timed(lambda: ref_fn(params, batch))
    seconds = [common.timed(lambda: ref_fn(params, batch))[0] for _ in range(args.iters)]
    return first, sum(seconds) / len(seconds), batch.replace(ref_logps_BxC=ref_logps)


def _header(args: argparse.Namespace, config: ModelConfig) -> dict[str, Any]:
    return {
        "bench": "update",
        "device": f"{jax.devices()[0].platform}:{common.device_kind()}",
        "preset": args.preset,
        "params_m": round(config.num_params / 1e6, 1),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "completion_len": args.completion_len,
        "tokens": args.batch * (args.prompt_len + args.completion_len),
        "micro_batches": args.micro_batches,
        "updates": args.updates,
        "dtype": config.dtype,
        "remat": config.remat,
        "attention": config.attention_impl,
        "optimizer": args.optimizer,
        "mu_dtype": args.mu_dtype,
        "beta": args.beta,
        "lora_rank": args.lora_rank,
        "top_entropy_quantile": args.top_entropy_quantile,
        "min_completion_len": args.min_completion_len,
        "group_length_spread": args.group_length_spread,
        "width_buckets": args.width_buckets,
        "shared_prompts": args.shared_prompts,
        "kept_ids": args.kept_ids,
    }


def compile_only(args: argparse.Namespace) -> dict[str, Any]:
    """XLA's memory analysis of the update at this shape, from abstract inputs: nothing is
    allocated or run, so a 1.5B or 3B shape can be sized on a CPU machine. With --gpu_target,
    XLA's GPU compiler sizes it for that GPU; with --tpu_target, for each chip of that slice."""
    on = gpu_target.device(args.gpu_target) if args.gpu_target else None
    mesh = None
    if args.tpu_target:
        dp, fsdp, tp = (int(n) for n in args.tpu_mesh.split(","))
        mesh = tpu_target.mesh(args.tpu_target, dp=dp, fsdp=fsdp, tp=tp)
    config, loss, tx = model_config(args), loss_config(args), common.make_tx(args)
    params, frozen = common.trainable_and_frozen(
        config, jax.eval_shape(lambda: common.random_params(config))
    )
    host_batch = _host_batch(config, args)
    if loss.beta > 0:
        host_batch = host_batch.replace(ref_logps_BxC=host_batch.old_logps_BxC)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_batch)
    if on is not None:
        params, frozen, batch = gpu_target.abstract((params, frozen, batch), on)
    if mesh is not None:
        params, batch = tpu_target.on_mesh(mesh, config, params, batch)
    state = _abstract_state(params, tx)
    update_fn = _update_fn(config, tx, loss, args)
    header = _header(args, config)
    target = gpu_target.TARGETS.get(args.gpu_target) or tpu_target.TARGETS.get(args.tpu_target)
    if target is not None:
        header["device"] = target.compile_only_label
    lower = lambda: update_fn.lower(state, batch, frozen)
    if mesh is None:
        compile_s, compiled = common.timed(lambda: lower().compile())
    else:
        compile_s, (compiled, refused) = common.timed(lambda: tpu_target.compile_for(mesh, lower))
        if compiled is None:
            return {**header, **refused}
    memory = common.memory_analysis(compiled)
    # The frozen reference params the trainer keeps when beta > 0, sharded like the params, in
    # the compute dtype (`frozen_dtype`); under LoRA the reference is the frozen base, already
    # an argument.
    ref_params_gb = 0.0
    if loss.beta > 0 and frozen is None:
        reference = jax.tree.map(lambda x: x.update(dtype=config.frozen_dtype), params)
        ref_params_gb = sharding.gb_per_device(reference)
    # Live during the update: its arguments, outputs not aliased to donated arguments, its
    # temporaries, and the reference params.
    estimate = common.live_gb(memory)
    model_flops = flops.training_flops(
        config, args.batch, args.prompt_len, args.completion_len, args.shared_prompts
    )
    # The roofline reads every op of the program: with width buckets, every branch's.
    roofline = args.gpu_target and args.width_buckets == 1
    return {
        **header,
        "compile_s": round(compile_s, 2),
        **({"mesh": dict(mesh.shape)} if mesh is not None else {}),  # then GB are per chip
        **{f"compiled_{k}": v for k, v in memory.items()},
        "ref_params_gb": round(ref_params_gb, 3),
        "update_peak_estimate_gb": round(estimate + ref_params_gb, 3),
        "model_gflops_per_token": round(
            model_flops / (args.batch * (args.prompt_len + args.completion_len)) / 1e9, 4
        ),
        **(_roofline(compiled, args.gpu_target, model_flops) if roofline else {}),
        **(tpu_target.fit(args.tpu_target, compiled, estimate + ref_params_gb) if mesh else {}),
        # Per chip and iteration of each loop (micro-batches, then the layers and log-prob chunks
        # of one micro-batch).
        **({"loop_collectives": hlo.collectives_report(compiled.as_text())} if mesh else {}),
    }


def _host_batch(config: ModelConfig, args: argparse.Namespace) -> Batch:
    batch = common.random_batch(
        config,
        args.batch,
        args.prompt_len,
        args.completion_len,
        min_completion_len=args.min_completion_len,
        prompt_group=args.shared_prompts,
        group_length_spread=args.group_length_spread,
    )
    if not args.kept_ids:
        return batch
    tokens = batch.completion_tokens_BxC
    rng = np.random.default_rng(1)
    kept = rng.integers(0, config.vocab_size, (*tokens.shape, args.kept_ids)).astype(np.int32)
    kept[..., 0] = tokens  # the sampled token is always kept
    return batch.replace(kept_ids_BxCxK=kept)


def _abstract_state(params, tx) -> TrainState:
    """The TrainState of abstract `params`: the optimizer state laid out as the trainer's
    (grpo.optim.init_opt_state), scalars replicated."""
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
        rng=jax.eval_shape(lambda: jax.random.key(0)),
    )
    opt_shardings = optim.opt_state_shardings(tx, params)
    if opt_shardings is None:
        return state
    replicated = sharding.replicated(next(iter(jax.tree.leaves(opt_shardings))).mesh)
    return state.replace(
        opt_state=tpu_target.place(state.opt_state, opt_shardings),
        step=tpu_target.place(state.step, replicated),
        rng=tpu_target.place(state.rng, replicated),
    )


def _roofline(compiled, target_name: str, model_flops: float) -> dict[str, Any]:
    """The update's time if every op ran at the GPU's peak (bench/gpu_target.py), and the MFU
    that bound allows: real MFU is lower."""
    target = gpu_target.TARGETS[target_name]
    bound = gpu_target.roofline(compiled.as_text(), target)
    return {
        "roofline_s": round(bound["seconds"], 4),
        "roofline_matmul_s": round(bound["matmul_s"], 4),
        "roofline_other_s": round(bound["other_s"], 4),
        "hlo_tflops": round(bound["flops"] / 1e12, 2),
        "roofline_mfu": round(model_flops / bound["seconds"] / target.bf16_flops_per_s, 3),
        "roofline_top": bound["top"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.compile_only or args.gpu_target or args.tpu_target:
        return compile_only(args)
    config = model_config(args)
    loss = loss_config(args)
    host_batch = _host_batch(config, args)
    lengths = host_batch.completion_mask_BxC.sum(axis=1)
    tokens = int(args.batch * args.prompt_len + lengths.sum())  # valid tokens: the useful work
    # PyTorch first, and its memory released, before JAX initialises (and claims) the device.
    torch_s = torch_forward_backward_s(config, host_batch, args) if args.torch_baseline else None
    tx = common.make_tx(args)
    params, frozen = common.trainable_and_frozen(config, common.random_params(config))
    batch = jax.device_put(host_batch)
    result = _header(args, config)
    if loss.beta > 0:  # the trainer's: a copy in the compute dtype, or the frozen base
        reference = frozen
        if frozen is None:
            reference = jax.tree.map(lambda w: w.astype(config.frozen_dtype), params)
        ref_first, ref_s, batch = reference_logps(config, loss, reference, batch, args)
        result["ref_compile_and_first_s"] = round(ref_first, 2)
        result["ref_logps_s"] = round(ref_s, 4)
        result["ref_tokens_per_s"] = round(tokens / ref_s, 1)
    # The state owns `params` from here on (donated each step); the reference pass is done.
    state = common.train_state(params, tx)
    update_fn = _update_fn(config, tx, loss, args)
    compile_s, compiled = common.timed(lambda: update_fn.lower(state, batch, frozen).compile())
    for _ in range(args.warmup):
        state, _ = jax.block_until_ready(compiled(state, batch, frozen))
    seconds = []
    for i in range(args.iters):
        with common.maybe_trace(args.profile_dir if i == args.iters - 1 else None):
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(compiled(state, batch, frozen))
            seconds.append(time.perf_counter() - start)
    step_s = sum(seconds) / len(seconds)
    model_flops = sum(
        flops.training_flops(config, 1, args.prompt_len, int(n), args.shared_prompts)
        for n in lengths
    )
    peak = common.peak_flops_per_s(args.peak_tflops)
    result.update(
        compile_s=round(compile_s, 2),
        step_s=round(step_s, 4),
        step_s_min=round(min(seconds), 4),
        valid_tokens=tokens,
        update_tokens_per_s=round(tokens / step_s, 1),
        model_gflops_per_token=round(model_flops / tokens / 1e9, 4),
        achieved_tflops=round(model_flops / step_s / 1e12, 4),
        peak_tflops="n/a" if peak is None else peak / 1e12,
        mfu="n/a" if peak is None else round(model_flops / step_s / peak, 4),
        peak_device_gb=common.gb(common.peak_device_bytes()),
        **{f"compiled_{k}": v for k, v in common.memory_analysis(compiled).items()},
        loss=float(metrics["loss"]),
    )
    if torch_s is not None:
        result["torch_step_s"] = round(torch_s, 4)
        result["torch_tokens_per_s"] = round(tokens / torch_s, 1)
        result["jax_over_torch"] = round(torch_s / step_s, 3)
    if args.profile_dir:
        result["top_ops"] = common.top_ops(args.profile_dir, compiled.as_text())
    return result


def torch_forward_backward_s(config: ModelConfig, batch: Batch, args: argparse.Namespace) -> float:
    """Mean seconds of a forward + backward of transformers' model of this shape on `batch`
    (bf16 on GPU, fp32 on CPU); the model is freed before returning."""
    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    hf = config.to_hf()
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device(device):  # random init on the device: seconds, not minutes, at 1.5B
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    model = model.to(dtype=dtype).train()
    if config.remat != "none":
        # transformers >= 5.2x renamed it; the GPU machine's older release has only the old name.
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    seconds = _torch_step_seconds(model, batch, args, device)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return seconds


def _torch_step_seconds(model, batch: Batch, args: argparse.Namespace, device: str) -> float:
    """The policy-gradient surrogate at ratio 1 (-A x log p(completion token)) over logits of
    the completion slots only (`logits_to_keep`), in the JAX update's strided micro-batches."""
    import torch

    prompt = torch.from_numpy(batch.prompt_tokens_BxP).long().to(device)
    targets = torch.from_numpy(batch.completion_tokens_BxC).long().to(device)
    ids = torch.cat([prompt, targets], dim=1)
    advantages = torch.from_numpy(batch.advantages_B).to(device)
    width, micro = targets.shape[1], args.micro_batches

    def step() -> None:
        for m in range(micro):
            rows = slice(m, None, micro)
            logits = model(input_ids=ids[rows], logits_to_keep=width + 1).logits[:, :-1]
            logps = torch.log_softmax(logits.float(), -1).gather(-1, targets[rows, :, None])
            loss = -(logps[..., 0] * advantages[rows, None]).sum() / targets.numel()
            loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(max(args.warmup, 1)):
        step()
    seconds = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return sum(seconds) / len(seconds)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    result = run(parse_args(argv))
    common.print_result(result)
    return result


if __name__ == "__main__":
    main()
