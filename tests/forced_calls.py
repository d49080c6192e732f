"""Tool calls from a policy that never writes one: the tiny random model's replies only call a
tool when a test makes them. Shared by the in-process tool tests and the multi-process runs
(`tests/test_multihost.py` installs it in each `grpo.main` subprocess)."""

from collections.abc import Callable, Sequence

import jax
import numpy as np

from grpo import gather, sharding


def first_rounds_call(generate: Callable, call_ids: Sequence[int]) -> Callable:
    """`generate` whose first sampling round of every rollout (the one without `budget_B`)
    writes `call_ids` in every row and stops there, with log-prob -1 per token; the tool rounds
    after it are `generate`'s own. Each process rewrites its own rows of the global rollout."""
    ids = np.asarray(call_ids, np.int32)

    def calling(params, tokens, mask, key, **kwargs):
        rollout = generate(params, tokens, mask, key, **kwargs)
        if kwargs.get("budget_B") is not None:
            return rollout
        local = jax.tree.map(lambda x: np.array(gather.local_rows(x)), rollout)
        width = local.completion_tokens_BxC.shape[1]
        local.completion_tokens_BxC[:] = kwargs["sampling"].pad_id
        local.completion_tokens_BxC[:, : len(ids)] = ids
        local.completion_mask_BxC[:] = np.arange(width) < len(ids)
        local.logps_BxC[:] = np.where(local.completion_mask_BxC, -1.0, 0.0)
        local.lengths_B[:] = len(ids)
        local.truncated_B[:] = False
        return sharding.shard_batch(kwargs["mesh"], local)

    return calling
