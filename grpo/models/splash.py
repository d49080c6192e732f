"""Causal attention with the Pallas splash-attention kernel (TPU): the trainer's forward.

The trainer's full-sequence forward attends causally among real tokens: slot i sees slot j iff
j <= i and both hold real tokens. Splash expresses that as its static causal mask and-ed with
segment ids (real tokens 1, padding 0), so it never materialises the T x S scores. Padding rows
attend to earlier padding (or themselves) instead of nothing; their outputs are never used, and
no real token attends to them. The queries may be the last T of the S key slots (the shared-
prompt forward: a completion's keys are its prompt's, then its own): the causal mask is then
offset by S - T.

Under a mesh (`jax.set_mesh`, as `grpo.train` sets), the kernel runs per shard in a `shard_map`
over the batch axes and, where both head counts divide it, the tensor-parallel axis: a Mosaic
kernel cannot be partitioned by XLA. Off TPU the kernel runs in Pallas' interpreter (CPU tests),
and GPUs are refused: cuDNN's fused attention (`attention_impl='cudnn'`) is the kernel there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from grpo import sharding

_LANE = 128  # TPU tile width: sequence blocks are multiples of it
_BLOCKS = (512, 256, 128)  # largest that divides: bigger tiles mean fewer grid steps
# Every tile size of the forward and the two backward (dq, dkv) kernels; all set to one block.
_TILES = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv")
_TILES += ("block_kv_dkv_compute", "block_q_dq", "block_kv_dq")


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS) -> jax.Array:
    """Causal attention among the valid slots of each row, the T queries being the last T of
    the S key slots (T = S: self-attention); returns B x T x N x H (q's dtype)."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = target_platform()
    if platform == "gpu":
        raise ValueError("attention_impl='splash' is a TPU kernel; on a GPU use 'cudnn'")
    interpret = platform != "tpu"
    if mesh.empty:
        return _local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, interpret=interpret)
    q_spec, kv_spec, valid_spec = _specs(q_BxTxNxH.shape, k_BxSxKxH.shape[2], mesh)
    local = jax.shard_map(
        lambda q, k, v, valid: _local(q, k, v, valid, interpret=interpret),
        in_specs=(q_spec, kv_spec, kv_spec, valid_spec),
        out_specs=q_spec,
        check_vma=False,  # pallas_call outputs carry no varying-axes annotation
    )
    return local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS)


def target_platform() -> str:
    """The platform being compiled for: the context mesh's devices, else the default backend
    (a compile for a TPU slice runs on a CPU, with a mesh of the slice's chips)."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def _specs(q_shape, kv_heads: int, mesh) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """Batch over the batch axes; heads over tp only if q and kv heads both divide it, so each
    shard keeps whole query groups with their kv head."""
    batch_size, _, heads, _ = q_shape
    (batch_axes,) = sharding.logical_to_spec(("batch",), (batch_size,), mesh)
    (q_heads,) = sharding.logical_to_spec(("q_heads",), (heads,), mesh)
    (kv_heads_axis,) = sharding.logical_to_spec(("kv_heads",), (kv_heads,), mesh)
    head_axis = q_heads if q_heads == kv_heads_axis else None
    return (
        PartitionSpec(batch_axes, None, head_axis, None),
        PartitionSpec(batch_axes, None, head_axis, None),
        PartitionSpec(batch_axes, None),
    )


def _local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, valid_BxS, *, interpret: bool) -> jax.Array:
    _, t, heads, head_dim = q_BxTxNxH.shape
    s = k_BxSxKxH.shape[1]
    lanes = lambda n: -(-n // _LANE) * _LANE
    padded_q, padded_kv = lanes(t), lanes(s)
    block = next(b for b in _BLOCKS if padded_q % b == 0 and padded_kv % b == 0)
    # Query i is key slot i + s - t. A padding query past t sees key slot i + s - t >= s, itself
    # padding in its segment, so no row is empty.
    causal = masks.CausalMask((padded_q, padded_kv), offset=s - t)
    kernel = kernels.make_splash_mha(
        masks.MultiHeadMask([causal] * heads),
        block_sizes=kernels.BlockSizes(**dict.fromkeys(_TILES, block)),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    def heads_major(x_BxLxNxH, padded):  # the kernel takes N x L x H per row
        x = jnp.pad(x_BxLxNxH, ((0, 0), (0, padded - x_BxLxNxH.shape[1]), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)

    segments = lambda valid, padded: jnp.pad(valid, ((0, 0), (0, padded - valid.shape[1])))
    q_segments_BxT = segments(valid_BxS[:, s - t :], padded_q).astype(jnp.int32)
    kv_segments_BxS = segments(valid_BxS, padded_kv).astype(jnp.int32)
    q = heads_major(q_BxTxNxH * (1 / math.sqrt(head_dim)), padded_q)  # splash does not scale
    out_BxNxTxH = jax.vmap(
        lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=kernels.SegmentIds(q=sq, kv=skv))
    )(
        q,
        heads_major(k_BxSxKxH, padded_kv),
        heads_major(v_BxSxKxH, padded_kv),
        q_segments_BxT,
        kv_segments_BxS,
    )
    return jnp.swapaxes(out_BxNxTxH, 1, 2)[:, :t]
