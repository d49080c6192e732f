"""XLA's GPU compiler on a machine without a GPU: compile for an H100 / H200, read what it built.

`bench.rollout --gpu_target=h200` and `bench.update --gpu_target=h200` compile for the named GPU
from abstract inputs and print XLA's memory analysis and, for the rollout, the bytes one decode
step moves according to the optimized HLO. Nothing runs and kernels are not autotuned: read it
for memory and for what XLA fuses and copies, and time things on a real GPU.

Needs only the CUDA PJRT plugin that matches the installed jaxlib (`make gpu-target-deps`
puts it in `.cuda-plugin/`), no CUDA library, driver or device. It stays outside the virtualenv
because JAX starts every installed plugin: on a machine without CUDA each process would try, fail
and print a traceback. `device()` puts it on the path before JAX starts its backends.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import sys
from typing import Any

import jax

from bench import hlo

PLUGIN_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cuda-plugin"
)


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    description: str
    memory_bytes: int
    bandwidth_bytes_per_s: float  # data sheet: HBM bandwidth
    bf16_flops_per_s: float = 989e12  # data sheet: dense bf16 tensor-core peak (SXM)

    @property
    def compile_only_label(self) -> str:
        """How results compiled for this target name their device: nothing ran on it."""
        return f"{self.description} (compile only)"


# Hopper (sm_90, 132 SMs); only memory size and bandwidth differ between the two.
TARGETS = {
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", 84_929_347_584, 3.35e12),
    "h200": GpuTarget("NVIDIA H200", 150_754_820_096, 4.8e12),
}

_HOPPER_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version {{ major: 12 minor: 8 patch: 0 }}
dnn_version_info {{ major: 9 minor: 7 }}
platform_name: "CUDA"
device_description_str: "{description}"
"""


def target_config(name: str) -> str:
    """The GpuTargetConfig text proto XLA compiles against (no device is queried)."""
    target = TARGETS[name]
    return _HOPPER_CONFIG.format(
        bandwidth=int(target.bandwidth_bytes_per_s),
        memory=target.memory_bytes,
        description=target.description,
    )


def device(name: str) -> jax.Device:
    """A compile-only device of GPU `name`. Call it before anything starts a JAX backend."""
    if name not in TARGETS:
        raise ValueError(f"unknown GPU target {name!r}; known: {sorted(TARGETS)}")
    if not os.path.isdir(os.path.join(PLUGIN_DIR, "jax_plugins")):
        raise SystemExit(
            f"--gpu_target needs the CUDA plugin in {PLUGIN_DIR}: make gpu-target-deps"
        )
    sys.path.insert(0, PLUGIN_DIR)
    jax.config.update("jax_platforms", "cpu")  # run nothing on a GPU: there is none
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            "compile_only", "cuda", target_config=target_config(name), topology="1x1x1"
        )
    except NotImplementedError as e:
        raise SystemExit(
            f"--gpu_target: JAX started before the CUDA plugin was on the path ({e})"
        ) from e
    return topology.devices[0]


def abstract(tree: Any, on: jax.Device) -> Any:
    """Shape/dtype stand-ins of every array in `tree`, placed on device `on`."""
    sharding = jax.sharding.SingleDeviceSharding(on)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# --- bytes moved per iteration of a loop, from optimized HLO text ---------------------------

