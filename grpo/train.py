"""The GRPO step loop: rollout -> reward -> advantage -> update, with eval, metrics, checkpoints.

Everything here is plain Python over the pure phases; gin never reaches this module. `train`
takes a fully built `Experiment` (see grpo/configurables.py) and a workdir. The sampling glue
lives in grpo/sampling.py, the eval in grpo/evaluation.py, cross-process gathers in
grpo/gather.py, the eval and export of saved checkpoints in grpo/checkpoint_jobs.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from grpo import evaluation, flops, gather, optim, profiling, sampling, sharding
from grpo.checkpoint import Checkpointer
from grpo.data.gsm8k import PromptStream
from grpo.experiment import (
    SOURCE,
    Experiment,
    TrainConfig,
    check_batch_layout,
    effective_batch_lines,
)
from grpo.metrics import MetricsWriter
from grpo.models import lora, transformer
from grpo.models.config import ModelConfig
from grpo.phases import dynamic_sampling, reward_model
from grpo.phases import reward as reward_phase
from grpo.phases.advantage import decoupled_advantages, group_advantages
from grpo.phases.rollout import cache_gb_per_device, kept_ids_gb_per_device, trim_completions
from grpo.phases.update import (
    initial_entropy_control,
    make_reference_logps_fn,
    make_update_fn,
)
from grpo.types import Batch, Rollout, TrainState

CONFIG_FILE = "config.gin"  # the operative gin config of the run's latest start


@dataclasses.dataclass
class Runtime:
    """The built step functions and the mutable loop state."""

    state: TrainState
    frozen_params: Any  # the base under LoRA adapters (state.params); None: full fine-tuning
    ref_params: Any  # the KL reference (beta > 0), else None
    ref_moves: bool  # ref sync is on: the reference changes and checkpoints keep it
    update_fn: Callable
    ref_logps_fn: Callable | None
    stream: PromptStream
    checkpointer: Checkpointer
    metrics: MetricsWriter
    start_step: int


def place_params(mesh: Mesh, model: ModelConfig, host_params: Any) -> Any:
    """Host params -> global sharded arrays (every process holds the same host copy)."""
    return _place(mesh, transformer.logical_axes(model), host_params, model.param_dtype)


def _place(mesh: Mesh, axes: Any, host_tree: Any, dtype: Any) -> Any:
    """A host pytree -> global arrays of `dtype`, sharded by their logical `axes`."""
    return jax.tree.map(
        lambda x, a: jax.make_array_from_callback(
            a.shape, a.sharding, lambda idx, x=x: np.asarray(x[idx]).astype(a.dtype)
        ),
        host_tree,
        _layout(mesh, axes, host_tree, dtype),
    )


def _layout(mesh: Mesh, axes: Any, shapes_tree: Any, dtype: Any) -> Any:
    """What `_place` makes of a tree of these shapes, as ShapeDtypeStructs: nothing placed."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.dtype(dtype), sharding=s),
        shapes_tree,
        sharding.tree_shardings(mesh, axes, shapes_tree),
    )


def trainable_and_frozen(exp: Experiment, base: Any) -> tuple[Any, Any]:
    """(trainable, frozen) params: the whole model and None, or with `exp.model.lora` fresh
    adapters (fp32, seeded by TrainConfig.seed) and the frozen base."""
    if exp.model.lora is None:
        return base, None
    init, axes = _adapter_init_and_axes(exp)
    host = jax.device_get(jax.jit(init)(jax.random.key(exp.train.seed)))
    return _place(exp.mesh, axes, host, jnp.float32), base


def _adapter_init_and_axes(exp: Experiment) -> tuple[Callable[[jax.Array], Any], Any]:
    """The LoRA adapters' init (key -> adapters) and their logical axes."""
    config = exp.model.lora
    init = functools.partial(
        lora.init_adapters, transformer.param_shapes(exp.model)["layers"], config
    )
    return init, lora.adapter_axes(transformer.logical_axes(exp.model)["layers"], config)


def abstract_trainable(exp: Experiment) -> Any:
    """Shapes, dtypes and shardings of the trainable params (the whole model, or the LoRA
    adapters) as `trainable_and_frozen` lays them out, with nothing placed or initialised:
    what a restore places them onto."""
    if exp.model.lora is None:
        return _abstract_model(exp, exp.model.param_dtype)
    init, axes = _adapter_init_and_axes(exp)
    return _layout(exp.mesh, axes, jax.eval_shape(init, jax.random.key(0)), jnp.float32)


def _abstract_model(exp: Experiment, dtype: Any) -> Any:
    """The model's weights in `dtype`, laid out as `_place` would, as ShapeDtypeStructs."""
    model = exp.model
    return _abstract_weights(
        exp.mesh, transformer.param_shapes(model), transformer.logical_axes(model), dtype
    )


def _abstract_weights(mesh: Mesh, shapes: Any, axes: Any, dtype: Any) -> Any:
    """Weights of these shapes (a tree of shape tuples) in `dtype`, laid out by logical `axes`
    as `_place` would, as ShapeDtypeStructs."""
    structs = jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, dtype),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    return _layout(mesh, axes, structs, dtype)


