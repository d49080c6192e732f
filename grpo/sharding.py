"""The one place that knows about devices: the mesh, logical-axis rules, and pytree shardings.

Core code names logical axes only (`("layers", "embed", "q_heads", "head_dim")`, `("batch", ...)`);
the rules here map them onto the mesh axes `dp`, `fsdp`, `tp`. A dimension that a mesh axis does
not divide is replicated instead (e.g. SmolLM2's 3 KV heads on tp=2), so every shape shards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")

# logical axis -> mesh axis (or tuple of mesh axes); absent means replicated.
PARAM_RULES: Mapping[str, str | tuple[str, ...]] = {
    "vocab": "tp",
    "embed": "fsdp",
    "q_heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "batch": BATCH_AXES,
    # The output projection's vocabulary where logits are computed (the sampler's decode step,
    # the trainer's log-probs): each device computes every row's logits over its vocabulary
    # slice, so no device gathers the whole matrix or sums partial [rows, vocab] logits.
    "unembed_vocab": MESH_AXES,
}


def make_mesh(
    dp: int = 1, fsdp: int = -1, tp: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (dp, fsdp, tp) mesh; one of the sizes may be -1 for "the remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [dp, fsdp, tp]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh (dp={dp}, fsdp={fsdp}, tp={tp}): at most one size may be -1")
    if any(size < 1 and size != -1 for size in sizes):
        raise ValueError(
            f"mesh (dp={dp}, fsdp={fsdp}, tp={tp}): sizes must be >= 1 (or one -1: the rest)"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh (dp={dp}, fsdp={fsdp}, tp={tp}) does not divide {len(devices)} devices"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh (dp={sizes[0]}, fsdp={sizes[1]}, tp={sizes[2]}) needs {math.prod(sizes)} "
            f"devices, have {len(devices)}"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Any] = PARAM_RULES,
) -> PartitionSpec:
    """PartitionSpec for one array; drops a mesh axis that does not divide its dimension or is
    already used by an earlier dimension."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        target = rules.get(name) if name else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree, given its logical axes (tuple leaves) and shapes."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(n, str | None) for n in x)
    return jax.tree.map(
        lambda names, arr: NamedSharding(mesh, logical_to_spec(names, np.shape(arr), mesh)),
        axes_tree,
        shapes_tree,
        is_leaf=is_axes,
    )


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None) -> jax.Array:
    """`x` laid out by its logical axes on `mesh`, else on the context mesh (`jax.set_mesh`); as
    is without either."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gb_per_device(tree: Any) -> float:
    """GB one device holds of a tree of arrays or ShapeDtypeStructs laid out over a mesh: a
    shard of each sharded leaf, all of a replicated one (or one without a sharding)."""
    shard = lambda x: x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return sum(math.prod(shard(x)) * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e9


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over dp x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(mesh: Mesh, local_tree: Any) -> Any:
    """Global arrays, batch dimension over dp x fsdp, from each process's local rows.

    With one process the local rows are the whole batch; with several, process i passes the
    i-th contiguous slice and the global batch is their concatenation.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            batch_sharding(mesh, np.ndim(x)), np.asarray(x)
        ),
        local_tree,
    )


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this."""
    return mesh.shape["dp"] * mesh.shape["fsdp"]
