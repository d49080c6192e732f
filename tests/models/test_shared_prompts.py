"""The shared-prompt forward: each prompt runs once for its group of completions, and gives the
log-probs, entropies and gradients of running it once per completion.

Prompts are left-padded to different lengths (one fills its slots), completions right-padded
(one is empty, one fills its slots), so every mask and position path is exercised.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_utils import all_eqns

from grpo.models import lora
from grpo.models import transformer as tf
from grpo.models.config import LoraConfig
from grpo.models.presets import preset

GROUP, P, C = 4, 6, 5
PROMPT_LENS = np.array([6, 2, 4])
COMPLETION_LENS = np.array([5, 0, 3, 1, 2, 5, 4, 1, 3, 3, 0, 2])


def _inputs(vocab: int):
    rng = np.random.default_rng(0)
    prompt_NxP = rng.integers(1, vocab, (len(PROMPT_LENS), P))
    prompt_valid_NxP = np.arange(P)[None] >= P - PROMPT_LENS[:, None]
    completion_BxC = rng.integers(1, vocab, (len(COMPLETION_LENS), C))
    completion_valid_BxC = np.arange(C)[None] < COMPLETION_LENS[:, None]
    return prompt_NxP, prompt_valid_NxP, completion_BxC, completion_valid_BxC


def _per_completion(params, prompt, prompt_valid, completion, completion_valid, config):
    repeat = functools.partial(np.repeat, repeats=GROUP, axis=0)
    return tf.completion_logprobs(
        params,
        repeat(prompt),
        repeat(prompt_valid),
        completion,
        completion_valid,
        config=config,
        temperature=0.7,
        chunk=2,
    )


def _shared(params, prompt, prompt_valid, completion, completion_valid, config):
    return tf.completion_logprobs(
        params,
        prompt,
        prompt_valid,
        completion,
        completion_valid,
        config=config,
        temperature=0.7,
        chunk=2,
        prompt_group=GROUP,
    )


def _objective(logprobs_fn, inputs, config):
    """A loss that weighs log-probs and entropies differently per slot (padding counts
    nothing), with the log-probs and entropies as its aux."""
    weights = np.linspace(-1.0, 1.0, C)
    valid = inputs[-1]

    def objective(params):
        logps, entropy = logprobs_fn(params, *inputs, config)
        return jnp.sum(jnp.where(valid, weights * logps + 0.3 * entropy, 0.0)), (logps, entropy)

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


@pytest.mark.parametrize(
    "name, remat, lora_rank, attention",
    [
        ("tiny-qwen2", "none", 0, "xla"),
        ("tiny-qwen3", "dots", 0, "xla"),
        ("tiny-llama", "full", 2, "xla"),
        ("tiny-qwen2", "dots", 0, "splash"),  # Pallas' interpreter here; against einsum's
    ],
)
def test_shared_prompts_give_the_per_completion_logprobs_and_gradients(
    name, remat, lora_rank, attention
):
    lora_config = LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank) if lora_rank else None
    config = preset(name, dtype="float32", remat=remat, lora=lora_config, attention_impl=attention)
    params = tf.init_params(config, jax.random.key(0), std=0.1)
    if lora_config is not None:  # adapters with B drawn non-zero, so they change the model
        adapters = lora.init_adapters(
            tf.param_shapes(config)["layers"], lora_config, jax.random.key(1)
        )
        for factors in adapters["layers"]["lora"].values():
            factors["b"] = 0.1 * jax.random.normal(jax.random.key(2), factors["b"].shape)
        base, params = params, adapters
    else:
        base = None
    inputs = _inputs(config.vocab_size)
    valid = inputs[-1]
    fns = [lambda p, *x, fn=fn: fn(lora.attach(base, p), *x) for fn in (_per_completion, _shared)]
    reference = dataclasses.replace(config, attention_impl="xla")
    (_, want), grads_want = _objective(fns[0], inputs, reference)(params)
    (_, got), grads_got = _objective(fns[1], inputs, config)(params)
    for a, b in zip(want, got, strict=True):  # log-probs, entropies
        np.testing.assert_allclose(np.where(valid, b, 0), np.where(valid, a, 0), atol=2e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_want))
    assert scale > 0
    for a, b in zip(jax.tree.leaves(grads_want), jax.tree.leaves(grads_got), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5 * scale)


def test_each_prompt_runs_once():
    # The layer scan's matmuls see N prompt rows and B completion rows, never B prompt rows.
    config = preset("tiny-qwen2", dtype="float32", remat="none")
    params = tf.init_params(config, jax.random.key(0))
    inputs = _inputs(config.vocab_size)
    jaxpr = jax.make_jaxpr(lambda p: _shared(p, *inputs, config))(params)
    rows = {
        (eqn.outvars[0].aval.shape[0], eqn.outvars[0].aval.shape[1])
        for eqn in all_eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.ndim >= 3
    }
    n, b = len(PROMPT_LENS), len(COMPLETION_LENS)
    assert (n, P) in rows and (b, C) in rows
    assert (b, P) not in rows and (b, P + C) not in rows