_PARTIAL_READS = {"slice", "dynamic-slice", "gather"}  # read only as much as they output
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def _fusion_bytes(body: list[hlo.Instruction]) -> int:
    """Bytes a fusion reads and writes: a parameter only sliced or gathered from counts what is
    read of it, a buffer updated in place only the update (both possibly through bitcasts)."""
    by_name = {i.name: i for i in body}
    users = collections.defaultdict(list)
    for instruction in body:
        for operand in instruction.operands:
            users[operand].append(instruction)

    def updated_in_place(name: str) -> bool:
        uses = users[name]
        return bool(uses) and all(
            updated_in_place(u.name) if u.op == "bitcast"
            else u.op == "dynamic-update-slice" and u.operands[0] == name
            for u in uses
        )  # fmt: skip

    def partial_reads(name: str) -> list[hlo.Instruction] | None:
        """The slices that read `name` (possibly through bitcasts), or None if anything else
        reads it."""
        reads = []
        for use in users[name]:
            if use.op == "bitcast":
                through = partial_reads(use.name)
                if through is None:
                    return None
                reads += through
            elif use.op in _PARTIAL_READS and use.operands[0] == name:
                reads.append(use)
            else:
                return None
        return reads

    total = 0
    for param in (i for i in body if i.op == "parameter"):
        reads = partial_reads(param.name)
        if reads:
            total += sum(hlo.array_bytes(r.shape) for r in reads)
        elif not updated_in_place(param.name):
            total += hlo.array_bytes(param.shape)
    root = next(i for i in body if i.root)
    outputs = [by_name[o] for o in root.operands] if root.op == "tuple" else [root]
    for out in outputs:
        written = by_name[out.operands[1]] if out.op == "dynamic-update-slice" else out
        total += hlo.array_bytes(written.shape)
    return total


def _dot_flops(body: list[hlo.Instruction]) -> int:
    """2 x output elements x contracted size, summed over the dots of a fused computation."""
    shapes = {i.name: hlo.dims(i.shape) for i in body}
    total = 0
    for dot in (i for i in body if i.op == "dot"):
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.rest).group(1)
        lhs = shapes[dot.operands[0]]
        total += (
            2
            * math.prod(hlo.dims(dot.shape))
            * math.prod(lhs[int(d)] for d in filter(None, contracted.split(",")))
        )
    return total


def _fused_computation(instruction: hlo.Instruction) -> str | None:
    """The name of the computation a fusion instruction runs (None for anything else)."""
    called = re.search(r"calls=%([\w.\-]+)", instruction.rest)
    return called.group(1) if instruction.op == "fusion" and called else None


def _cost(instruction: hlo.Instruction, computations) -> tuple[int, int]:
    """(bytes moved, matmul FLOPs) of one top-level instruction."""
    fused = _fused_computation(instruction)
    if fused:
        body = computations[fused]
        return _fusion_bytes(body), _dot_flops(body)
    return 2 * hlo.array_bytes(instruction.shape), 0


def _label(instruction: hlo.Instruction) -> str:
    """Fusion kind and the jax op it came from, e.g. `gemm_fusion_dot <- dot_general`."""
    source = re.search(r'op_name="[^"]*?([^/"]+)"', instruction.rest)
    kind = re.sub(r"[.\d]+$", "", instruction.name)
    return f"{kind} <- {source.group(1) if source else '?'}"


def _top(per_label: dict[str, float], top: int, unit: str, scale: float) -> list[dict]:
    ranked = sorted(per_label.items(), key=lambda kv: -kv[1])[:top]
    return [{unit: round(value * scale, 1), "what": label} for label, value in ranked]


def _loop_bodies(computations, instructions: list[hlo.Instruction]) -> list[str]:
    """The while loops' bodies among `instructions`, in program order, with those in each branch
    of a conditional (jax's `switch` and `cond`: an indexed `branch_computations` list), branch
    by branch."""
    bodies = []
    for instruction in instructions:
        if instruction.op == "while":
            bodies.append(re.search(r"body=%([\w.\-]+)", instruction.rest).group(1))
        elif instruction.op == "conditional":
            listed = re.search(r"branch_computations=\{([^}]*)\}", instruction.rest).group(1)
            for branch in re.findall(r"%([\w.\-]+)", listed):
                bodies += _loop_bodies(computations, computations[branch])
    return bodies


