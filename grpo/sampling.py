"""Host glue around the rollout phase: examples -> chat-template prompts -> tokens on the mesh
-> `generate` -> decoded replies. Shared by the training step and the eval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from grpo import gather, sharding
from grpo.data.prompts import encode_prompts
from grpo.experiment import Experiment, TrainConfig
from grpo.phases.rollout import SamplingConfig, generate, pad_prompts
from grpo.types import Rollout


def encode_questions(cfg: TrainConfig, tokenizer: Any, examples: Sequence[dict]) -> list[list[int]]:
    """The prompt token ids of each example's question, as the run's prompt settings say."""
    return encode_prompts(
        tokenizer,
        [e["question"] for e in examples],
        system_prompt=cfg.system_prompt,
        template_kwargs=cfg.chat_template_kwargs,
        question_template=cfg.question_template,
        chat_template=cfg.use_chat_template,
    )


def prompts_for(
    exp: Experiment, examples: Sequence[dict], repeat: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenised, left-padded prompts, each repeated `repeat` times; bucket agreed by processes."""
    ids = [p for p in encode_questions(exp.train, exp.tokenizer, examples) for _ in range(repeat)]
    longest = int(gather.all_rows(np.array([max(len(p) for p in ids)])).max())
    fits = [b for b in exp.train.prompt_buckets if b >= longest]
    if not fits:  # build_experiment drops the examples whose prompt is longer
        raise ValueError(f"a prompt of {longest} tokens exceeds every prompt bucket")
    return pad_prompts(ids, pad_id=exp.sampling.pad_id, buckets=fits[:1])


def decode(exp: Experiment, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Each row's tokens where `mask` holds, as text (special tokens dropped)."""
    return [
        exp.tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
        for row, m in zip(tokens, mask, strict=True)
    ]


def sample(
    exp: Experiment,
    params: Any,
    examples: Sequence[dict],
    key: jax.Array,
    sampler: SamplingConfig,
    samples: int,
) -> tuple[Rollout, list[str]]:
    """Rollout of `samples` completions per example under `sampler` (rows group-contiguous);
    returns the global Rollout and this process's texts.

    Each prompt is prefilled once and its cache shared by its samples when the global prompt
    count divides over the batch axes; otherwise the prompts are repeated here, one row each.
    """
    prefill_once = len(examples) * jax.process_count() % sharding.batch_divisor(exp.mesh) == 0
    repeat = 1 if prefill_once else samples
    tokens, mask = prompts_for(exp, examples, repeat)
    prompt_tokens, prompt_mask = sharding.shard_batch(exp.mesh, (tokens, mask))
    rollout = generate(
        params,
        prompt_tokens,
        prompt_mask,
        key,
        model=exp.model,
        sampling=sampler,
        num_samples=samples // repeat,
        mesh=exp.mesh,
    )
    texts = decode(
        exp,
        gather.local_rows(rollout.completion_tokens_BxC),
        gather.local_rows(rollout.completion_mask_BxC),
    )
    return rollout, texts