def held_memory_gb(exp: Experiment) -> dict[str, float]:
    """What each device holds from start to end, in GB, before any activation or KV cache: the
    trainable params and their optimizer state, the frozen base (LoRA), the KL reference, each
    reward model."""
    trainable = abstract_trainable(exp)
    held = {"params": trainable, "optimizer state": optim.abstract_opt_state(exp.tx, trainable)}
    if exp.model.lora is not None:
        held["frozen base"] = _abstract_model(exp, exp.model.param_dtype)
    elif exp.loss.beta > 0:
        held["KL reference"] = _abstract_model(exp, _reference_dtype(exp))
    for name, scorer in exp.reward_models.items():
        config = scorer.config
        held[name.replace("_", " ")] = _abstract_weights(
            exp.mesh,
            reward_model.param_shapes(config),
            reward_model.logical_axes(config),
            config.param_dtype,
        )
    return {name: sharding.gb_per_device(tree) for name, tree in held.items()}


def _device_limit_gb() -> float | None:
    """What JAX may use of a device, in GB: GPUs and TPUs say (on a GPU, the share
    XLA_PYTHON_CLIENT_MEM_FRACTION sets); CPUs do not."""
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    return limit / 1e9 if limit else None


def rollout_cache_gb(exp: Experiment) -> dict[str, float]:
    """The KV cache each device holds in the run's largest rollouts, in GB, on top of
    `held_memory_gb`: the training rollout's (a step's completions) and, with evals, the eval's;
    each row at the widest prompt bucket plus the token budget; with tools, plus the budget
    once more, a lower bound (a round after a call holds the round before's cache, the result
    and the budget)."""
    cfg = exp.train
    budgets = 2 if exp.tools is not None else 1
    slots = max(cfg.prompt_buckets) + budgets * exp.sampling.max_new_tokens
    rows = {"training": cfg.completions_per_step}
    if cfg.eval_every_steps and exp.test_examples:
        rows["eval"] = evaluation.rollout_rows(exp)
    return {
        name: cache_gb_per_device(exp.model, count, slots, exp.mesh) for name, count in rows.items()
    }


def held_memory_line(exp: Experiment) -> str:
    """`held_memory_gb` and `rollout_cache_gb` as a log line, beside the device's memory where
    it says."""
    gb = held_memory_gb(exp)
    line = f"held per device (GB): {_gb_parts(gb)}; {sum(gb.values()):.3g} in all"
    if (limit := _device_limit_gb()) is not None:
        line += f" of the {limit:.1f} JAX may use on a device"
    caches = ", ".join(f"{size:.3g} {name}" for name, size in rollout_cache_gb(exp).items())
    line += f"; a rollout's KV cache adds {caches}"
    if exp.sampling.keep_sampling_mask:
        rows = exp.train.completions_per_step
        line += (
            f", its kept sampling ids {kept_ids_gb_per_device(exp.sampling, rows, exp.mesh):.3g}"
        )
    return line + "; activations come on top"


def check_state_fits(exp: Experiment) -> None:
    """ValueError when the state a training run holds throughout (`held_memory_gb`), or that
    and its largest rollout's KV cache (`rollout_cache_gb`), is more than a device's memory:
    found before the weights are read, not as an out-of-memory error at the first step."""
    limit, gb = _device_limit_gb(), held_memory_gb(exp)
    if limit is None:
        return
    state = sum(gb.values())
    if state > limit:
        raise ValueError(
            f"the run's state needs {state:.3g} GB per device before any activation "
            f"({_gb_parts(gb)}), more than the {limit:.3g} GB JAX may use on one; shrink it with "
            "LoRA (make_model.lora_rank), make_optimizer.mu_dtype='bfloat16', or more devices "
            "to shard it over (make_mesh.fsdp)"
        )
    name, cache = max(rollout_cache_gb(exp).items(), key=lambda item: item[1])
    if state + cache > limit:
        raise ValueError(
            f"the {name} rollout's KV cache ({cache:.3g} GB per device) and the run's state "
            f"({state:.3g} GB) need more than the {limit:.3g} GB JAX may use on a device; "
            "shrink the rollout (TrainConfig.prompts_per_step, num_generations, "
            "eval_prompts_per_batch, prompt_buckets; make_sampling.max_new_tokens) or spread "
            "its rows over more devices (make_mesh.dp, fsdp)"
        )


def _gb_parts(gb: dict[str, float]) -> str:
    return ", ".join(f"{name} {size:.3g}" for name, size in gb.items())


def _policy_params(rt: Runtime) -> Any:
    """The params the policy samples and evaluates with (adapters attached under LoRA)."""
    return lora.attach(rt.frozen_params, rt.state.params)


def _onto_mesh(tree: Any, mesh: Mesh) -> Any:
    """Replicates over the mesh every leaf that lives on fewer devices (scalars like the step,
    the key, optimizer counts), so one jit sees every argument on the same devices."""
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda x: x if len(x.sharding.device_set) == mesh.size else _replicate(x, replicated),
        tree,
    )


