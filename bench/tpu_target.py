"""XLA's TPU compiler on a machine without a TPU: compile for a whole TPU slice, read its memory.

`bench.update --tpu_target=v6e-8` compiles the update for every chip of a v6e-8 slice, sharded
as the trainer shards it (gin/gsm8k.gin's mesh: fsdp over all chips), and prints XLA's per-chip
memory analysis. Mosaic compiles the Pallas kernels (`attention_impl='splash'`) for the chip too,
so this also checks that they lower for a real TPU. Nothing runs: read it for memory and for
what compiles, and time things on a TPU VM (BUILD_NOTES).

Needs the libtpu wheel that matches the installed jaxlib (`make tpu-target-deps` puts it in
`.tpu-plugin/`), no TPU. It stays outside the virtualenv for the reason the CUDA plugin does
(bench/gpu_target.py): installed there, every JAX process would look for a TPU at start.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from grpo import sharding
from grpo.models import transformer
from grpo.models.config import ModelConfig

PLUGIN_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".tpu-plugin"
)


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    description: str
    topology: str  # get_topology_desc's name: generation and chip grid
    hbm_bytes_per_chip: int  # what XLA lets a program allocate on one chip

    @property
    def compile_only_label(self) -> str:
        return f"{self.description} (compile only)"


TARGETS = {
    # 32 GB of HBM per v6e chip, of which XLA reports 31.25 GiB available to a program.
    "v6e-8": TpuTarget("TPU v6e-8", "v6e:2x4", int(31.25 * 2**30)),
}


def mesh(name: str, dp: int = 1, fsdp: int = -1, tp: int = 1) -> Mesh:
    """A (dp, fsdp, tp) mesh of TPU slice `name`'s chips, compile only; by default the trainer's
    (fsdp over every chip, as gin/gsm8k.gin). Call it before anything starts a JAX backend."""
    return sharding.make_mesh(dp=dp, fsdp=fsdp, tp=tp, devices=_devices(name))


def on_mesh(on: Mesh, config: ModelConfig, params: Any, batch: Any) -> tuple[Any, Any]:
    """Abstract params and batch (leading dimension: rows) laid out as the trainer lays them."""
    params = place(params, sharding.tree_shardings(on, transformer.logical_axes(config), params))
    return params, place(batch, jax.tree.map(lambda x: sharding.batch_sharding(on, x.ndim), batch))


def place(tree: Any, shardings: Any) -> Any:
    """Abstract stand-ins of `tree`'s arrays with these shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def compile_for(on: Mesh, lower: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """(`lower().compile()` under the mesh, {}); XLA:TPU refuses a program that cannot fit a
    chip: then (None, {"fits": False, "xla_says": its message}), a result, not an error."""
    try:
        with jax.set_mesh(on):
            return lower().compile(), {}
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return None, {"fits": False, "xla_says": str(err).splitlines()[0][-160:]}


def fit(name: str, compiled: Any, peak_gb: float) -> dict[str, Any]:
    """Whether `peak_gb` fits one chip, and the Pallas kernels Mosaic compiled (splash)."""
    hbm = TARGETS[name].hbm_bytes_per_chip
    return {
        "hbm_gb_per_chip": round(hbm / 1e9, 2),
        "fits": peak_gb * 1e9 <= hbm,
        "mosaic_kernels": compiled.as_text().count("tpu_custom_call"),
    }


def _devices(name: str) -> list[jax.Device]:
    if name not in TARGETS:
        raise ValueError(f"unknown TPU target {name!r}; known: {sorted(TARGETS)}")
    if not os.path.isdir(os.path.join(PLUGIN_DIR, "libtpu")):
        raise SystemExit(f"--tpu_target needs libtpu in {PLUGIN_DIR}: make tpu-target-deps")
    # Else libtpu asks the GCE metadata server what it runs on, and logs errors when it can't.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling needs no exclusive hold on a chip: let several processes load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    sys.path.insert(0, PLUGIN_DIR)
    jax.config.update("jax_platforms", "cpu")  # run nothing: there is no TPU
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(TARGETS[name].topology, "tpu").devices)
