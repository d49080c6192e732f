"""bf16 training runs every backward matmul in bf16, while logits and attention scores stay fp32.

A bf16 x bf16 product is widened to fp32 in two places, each with a backward that rounds the
cotangent to bf16 first: `einsum_f32_out` (the unembedding) and the einsum attention's written
backward (models/softmax_attention.py, the scores). Plain autodiff would multiply the fp32
cotangent with the bf16 inputs: fp32 matmuls, the slow path on a GPU. These tests pin the jaxpr
(no dot with an fp32 operand in a bf16 backward) and the values (fp32: same as plain autodiff;
bf16: close to it).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxpr_utils import all_eqns

from grpo.models import transformer as tf
from grpo.models.presets import preset

SPEC = "btd,dv->btv"


def _plain(a, b):
    return jnp.einsum(SPEC, a, b, preferred_element_type=jnp.float32)


def _inputs(dtype):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(2, 5, 16)), dtype)
    b = jnp.asarray(rng.normal(size=(16, 24)), dtype)
    g = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)
    return a, b, g


def _vjp(fn, a, b, g):
    out, vjp = jax.vjp(fn, a, b)
    return out, vjp(g)


def _dot_operand_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """Operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
    return [
        tuple(str(v.aval.dtype) for v in eqn.invars)
        for eqn in all_eqns(jaxpr)
        if eqn.primitive.name == "dot_general"
    ]


def test_fp32_inputs_give_exactly_plain_autodiff():
    a, b, g = _inputs(jnp.float32)
    out, grads = _vjp(lambda x, y: tf.einsum_f32_out(SPEC, x, y), a, b, g)
    want_out, want_grads = _vjp(_plain, a, b, g)
    np.testing.assert_array_equal(out, want_out)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_array_equal(got, want)


def test_bf16_inputs_give_bf16_gradients_close_to_plain_autodiff():
    a, b, g = _inputs(jnp.bfloat16)
    out, grads = _vjp(lambda x, y: tf.einsum_f32_out(SPEC, x, y), a, b, g)
    want_out, want_grads = _vjp(_plain, a, b, g)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, want_out)
    for got, want in zip(grads, want_grads, strict=True):
        assert got.dtype == jnp.bfloat16
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02 * abs(want).max())


def test_bf16_model_backward_has_no_fp32_matmul():
    # Our own attention ("xla"); jax.nn.dot_product_attention's XLA path is jax's to fix.
    config = dataclasses.replace(preset("tiny-qwen2"), dtype="bfloat16", attention_impl="xla")
    params = tf.init_params(config, jax.random.key(0, impl="rbg"))
    tokens = jnp.ones((2, 8), jnp.int32)
    valid = jnp.ones((2, 8), bool)

    def loss(p):
        logps, _ = tf.completion_logprobs(p, tokens, valid, tokens, valid, config=config)
        return logps.sum()

    operand_dtypes = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert len(operand_dtypes) > 20  # the walk reached the scanned layers and the chunks
    assert [d for d in operand_dtypes if "float32" in d] == []