def _replicate(x: jax.Array, replicated: jax.sharding.Sharding) -> jax.Array:
    """device_put cannot reach other processes' devices; every process holds the same value
    here, so each fills its own devices from its host copy (PRNG keys via their raw data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _replicate(jax.random.key_data(x), replicated)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, replicated, lambda idx: host[idx])


def _starting_state(exp: Experiment) -> tuple[TrainState, Any]:
    """The TrainState a run starts from, on the mesh, and the frozen base (None: full
    fine-tuning)."""
    params, frozen = trainable_and_frozen(exp, place_params(exp.mesh, exp.model, exp.params))
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    logging.info("trainable parameters: %d of %d", count(params), count(params) + count(frozen))
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optim.init_opt_state(exp.tx, params),
        rng=jax.random.key(exp.train.seed),
        entropy_control=initial_entropy_control(exp.loss),
    )
    return _onto_mesh(state, exp.mesh), frozen


def _checkpointer(exp: Experiment, workdir: str) -> Checkpointer:
    cfg = exp.train
    return Checkpointer(
        f"{workdir}/checkpoints",
        save_interval_steps=cfg.checkpoint_every_steps or 10**9,
        max_to_keep=cfg.checkpoints_to_keep,
    )


class _Resumed(NamedTuple):
    state: TrainState
    data: dict | None  # the data item; None: nothing was restored
    steps: int  # GRPO steps done
    ref: Any  # the saved reference when asked for and saved, else the one passed in


def _resume(exp: Experiment, checkpointer: Checkpointer, state: TrainState, ref: Any) -> _Resumed:
    """The newest checkpoint restored onto the layout of `state` (and of `ref`, the reference
    params, unless None); `state`, None, 0 and `ref` when there is none."""
    if checkpointer.latest_step() is None:
        return _Resumed(state, None, 0, ref)
    restored = checkpointer.restore(None, _abstract(state), None if ref is None else _abstract(ref))
    steps = int(restored.state.step) // exp.train.updates_per_step
    return _Resumed(
        restored.state, restored.data, steps, ref if restored.ref is None else restored.ref
    )


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of `tree`'s arrays: what a restore places onto."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _reference_dtype(exp: Experiment) -> str:
    """A full fine-tuning run's KL reference, the starting weights, is held in the forward's
    compute dtype, which gives the same log-probs in half of fp32's memory; in the params' dtype
    when it moves toward the policy (ref sync: it accumulates small steps). (Under LoRA the
    reference is the frozen base itself, no copy.)"""
    return exp.model.param_dtype if exp.train.ref_sync_every_steps else exp.model.frozen_dtype


def _build_runtime(exp: Experiment, workdir: str) -> Runtime:
    cfg = exp.train
    state, frozen = _starting_state(exp)
    place_reward_models(exp)
    stream = PromptStream(
        exp.train_examples,
        batch_size=cfg.prompts_per_step // jax.process_count(),
        seed=cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ref_moves = bool(cfg.ref_sync_every_steps)
    ref_params = None
    if exp.loss.beta > 0 and frozen is not None:
        ref_params = frozen  # under LoRA the frozen base is the reference: no second copy
    elif exp.loss.beta > 0:  # the starting policy, not the resumed one
        axes = transformer.logical_axes(exp.model)
        ref_params = _place(exp.mesh, axes, exp.params, _reference_dtype(exp))
    checkpointer = _checkpointer(exp, workdir)
    # A moving reference resumes as saved (a checkpoint without one: it had not moved yet).
    try:
        resumed = _resume(exp, checkpointer, state, ref_params if ref_moves else None)
    except Exception:
        checkpointer.close()
        raise
    if resumed.data is not None:
        stream.restore(resumed.data["stream"])
        logging.info("resumed from %s at step %d", checkpointer.latest_step(), resumed.steps)
    state, data, start_step = resumed.state, resumed.data, resumed.steps
    return Runtime(
        state=state,
        frozen_params=frozen,
        ref_params=resumed.ref if ref_moves else ref_params,
        ref_moves=ref_moves,
        update_fn=make_update_fn(
            model=exp.model,
            tx=exp.tx,
            loss=exp.loss,
            num_micro_batches=cfg.num_micro_batches,
            width_buckets=cfg.micro_batch_width_buckets,
            updates_per_batch=cfg.updates_per_pass,
            group_size=cfg.num_generations,
            prompt_group=cfg.prompt_group,
            lr_schedule=exp.lr_schedule,
            state_sharding=jax.tree.map(lambda x: x.sharding, state),
        ),
        ref_logps_fn=(
            make_reference_logps_fn(
                exp.model,
                exp.loss,
                num_micro_batches=cfg.num_micro_batches * cfg.updates_per_pass,
                width_buckets=cfg.micro_batch_width_buckets,
                prompt_group=cfg.prompt_group,
            )
            if exp.loss.beta > 0
            else None
        ),
        stream=stream,
        checkpointer=checkpointer,
        metrics=MetricsWriter(
            workdir,
            total_steps=cfg.num_steps,
            is_primary=jax.process_index() == 0,
            # A run without a checkpoint starts over: none of the file's records stay.
            resume_step=start_step if data is not None else -1,
            wandb_project=cfg.wandb_project,
            config=dataclasses.asdict(cfg),
        ),
        start_step=start_step,
    )


def place_reward_models(exp: Experiment) -> None:
    """Reads the reward models' weights onto the mesh, once: they are frozen and never
    checkpointed."""
    for scorer in exp.reward_models.values():
        if scorer.params is None:
            axes = reward_model.logical_axes(scorer.config)
            params = scorer.read_params()
            scorer.params = _place(exp.mesh, axes, params, scorer.config.param_dtype)


def _rollout_metrics(scored: _Scored, group: int) -> dict:
    rewards, lengths = scored.rewards, scored.lengths
    total = gather.all_rows(rewards.total)
    groups = total.reshape(-1, group)
    correct = gather.all_rows(scored.correct).reshape(-1, group) > 0
    metrics = {
        "reward_mean": total.mean(),
        "reward_std": total.std(),
        "frac_reward_zero_std": (groups.std(axis=1) == 0).mean(),
        "completion_length_mean": lengths.mean(),
        "completion_length_max": lengths.max(),
        "truncation_rate": gather.all_rows(scored.rollout.truncated_B).mean(),
        "accuracy": correct.mean(),
        # The groups every completion of which is right (wrong): no gradient from either.
        "solve_all": correct.all(axis=1).mean(),
        "solve_none": (~correct.any(axis=1)).mean(),
    }
    for name, values in rewards.per_function.items():
        metrics[f"reward/{name}"] = gather.all_rows(values).mean()
    for name, count in rewards.failures.items():
        metrics[f"reward_failures/{name}"] = gather.summed(count)
    if SOURCE in scored.examples[0]:
        metrics.update(_per_set_metrics(scored, total, correct.reshape(-1)))
    if scored.tool_calls is not None:
        metrics.update(_tool_metrics(scored.tool_calls, scored.tool_errors))
    return metrics


def _tool_metrics(local_calls: np.ndarray, local_errors: np.ndarray) -> dict[str, float]:
    """Tool calls per completion, the fraction of completions that made one, and the fraction
    of calls that failed (every process's rows)."""
    calls, errors = gather.all_rows(local_calls), gather.all_rows(local_errors)
    return {
        "tool_calls_mean": calls.mean(),
        "tool_call_rate": (calls > 0).mean(),
        "tool_error_rate": errors.sum() / max(calls.sum(), 1),
    }


def _per_set_metrics(scored: _Scored, total: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """reward_mean/<set> and accuracy/<set> over the step's rows from each train set
    (`total`, `correct`: every process's rows)."""
    sets = np.array(gather.all_json([e[SOURCE] for e in scored.examples]))
    metrics = {}
    for name in sorted(set(sets)):
        rows = sets == name
        metrics[f"reward_mean/{name}"] = total[rows].mean()
        metrics[f"accuracy/{name}"] = correct[rows].mean()
    return metrics


@dataclasses.dataclass
class _Scored:
    """Sampled groups and their scores. `rollout` is global; `rewards`, `correct`, `texts` and
    `examples` are this process's rows (its contiguous share of the batch)."""

    rollout: Rollout
    rewards: reward_phase.RewardResult
    correct: np.ndarray  # float32: the reply's answer is right
    texts: list[str]
    examples: list[dict]  # the problem each row answers
    lengths: np.ndarray  # float32: every process's completion lengths, in batch order
    sampled_tokens: int  # completion tokens sampled for the step, every round together
    rounds: int = 1
    tool_calls: np.ndarray | None = None  # int32 per row: the tool calls it made (with tools)
    tool_errors: np.ndarray | None = None  # int32 per row: those that failed


def _rollout_and_score(
    exp: Experiment, rt: Runtime, key: jax.Array, timings: dict[str, float]
) -> _Scored:
    """One round: the next prompts, sampled `num_generations` times each, then scored."""
    cfg = exp.train
    with profiling.Phase("rollout", timings):
        examples = next(rt.stream)
        indices = rt.stream.last_indices
        params = _policy_params(rt)
        sampled = sampling.sample(exp, params, examples, key, exp.sampling, cfg.num_generations)
        rollout = jax.block_until_ready(trim_completions(sampled.rollout, cfg.completion_buckets))
        texts = sampled.texts

    with profiling.Phase("reward", timings):
        local_examples = [e for e in examples for _ in range(cfg.num_generations)]
        rewards = reward_phase.score(
            texts,
            local_examples,
            rewards=exp.rewards,
            timeout_s=cfg.reward_timeout_s,
            # In the update's micro-batch rows; under shared_prompt_forward, whole groups.
            scored=sampling.reward_model_scores(
                exp,
                local_examples,
                texts,
                group=cfg.prompt_group,
                num_micro_batches=cfg.num_micro_batches * cfg.updates_per_pass,
            ),
        )
        local_lengths = gather.local_rows(rollout.lengths_B)
        rewards = reward_phase.add_overlong_penalty(
            rewards, local_lengths, rewards=exp.rewards, max_length=exp.sampling.max_new_tokens
        )
        correct = _answer_checks(cfg, texts, local_examples, rewards)
        if cfg.retire_solved_prompts:
            _retire_solved(rt.stream, indices, correct, cfg.num_generations)
        rewards = reward_phase.add_length_reward(
            rewards, local_lengths, correct, rewards=exp.rewards, group_size=cfg.num_generations
        )
    lengths = gather.all_rows(rollout.lengths_B).astype(np.float32)
    return _Scored(
        rollout,
        rewards,
        correct,
        texts,
        local_examples,
        lengths,
        sampled_tokens=int(lengths.sum()) - _tool_tokens(rollout),
        tool_calls=sampled.tool_calls,
        tool_errors=sampled.tool_errors,
    )


def _tool_tokens(rollout: Rollout) -> int:
    """How many of the rollout's completion tokens the tools wrote (the model sampled the rest)."""
    if rollout.tool_mask_BxC is None:
        return 0
    return gather.summed(gather.local_rows(rollout.tool_mask_BxC).sum())


def _retire_solved(
    stream: PromptStream, indices: list[int], correct: np.ndarray, group: int
) -> None:
    """Retires the prompts (this process's `indices`) whose every completion is `correct`;
    every process retires every process's, so their stream positions stay equal."""
    solved = correct.reshape(len(indices), group).all(axis=1)
    everyone = gather.all_rows(np.where(solved, np.asarray(indices, np.int32), -1))
    stream.retire(everyone[everyone >= 0].tolist())


def _dynamic_sampling(
    exp: Experiment, rt: Runtime, key: jax.Array, timings: dict[str, float]
) -> _Scored:
    """Rounds of `_rollout_and_score` until `prompts_per_step` groups have rewards that differ
    (or `max_sampling_rounds` ran); the step keeps those groups first (grpo.phases.
    dynamic_sampling). Every process gathers every round, so all pick the same groups."""
    cfg = exp.train
    rounds: list[_Scored] = []
    scores: list[dict] = []  # per round: every process's rewards and correctness
    for index in range(cfg.max_sampling_rounds):
        round_key = jax.random.fold_in(key, index) if index else key  # round 0: as without
        scored = _rollout_and_score(exp, rt, round_key, timings)
        rounds.append(scored)
        local_scores = {
            "total": scored.rewards.total,
            "per_function": scored.rewards.per_function,
            "correct": scored.correct,
            "tool_calls": scored.tool_calls,
            "tool_errors": scored.tool_errors,
        }
        scores.append(jax.tree.map(gather.all_rows, local_scores))
        totals = np.concatenate([score["total"] for score in scores])
        informative = dynamic_sampling.informative_groups(totals, cfg.num_generations)
        if informative.sum() >= cfg.prompts_per_step:
            break
    picked = dynamic_sampling.pick_groups(informative, cfg.prompts_per_step)
    rows = dynamic_sampling.group_rows(picked, cfg.num_generations)
    mine = np.array_split(rows, jax.process_count())[jax.process_index()]
    pool = dynamic_sampling.concat_rollouts(
        [jax.tree.map(gather.all_rows, r.rollout) for r in rounds], pad_id=exp.sampling.pad_id
    )
    local = sharding.shard_batch(exp.mesh, jax.tree.map(lambda x: x[mine], pool))
    pool_examples = [e for r in rounds for e in gather.all_json(r.examples)]
    kept = jax.tree.map(lambda *per_round: np.concatenate(per_round)[mine], *scores)
    failures = rounds[0].rewards.failures
    return _Scored(
        rollout=trim_completions(local, cfg.completion_buckets),
        rewards=reward_phase.RewardResult(
            total=kept["total"],
            per_function=kept["per_function"],
            failures={n: sum(r.rewards.failures[n] for r in rounds) for n in failures},
        ),
        correct=kept["correct"],
        texts=sampling.decode(
            exp, pool.completion_tokens_BxC[mine], pool.completion_mask_BxC[mine]
        ),
        examples=[pool_examples[i] for i in mine],
        lengths=pool.lengths_B[rows].astype(np.float32),
        sampled_tokens=sum(r.sampled_tokens for r in rounds),
        rounds=len(rounds),
        tool_calls=kept["tool_calls"],
        tool_errors=kept["tool_errors"],
    )


def run_step(exp: Experiment, rt: Runtime, step: int) -> dict[str, Any]:
    """One GRPO step: rollout, reward, advantage, update. Returns host metrics."""
    cfg = exp.train
    timings: dict[str, float] = {}
    key = jax.random.fold_in(rt.state.rng, step)
    if cfg.max_sampling_rounds == 1:
        scored = _rollout_and_score(exp, rt, key, timings)
    else:
        scored = _dynamic_sampling(exp, rt, key, timings)
    rollout, rewards = scored.rollout, scored.rewards

    with profiling.Phase("advantage", timings):
        advantages = _advantages(exp, rewards)
        batch = Batch.from_rollout(rollout, jax.block_until_ready(advantages))

    if rt.ref_logps_fn is not None:
        with profiling.Phase("reference", timings):
            ref_logps = jax.block_until_ready(rt.ref_logps_fn(rt.ref_params, batch))
            batch = batch.replace(ref_logps_BxC=ref_logps)

    with profiling.Phase("update", timings):
        for _ in range(cfg.num_iterations):
            rt.state, update_metrics = rt.update_fn(rt.state, batch, rt.frozen_params)
        update_metrics = jax.device_get(update_metrics)

    metrics = _rollout_metrics(scored, cfg.num_generations)
    if cfg.max_sampling_rounds > 1:
        metrics["sampling_rounds"] = scored.rounds
    if cfg.retire_solved_prompts:
        metrics["retired_prompts"] = rt.stream.num_retired
    metrics.update({k: float(v) for k, v in update_metrics.items()})
    metrics.update(_throughput(exp, rollout, scored.sampled_tokens, timings))
    metrics.update(device_memory_metrics())
    metrics.update({f"{k}_seconds": v for k, v in timings.items()})
    if cfg.show_completions_every_steps and step % cfg.show_completions_every_steps == 0:
        for text, value in list(zip(scored.texts, rewards.total, strict=True))[:2]:
            logging.info("sample (reward %.2f): %r", value, text[:400])
        rt.metrics.write_completions(step, _completion_records(scored, advantages))
    return metrics


def _advantages(exp: Experiment, rewards: reward_phase.RewardResult) -> jax.Array:
    """The step's advantages, on the mesh: of the reward total, or (normalize_then_sum, GDPO)
    of each term of it, normalised on its own and summed by its weight."""
    cfg = exp.train
    if cfg.reward_aggregation == "sum_then_normalize":
        (rewards_B,) = sharding.shard_batch(exp.mesh, (rewards.total,))
        return group_advantages(
            rewards_B, group_size=cfg.num_generations, scale=cfg.advantage_scale
        )
    weights = exp.rewards.term_weights()
    terms_BxF = np.stack([rewards.per_function[name] for name in weights], axis=1)
    (terms_BxF,) = sharding.shard_batch(exp.mesh, (terms_BxF,))
    weights_F = jnp.asarray(list(weights.values()), jnp.float32)
    return decoupled_advantages(terms_BxF, weights_F, group_size=cfg.num_generations)


def _completion_records(scored: _Scored, advantages_B: jax.Array) -> list[dict]:
    """Every completion of the step with its problem, scores and advantage, in batch order,
    gathered onto every process (for completions.jsonl)."""
    rewards = scored.rewards
    advantages, lengths, truncated = (
        gather.local_rows(x)
        for x in (advantages_B, scored.rollout.lengths_B, scored.rollout.truncated_B)
    )
    local = [
        {
            "question": example["question"],
            "answer": reward_phase.extract_reference_answer(example["answer"]),
            "completion": text,
            "reward": float(rewards.total[i]),
            "rewards": {name: float(values[i]) for name, values in rewards.per_function.items()},
            "correct": bool(scored.correct[i]),
            "advantage": float(advantages[i]),
            "length": int(lengths[i]),
            "truncated": bool(truncated[i]),
            **({"set": example[SOURCE]} if SOURCE in example else {}),
            **({"tool_calls": int(scored.tool_calls[i])} if scored.tool_calls is not None else {}),
        }
        for i, (text, example) in enumerate(zip(scored.texts, scored.examples, strict=True))
    ]
    return gather.all_json(local)


def _throughput(
    exp: Experiment, rollout: Rollout, sampled_tokens: int, timings: dict[str, float]
) -> dict[str, float]:
    """Tokens/s of both phases; MFU of the update (model FLOPs over the devices' bf16 peak)."""
    rows, prompt_len = rollout.prompt_tokens_BxP.shape
    completion_len = rollout.completion_tokens_BxC.shape[1]
    iterations = exp.train.num_iterations
    update_tokens = rows * (prompt_len + completion_len) * iterations
    out = {
        "rollout_tokens_per_s": sampled_tokens / timings["rollout"],
        "update_tokens_per_s": update_tokens / timings["update"],
    }
    peak = flops.peak_flops(jax.devices()[0].device_kind)
    if peak is not None:
        model_flops = flops.training_flops(
            exp.model, rows, prompt_len, completion_len, exp.train.prompt_group
        )
        out["mfu"] = model_flops * iterations / timings["update"] / (peak * jax.device_count())
    return out


def device_memory_metrics() -> dict[str, float]:
    """The most any of this process's devices holds now, and has held since the start, in GB
    (GPUs and TPUs report it; CPUs do not, and get none)."""
    stats = [device.memory_stats() or {} for device in jax.local_devices()]
    out = {}
    for metric, key in (("in_use", "bytes_in_use"), ("peak", "peak_bytes_in_use")):
        held = [s[key] for s in stats if key in s]
        if held:
            out[f"device_memory_{metric}_gb"] = max(held) / 1e9
    return out


def _answer_checks(
    cfg: TrainConfig, texts: list[str], examples: list[dict], rewards: reward_phase.RewardResult
) -> np.ndarray:
    """float32: whether each reply is right. When a scored reward makes the same check (e.g.
    `correctness`), its scores are the answer (a failed call is wrong either way); no second
    pass over the replies."""
    same = reward_phase.ANSWER_CHECK_REWARDS.get(
        (cfg.answer_match, cfg.answer_last_number_fallback)
    )
    if same in rewards.per_function:
        return (rewards.per_function[same] > 0).astype(np.float32)
    return evaluation.check_answers(cfg, texts, examples).astype(np.float32)


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (checkpoint, then exit)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def agreed(self) -> bool:
        """Whether any process got SIGTERM. Processes may see the signal a step apart; all must
        save the same step and stop together, or the ones that go on wait forever for the rest."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class NotFinite(Exception):
    """An update gave a non-finite loss or gradient norm; the app exits without saving it."""


def _stop_if_not_finite(rt: Runtime, step: int, metrics: dict[str, Any]) -> None:
    """Raises NotFinite (after recording the step's metrics) when the update diverged: its
    params must not become a checkpoint that every resume would start from."""
    bad = [name for name in ("loss", "grad_norm") if not np.isfinite(metrics[name])]
    if bad:
        rt.metrics.write(step, metrics)
        rt.checkpointer.wait_until_finished()
        raise NotFinite(
            f"step {step}: non-finite {' and '.join(bad)}; the step was not saved, the last "
            f"checkpoint is step {rt.checkpointer.latest_step()} (lower the learning rate?)"
        )


class OutOfMemory(Exception):
    """A phase ran out of device memory; the message names it and what would shrink it."""


# What shrinks each phase's memory; the rest (the state itself) under `None`.
_SHRINKS = {
    "rollout": "fewer rows per rollout (TrainConfig.prompts_per_step or num_generations), a "
    "shorter make_sampling.max_new_tokens, or make_sampling.shared_prompt_decode (one cache "
    "per prompt)",
    "eval": "a smaller TrainConfig.eval_prompts_per_batch",
    "update": "smaller micro-batches (TrainConfig.completions_per_micro_batch), "
    "make_model.remat='full', make_optimizer.mu_dtype='bfloat16', or LoRA (make_model.lora_rank)",
    "reference": "smaller micro-batches (TrainConfig.completions_per_micro_batch)",
    # Only the reward models' forwards hold device memory in the reward phase.
    "reward": "smaller micro-batches (TrainConfig.completions_per_micro_batch: a reward "
    "model's forward runs in the update's) or make_reward_model.dtype='bfloat16'",
    None: "a smaller state (LoRA, make_optimizer.mu_dtype='bfloat16') or more devices; "
    "--dry_run prints what each device holds",
}


def _out_of_memory(error: Exception, last_checkpoint: int | None) -> OutOfMemory | None:
    """An OutOfMemory for an XLA error that says it ran out of device memory, else None."""
    if not isinstance(error, jax.errors.JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in str(error):
        return None
    phase = profiling.failed_phase(error)
    where = f"in the {phase} phase" if phase else "between phases"
    said = str(error).strip().splitlines()[0][:160]
    saved = "no checkpoint yet" if last_checkpoint is None else f"step {last_checkpoint}"
    return OutOfMemory(
        f"out of device memory {where} ({said}); try {_SHRINKS.get(phase, _SHRINKS[None])}; "
        f"the last checkpoint: {saved}"
    )


class Preempted(Exception):
    """Raised after the SIGTERM checkpoint is on disk; the app exits with 128 + SIGTERM."""


def _save(rt: Runtime, step: int, *, force: bool) -> float:
    ref = rt.ref_params if rt.ref_moves else None
    with profiling.Phase("checkpoint") as timed:
        rt.checkpointer.save(
            step, rt.state, data={"stream": rt.stream.position}, ref=ref, force=force
        )
    return timed.seconds


@functools.partial(jax.jit, donate_argnums=0)
def _moved_reference(ref: Any, policy: Any, alpha: jax.Array) -> Any:
    """alpha * policy + (1 - alpha) * ref, in fp32, cast back to each ref leaf's dtype."""
    return jax.tree.map(
        lambda r, p: (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32)).astype(
            r.dtype
        ),
        ref,
        policy,
    )


def _sync_reference(exp: Experiment, rt: Runtime, step: int) -> None:
    """Moves the KL reference toward the policy on every `ref_sync_every_steps`-th step."""
    every = exp.train.ref_sync_every_steps
    if every and step % every == 0:
        alpha = jnp.float32(exp.train.ref_sync_alpha)
        rt.ref_params = _moved_reference(rt.ref_params, rt.state.params, alpha)


@functools.partial(jax.jit, static_argnums=1)
def _merged(params: Any, model: ModelConfig) -> Any:
    """LoRA adapters folded into the base weights, in the base's dtype."""
    merged = lora.merge(params, model.lora)
    return jax.tree.map(lambda x: x.astype(model.param_dtype), merged)


def export_policy(
    exp: Experiment, params: Any, frozen: Any, export_dir: str, info: dict | None = None
) -> None:
    """Writes the policy (`params`, on the `frozen` base under LoRA) as a Hugging Face folder;
    under LoRA the merged model plus the adapters alone in `adapter/`."""
    from grpo.models.loading import export_hf

    adapters = None
    if frozen is not None:
        adapters = jax.tree.map(gather.all_rows, params)
        params = _merged(lora.attach(frozen, params), exp.model)
    host_params = jax.tree.map(gather.all_rows, params)
    if jax.process_index() == 0:
        export_hf(export_dir, host_params, exp.model, exp.tokenizer, adapters=adapters, info=info)
        logging.info("exported a Hugging Face folder to %s", export_dir)


def _progress(steps: range, total: int):
    """A progress bar on an interactive terminal (process 0); plain log lines otherwise."""
    show = jax.process_index() == 0 and sys.stderr.isatty()
    return tqdm.tqdm(steps, total=total, initial=steps.start - 1, disable=not show, unit="step")


def train(exp: Experiment, workdir: str, config_text: str | None = None) -> dict[str, Any]:
    """Runs the loop from the last checkpoint in `workdir` (or the start) to num_steps.
    `config_text` (the operative gin config) goes to `<workdir>/config.gin` once the state is
    restored: a resume that does not fit the checkpoints leaves the config that wrote them."""
    check_batch_layout(exp)
    for line in [*effective_batch_lines(exp), held_memory_line(exp)]:
        logging.info("%s", line)
    rt = _build_runtime(exp, workdir)
    if config_text is not None and jax.process_index() == 0:
        _write_config(workdir, config_text)
    preemption = _Preemption()
    started = time.perf_counter()
    summary: dict[str, Any] = {"steps": rt.start_step}
    try:
        # The context mesh: kernels run per shard in a shard_map (splash attention) read it.
        with jax.set_mesh(exp.mesh):
            _run_steps(exp, rt, preemption, summary)
        rt.checkpointer.wait_until_finished()
        if exp.train.export_dir:
            export_policy(exp, rt.state.params, rt.frozen_params, exp.train.export_dir)
    except jax.errors.JaxRuntimeError as error:
        rt.checkpointer.wait_until_finished()
        out_of_memory = _out_of_memory(error, rt.checkpointer.latest_step())
        if out_of_memory is None:
            raise
        raise out_of_memory from error
    finally:
        preemption.restore()
        rt.checkpointer.close()
        rt.metrics.close()
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def _write_config(workdir: str, text: str) -> None:
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


class BestExport:
    """`TrainConfig.best_export_dir`: a policy whose `best_export_metric` beats every eval
    offered before it, and the export already there if made at `up_to_step` or before (a
    resumed run's; a later one is of a run this one does not continue), is exported there.
    Process 0 reads that export; every process gets it, so all agree on the next export."""

    def __init__(self, exp: Experiment, up_to_step: float):
        self._exp = exp
        self._best = -np.inf
        cfg = exp.train
        if cfg.best_export_dir and jax.process_index() == 0:
            from grpo.models.loading import EXPORT_INFO

            path = os.path.join(cfg.best_export_dir, EXPORT_INFO)
            if os.path.exists(path):
                with open(path) as f:
                    info = json.load(f)
                if info["step"] <= up_to_step:  # another metric's export counts as none
                    self._best = info.get(cfg.best_export_metric, -np.inf)
        if jax.process_count() > 1:
            self._best = float(multihost_utils.broadcast_one_to_all(np.float32(self._best)))

    def offer(self, step: int, metrics: dict[str, Any], params: Any, frozen: Any) -> None:
        """Exports `params` (on `frozen`), the policy of GRPO step `step`, if its eval
        `metrics` are the best so far (under the context mesh)."""
        cfg = self._exp.train
        if not cfg.best_export_dir or not metrics[cfg.best_export_metric] > self._best:
            return
        self._best = float(metrics[cfg.best_export_metric])
        info = {"step": step, cfg.best_export_metric: self._best}
        export_policy(self._exp, params, frozen, cfg.best_export_dir, info=info)


def _timed_eval(exp: Experiment, rt: Runtime, step: int, summary: dict) -> dict[str, float]:
    """The eval metrics of the current policy and their seconds; records them in `summary`,
    and the greedy replies in eval_completions.jsonl when `write_eval_completions` says so."""
    on_replies = None
    if exp.train.write_eval_completions:
        on_replies = functools.partial(rt.metrics.write_eval_completions, step)
    with profiling.Phase("eval") as timed:
        metrics = evaluation.evaluate(exp, _policy_params(rt), on_replies)
    metrics["eval_seconds"] = timed.seconds
    summary["eval_accuracy"] = metrics["eval_accuracy"]
    return metrics


def _run_steps(exp: Experiment, rt: Runtime, preemption: _Preemption, summary: dict) -> None:
    """Steps from the resumed one to the last: eval, checkpoint and metrics after each; updates
    `summary`; raises Preempted after saving when a SIGTERM was agreed on."""
    cfg = exp.train
    best = BestExport(exp, up_to_step=rt.start_step)
    if cfg.eval_at_start and rt.start_step == 0:
        rt.metrics.write(0, _timed_eval(exp, rt, 0, summary))
    window = profiling.Window(cfg.profile_steps, rt.metrics.tensorboard_dir)
    try:
        for step in _progress(range(rt.start_step + 1, cfg.num_steps + 1), cfg.num_steps):
            with window.step(step):
                _one_step(exp, rt, step, best, summary)
            if step != cfg.num_steps and preemption.agreed():
                _save(rt, step, force=True)  # skipped if the periodic save took this step
                raise Preempted(f"preempted after step {step}; checkpoint saved")
    finally:
        window.stop()


def _one_step(exp: Experiment, rt: Runtime, step: int, best: BestExport, summary: dict) -> None:
    """A step, then its eval (when due), checkpoint and metrics."""
    cfg = exp.train
    tick = time.perf_counter()
    metrics = run_step(exp, rt, step)
    _stop_if_not_finite(rt, step, metrics)
    _sync_reference(exp, rt, step)
    last = step == cfg.num_steps
    if cfg.eval_every_steps and (step % cfg.eval_every_steps == 0 or last):
        metrics.update(_timed_eval(exp, rt, step, summary))
        best.offer(step, metrics, rt.state.params, rt.frozen_params)
    metrics["checkpoint_seconds"] = _save(rt, step, force=last)
    metrics["step_seconds"] = time.perf_counter() - tick
    rt.metrics.write(step, metrics)
    summary.update(steps=step, reward_mean=metrics["reward_mean"])
