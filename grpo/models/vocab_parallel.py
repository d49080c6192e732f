"""Log-probs and entropies over an output projection split across devices by vocabulary.

The trainer's log-prob chunks (`transformer.token_logprobs`) on a mesh: each device computes the
logits of its vocabulary slice for every row of the chunk, and the softmax statistics travel as
one value per row (max, sum of exponentials, the target's logit, the entropy's partial sum;
models/log_softmax.py).
Written with `shard_map` rather than left to XLA's partitioner, which, given only the layout,
still gathers the whole (D, V) matrix in the backward on some backends (BUILD_NOTES). In the
backward each device's projection gradient stays local; the hidden states' gradient is summed
over the vocabulary slices and scattered back to the rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from grpo import sharding
from grpo.models import log_softmax


def vocab_axes(vocab_size: int) -> str | tuple[str, ...] | None:
    """The context mesh's axes that split the vocabulary, or None (no mesh, or they don't)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    (axes,) = sharding.logical_to_spec(("unembed_vocab",), (vocab_size,), mesh)
    return axes


def logprobs_and_entropy(
    h_BxCxD: jax.Array,
    y_BxC: jax.Array,
    unembed_DxV: jax.Array,
    logits: Callable[[jax.Array, jax.Array], jax.Array],
    kept_BxCxK: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """log p(y) and the entropy of softmax(logits(h, unembed)), fp32, on the context mesh,
    which must split the vocabulary (`vocab_axes` not None); over each position's kept ids
    alone when K > 0 (`log_softmax.keep_only`). `logits(h, unembed_slice)` gives the fp32 logits
    of rows h over a slice of the projection's columns."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = vocab_axes(unembed_DxV.shape[1])
    (rows,) = sharding.logical_to_spec(("batch",), (h_BxCxD.shape[0],), mesh)
    if kept_BxCxK is None:  # the whole vocabulary
        kept_BxCxK = jnp.zeros((*y_BxC.shape, 0), jnp.int32)
    local = functools.partial(_local, axes=axes, rows=rows, logits=logits)
    return jax.shard_map(
        local,
        in_specs=(
            PartitionSpec(rows, None, None),
            PartitionSpec(rows, None),
            PartitionSpec(None, axes),
            PartitionSpec(rows, None, None),
        ),
        out_specs=(PartitionSpec(rows, None), PartitionSpec(rows, None)),
    )(h_BxCxD, y_BxC, unembed_DxV, kept_BxCxK)


def _local(h_BxCxD, y_BxC, unembed_DxV, kept_BxCxK, *, axes, rows, logits):
    """One device: every row of the chunk against this device's vocabulary slice."""
    if rows is not None:  # all rows here; the transpose scatters their gradient back
        h_BxCxD, y_BxC, kept_BxCxK = (
            jax.lax.all_gather(x, rows, axis=0, tiled=True) for x in (h_BxCxD, y_BxC, kept_BxCxK)
        )
    z = logits(h_BxCxD, unembed_DxV)  # [B, C, V / devices]
    first_id = jax.lax.axis_index(axes) * z.shape[-1]
    z = log_softmax.keep_only(z, kept_BxCxK, first_id)
    in_slice = y_BxC - first_id
    logp, entropy = log_softmax.target_logprob_and_entropy(z, in_slice, axes)
    if rows is None:
        return logp, entropy
    local_rows = logp.shape[0] // jax.lax.psum(1, rows)
    start = jax.lax.axis_index(rows) * local_rows
    take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=local_rows)
    return take(logp), take(entropy)