def loop_traffic(hlo_text: str, top: int = 12) -> dict[str, Any]:
    """Bytes one iteration of each while loop of the entry computation (or of a conditional's
    branch there) reads and writes.

    An estimate from the optimized HLO: each fusion reads its parameters and writes its outputs
    once (slices and in-place updates count only what they touch); other ops read and write
    their result; caches are ignored, so it is the DRAM traffic of an unfused-across-kernels run.
    Returns `per_loop` (bytes, in program order), `kernels_per_loop` (the kernels one iteration
    launches: each op that moves data; at a few microseconds per launch, the floor under a step
    that runs without CUDA graphs) and `top`: the fusions of the last loop that move the most,
    grouped by kind and the jax op they came from.
    """
    computations = hlo.computations(hlo_text)
    bodies = _loop_bodies(computations, computations[hlo.entry_name(hlo_text)])
    if not bodies:
        raise ValueError("no while loop in the entry computation")
    per_loop, kernels_per_loop = [], []
    for body in bodies:
        per_label: dict[str, float] = collections.Counter()
        kernels = [i for i in computations[body] if i.op not in _NO_TRAFFIC]
        for instruction in kernels:
            per_label[_label(instruction)] += _cost(instruction, computations)[0]
        per_loop.append(sum(per_label.values()))
        kernels_per_loop.append(len(kernels))
    return {
        "per_loop": per_loop,
        "kernels_per_loop": kernels_per_loop,
        "top": _top(per_label, top, "mb", 1e-6),
    }


def copied_bytes(hlo_text: str) -> int:
    """Bytes the program's `copy` ops write into buffers of their own, each op once (loops not
    weighed by their trips; a copy inside a fusion only relays a kernel's values, so not those).

    XLA copies a buffer it may not update in place, such as a conditional's operand that another
    branch reads: a copy of a cache-sized array is a second cache at the peak."""
    computations = hlo.computations(hlo_text)
    fused = {_fused_computation(i) for body in computations.values() for i in body}
    return sum(
        hlo.array_bytes(instruction.shape)
        for name, body in computations.items()
        if name not in fused
        for instruction in body
        if instruction.op == "copy"
    )


def roofline(hlo_text: str, target: GpuTarget, top: int = 12) -> dict[str, Any]:
    """A lower bound on a program's GPU time: every op at the device's peak rate.

    Each top-level op of the optimized HLO (loops counted by XLA's known trip count) takes
    max(matmul FLOPs / peak bf16 FLOP/s, bytes moved / bandwidth) with `loop_traffic`'s byte
    count; launches, tails and imperfect kernels are ignored, so real time is longer. Splits the
    bound into matmul fusions and everything else, with the ops that take longest.
    """
    computations = hlo.computations(hlo_text)
    per_label: dict[str, float] = collections.Counter()
    totals = collections.Counter()

    def visit(name: str, repeats: int) -> None:
        for instruction in computations[name]:
            if instruction.op == "while":
                body = re.search(r"body=%([\w.\-]+)", instruction.rest).group(1)
                trips = re.search(r'known_trip_count":\{"n":"(\d+)"', instruction.rest)
                if trips is None:
                    raise ValueError(f"{instruction.name}: no known trip count")
                visit(body, repeats * int(trips.group(1)))
            elif instruction.op not in _NO_TRAFFIC:
                moved, flops = _cost(instruction, computations)
                seconds = max(flops / target.bf16_flops_per_s, moved / target.bandwidth_bytes_per_s)
                per_label[_label(instruction)] += repeats * seconds
                totals["matmul_s" if flops else "other_s"] += repeats * seconds
                totals["flops"] += repeats * flops
                totals["bytes"] += repeats * moved

    visit(hlo.entry_name(hlo_text), 1)
    return {
        "seconds": totals["matmul_s"] + totals["other_s"],
        **{key: totals[key] for key in ("matmul_s", "other_s", "flops", "bytes")},
        "top": _top(per_label, top, "ms", 1e3),
    }
