"""Tool calls from a policy that never writes one: the tiny random model's replies only call a
tool when a test makes them. Shared by the in-process tool tests and the multi-process runs
(`tests/test_multihost.py` installs it in each `grpo.main` subprocess)."""

from collections.abc import Callable, Sequence

import jax
import numpy as np

from grpo import gather, sharding
from grpo.phases.rollout import pad_prompts


def first_rounds_call(generate_in_rounds: Callable, call_ids: Sequence[int]) -> Callable:
    """`generate_in_rounds` whose first round of every rollout (the one without a context)
    writes `call_ids` in every row and stops there, with log-prob -1 per token; the rounds
    after it are `generate_in_rounds`' own. The context it returns holds the prompt and the
    call, as if the policy had sampled it. Each process writes its own rows."""
    ids = np.asarray(call_ids, np.int32)

    def calling(params, tokens, mask, key, *, mesh, context=None, **kwargs):
        if context is not None:
            return generate_in_rounds(
                params, tokens, mask, key, mesh=mesh, context=context, **kwargs
            )
        rows = np.shape(tokens)[0] * kwargs["num_samples"]
        nothing = sharding.shard_batch(mesh, np.zeros(rows // jax.process_count(), np.int32))
        kwargs.pop("budget_B", None)
        prompts, context = generate_in_rounds(
            params, tokens, mask, key, mesh=mesh, budget_B=nothing, **kwargs
        )
        # The prompt's last token (out of its context), then the call, read as a round's input.
        last = gather.local_rows(prompts.prompt_tokens_BxP)[:, -1]
        window = pad_prompts(
            [[int(t), *ids] for t in last], pad_id=kwargs["sampling"].pad_id, buckets=[len(ids) + 1]
        )
        _, context = generate_in_rounds(
            params,
            *sharding.shard_batch(mesh, window),
            key,
            mesh=mesh,
            budget_B=nothing,
            context=context,
            **{**kwargs, "num_samples": 1},
        )
        local = jax.tree.map(lambda x: np.array(gather.local_rows(x)), prompts)
        width = local.completion_tokens_BxC.shape[1]
        local.completion_tokens_BxC[:] = kwargs["sampling"].pad_id
        local.completion_tokens_BxC[:, : len(ids)] = ids
        local.completion_mask_BxC[:] = np.arange(width) < len(ids)
        local.logps_BxC[:] = np.where(local.completion_mask_BxC, -1.0, 0.0)
        local.lengths_B[:] = len(ids)
        local.truncated_B[:] = False
        return sharding.shard_batch(mesh, local), context

    return calling
