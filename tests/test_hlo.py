"""bench/hlo.py: the collectives one iteration of a program's while loop runs, from HLO text."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bench import hlo
from grpo import sharding

# An async all-gather pairs operand and result, a permute adds context scalars, a combined
# all-reduce returns every reduced array; the entry's second loop is XLA's own (no jax op_name).
ASYNC_HLO = """\
%body (p: (s32[], bf16[16,64])) -> (s32[], bf16[16,64]) {
  %ags = (bf16[16,64]{1,0}, bf16[128,64]{1,0}) all-gather-start(%x), dimensions={0}
  %agd = bf16[128,64]{1,0} all-gather-done(%ags)
  %cps = (f32[4]{0}, f32[4]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%y)
  %ars = (f32[128]{0}, bf16[8,2]{1,0}) all-reduce-start(%a, %b), to_apply=%add
}

%other (p: f32[4]) -> f32[4] {
  %ar = f32[1024]{0} all-reduce(%z), to_apply=%add
}

ENTRY %main (a: bf16[16,64]) -> bf16[16,64] {
  %w = (s32[], bf16[16,64]) while(%t), condition=%c, body=%body, metadata={op_name="jit(f)/while"}
  %x = f32[4] while(%u), condition=%cond2, body=%other, metadata={op_name="jit(f)/dot_general"}
}
"""


def test_async_collectives_count_their_results_once():
    (loop,) = hlo.loop_collectives(ASYNC_HLO)
    assert loop["count"] == {"all-gather": 1, "collective-permute": 1, "all-reduce": 1}
    assert loop["bytes"] == 128 * 64 * 2 + 4 * 4 + (128 * 4 + 8 * 2 * 2)


@pytest.mark.eight_devices
def test_a_sharded_loop_gathers_and_reduces_what_it_needs():
    mesh = sharding.make_mesh(fsdp=8)
    replicated = NamedSharding(mesh, PartitionSpec())
    x = jax.device_put(jnp.ones((8, 1024)), NamedSharding(mesh, PartitionSpec("fsdp")))

    def run(x):
        def body(carry):
            i, x, total = carry
            gathered = jax.lax.with_sharding_constraint(jnp.sin(x), replicated)
            return i + 1, x * 2, total + x.sum() + gathered[:, ::2].max()

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x, 0.0))

    (loop,) = hlo.loop_collectives(jax.jit(run).lower(x).compile().as_text())
    assert loop["count"] == {"all-gather": 1, "all-reduce": 1}
    assert loop["bytes"] == 8 * 1024 * 4 + 4  # the gathered array and one reduced scalar


@pytest.mark.eight_devices
def test_a_nested_loop_is_its_own_entry_after_the_loop_that_runs_it():
    mesh = sharding.make_mesh(fsdp=8)
    x = jax.device_put(jnp.ones((8, 256)), NamedSharding(mesh, PartitionSpec("fsdp")))

    def run(x):
        def outer(i, total):
            inner = jax.lax.fori_loop(0, 4, lambda j, t: t + jnp.cos(x * j + i).sum(), 0.0)
            return total + inner + (x * i).max()

        return jax.lax.fori_loop(0, 3, outer, 0.0)

    outer, inner = hlo.loop_collectives(jax.jit(run).lower(x).compile().as_text())
    assert (outer["depth"], inner["depth"]) == (0, 1)
    assert outer["count"] == inner["count"] == {"all-reduce": 1}
    assert outer["bytes"] == inner["bytes"] == 4
