"""LoRA adapters: shapes, PEFT's initialisation, the merged forward against numpy, gradients by
the chain rule, no weight-sized remat residuals, sampler == trainer, and PEFT loading our export.
"""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from grpo.models import loading, lora, presets
from grpo.models import transformer as tf
from grpo.models.config import LORA_TARGETS, LoraConfig
from grpo.phases import rollout as ro

LORA = LoraConfig(rank=3, alpha=6.0)
SCALE = 2.0  # alpha / rank, by hand: a wrong scale moves every check below
CONFIG = presets.preset("tiny-qwen2", dtype="float32", remat="dots", lora=LORA)
TOKENS = np.array([[0, 0, 5, 17, 3, 9], [4, 8, 15, 16, 23, 42]], np.int32)
VALID = TOKENS > 0


def _base():
    return tf.init_params(CONFIG, jax.random.key(0), std=0.3)


def _adapters(seed=1, b_std=0.3, config=CONFIG):
    """Fresh adapters with B drawn non-zero, so that they change the model."""
    adapters = lora.init_adapters(tf.param_shapes(config)["layers"], LORA, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(LORA.targets)))
    for factors in adapters["layers"]["lora"].values():
        factors["b"] = b_std * jax.random.normal(next(keys), factors["b"].shape)
    return adapters


def _forward(params):
    tokens, valid = jnp.asarray(TOKENS), jnp.asarray(VALID)
    hidden, _ = tf.forward(params, tokens, tf.positions_from_mask(valid), valid, config=CONFIG)
    return hidden


_hidden = jax.jit(_forward)


def _numpy_merged(base, adapters):
    """W + (alpha / rank) A B for every target, in numpy, stacked over layers."""
    layers = dict(base["layers"])
    for target, factors in adapters["layers"]["lora"].items():
        a, b = np.asarray(factors["a"], np.float64), np.asarray(factors["b"], np.float64)
        delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
        layers[target] = (np.asarray(layers[target], np.float64) + SCALE * delta).astype(np.float32)
    return {**base, "layers": layers}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "rank must be >= 1"),
        (dict(rank=4, alpha=0.0), "alpha must be > 0"),
        (dict(rank=4, targets=("q", "qkv")), "targets must be distinct names"),
        (dict(rank=4, targets=()), "targets must be distinct names"),
        (dict(rank=4, targets=("q", "q")), "targets must be distinct names"),
    ],
)
def test_lora_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_adapter_shapes_and_axes():
    c = CONFIG
    shapes = lora.adapter_shapes(tf.param_shapes(c)["layers"], LORA)["layers"]["lora"]
    assert set(shapes) == set(LORA_TARGETS)
    L, D, F, N, K, H = (
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
    )
    assert shapes["q"] == {"a": (L, D, 3), "b": (L, 3, N, H)}
    assert shapes["k"] == {"a": (L, D, 3), "b": (L, 3, K, H)}
    assert shapes["o"] == {"a": (L, N, H, 3), "b": (L, 3, D)}  # heads x head_dim -> embed
    assert shapes["down"] == {"a": (L, F, 3), "b": (L, 3, D)}
    axes = lora.adapter_axes(tf.logical_axes(c)["layers"], LORA)["layers"]["lora"]
    assert axes["q"] == {
        "a": ("layers", "embed", None),
        "b": ("layers", None, "q_heads", "head_dim"),
    }
    assert axes["o"] == {
        "a": ("layers", "q_heads", "head_dim", None),
        "b": ("layers", None, "embed"),
    }


def test_fresh_adapters_start_as_the_base_model():
    base = _base()
    adapters = lora.init_adapters(tf.param_shapes(CONFIG)["layers"], LORA, jax.random.key(1))
    for target, factors in adapters["layers"]["lora"].items():
        a = np.asarray(factors["a"])
        bound = 1 / np.sqrt(np.prod(a.shape[1:-1]))  # PEFT: kaiming-uniform(a=sqrt 5) on A
        assert 0.5 * bound < np.abs(a).max() <= bound, target
        assert not np.asarray(factors["b"]).any(), target
    np.testing.assert_array_equal(_hidden(lora.attach(base, adapters)), _hidden(base))


def test_forward_runs_on_the_merged_weights():
    base, adapters = _base(), _adapters()
    with_adapters = np.asarray(_hidden(lora.attach(base, adapters)))
    np.testing.assert_allclose(
        with_adapters, _hidden(_numpy_merged(base, adapters)), atol=2e-5, rtol=1e-5
    )
    assert np.abs(with_adapters - np.asarray(_hidden(base))).max() > 0.1, "adapters do nothing"
    merged = lora.merge(lora.attach(base, adapters), LORA)  # the sampler's and export's merge
    assert "lora" not in merged["layers"]
    np.testing.assert_allclose(_hidden(merged), with_adapters, atol=2e-5, rtol=1e-5)


def test_adapter_gradients_follow_the_chain_rule():
    # d/dA = s dW B^T and d/dB = s A^T dW, with dW the gradient of the merged weight.
    base, adapters = _base(), _adapters()
    weights = jax.random.normal(jax.random.key(7), _hidden(base).shape)
    objective = lambda params: jnp.sum(_hidden(params) * weights)
    grads = jax.grad(lambda ad: objective(lora.attach(base, ad)))(adapters)
    merged_grads = jax.grad(objective)(_numpy_merged(base, adapters))
    for target, factors in adapters["layers"]["lora"].items():
        got = grads["layers"]["lora"][target]
        for i in range(CONFIG.num_layers):  # per layer, as matrices [in, r], [r, out], [in, out]
            a, b = np.asarray(factors["a"][i]), np.asarray(factors["b"][i])
            a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)
            dw2 = np.asarray(merged_grads["layers"][target][i]).reshape(a2.shape[0], b2.shape[1])
            expected_a = SCALE * (dw2 @ b2.T).reshape(a.shape)
            expected_b = SCALE * (a2.T @ dw2).reshape(b.shape)
            for name, expected in (("a", expected_a), ("b", expected_b)):
                atol = 2e-5 * np.abs(expected).max()  # fp32 sums over the tokens
                np.testing.assert_allclose(got[name][i], expected, rtol=1e-4, atol=atol)
        assert np.abs(got["a"]).max() > 1e-3 and np.abs(got["b"]).max() > 1e-3, target


def _layer_residual_shapes(fn, *args) -> list[str]:
    """Shapes of what the backward pass keeps from the layer scan's forward."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return sorted(
        line.split()[0] for line in out.getvalue().splitlines() if "output of scan" in line
    )


def test_lora_forward_keeps_no_weight_sized_residual():
    # The layer's remat policy keeps matmul outputs; the adapters' A B products are matmuls
    # too, and keeping them would hold a copy of every targeted weight through the backward.
    base, adapters = _base(), _adapters()
    objective = lambda params: jnp.sum(_forward(params) ** 2)
    with_lora = _layer_residual_shapes(lambda ad: objective(lora.attach(base, ad)), adapters)
    full = _layer_residual_shapes(
        lambda layers: objective({**base, "layers": layers}), base["layers"]
    )
    assert with_lora == full
    weight_shapes = {f"f32{list(np.shape(w))}".replace(" ", "") for w in base["layers"].values()}
    assert not weight_shapes & set(with_lora)


def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The output shape of every matmul in `jaxpr`, nested ones (scan, remat) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's, or a Jaxpr
                if hasattr(inner, "eqns"):
                    shapes += _dot_output_shapes(inner)
    return shapes


def test_adapter_gradients_form_no_weight_sized_product():
    # The merged weights are held constant for autodiff; each projection's rank-r path carries
    # the adapters' gradient. Autodiff through the merge would multiply x^T dy into every
    # targeted weight's shape (full fine-tuning's weight-gradient FLOPs) and only then project
    # it onto A and B.
    base, adapters = _base(), _adapters()
    objective = lambda ad: jnp.sum(_forward(lora.attach(base, ad)) ** 2)
    shapes = _dot_output_shapes(jax.make_jaxpr(jax.grad(objective))(adapters).jaxpr)
    weights = {tuple(sorted(np.shape(base["layers"][t])[1:])) for t in LORA_TARGETS}
    weight_sized = lambda shapes: [s for s in shapes if tuple(sorted(s)) in weights]
    assert shapes and not weight_sized(shapes)
    # ...while the full model's gradient does form them (the check sees the scan's matmuls).
    full = lambda layers: jnp.sum(_forward({**base, "layers": layers}) ** 2)
    full_shapes = _dot_output_shapes(jax.make_jaxpr(jax.grad(full))(base["layers"]).jaxpr)
    assert len(weight_sized(full_shapes)) >= len(LORA_TARGETS)


_completion_logprobs = jax.jit(tf.completion_logprobs, static_argnames=("config", "temperature"))


def test_sampler_logps_equal_the_trainers_with_adapters():
    # The sampler merges every layer once before decoding; the trainer merges each layer in its
    # scan. Both must score a sampled token alike, and unlike the base model.
    base = _base()
    params = lora.attach(base, _adapters())
    tokens, mask = ro.pad_prompts([[5, 17, 3], [9, 8, 7, 6]], pad_id=0, buckets=(8,))
    sampling = ro.SamplingConfig(max_new_tokens=6, end_ids=(0,), pad_id=0)
    rollout = ro.generate(
        params, tokens, mask, jax.random.key(3), model=CONFIG, sampling=sampling, num_samples=2
    )
    inputs = (
        rollout.prompt_tokens_BxP,
        rollout.prompt_mask_BxP,
        rollout.completion_tokens_BxC,
        rollout.completion_mask_BxC,
    )
    scored = lambda p: np.where(
        rollout.completion_mask_BxC,
        _completion_logprobs(p, *inputs, config=CONFIG, temperature=1.0)[0],
        0.0,
    )
    np.testing.assert_allclose(rollout.logps_BxC, scored(params), atol=2e-5, rtol=0)
    assert np.abs(scored(base) - scored(params)).max() > 0.1


@pytest.mark.parametrize("case", ["qwen2_bias_untied", "qwen3_qknorm_tied"])
def test_peft_loads_our_adapter_export(tmp_path, case):
    # PEFT is the reference LoRA: its adapter, loaded from our export onto the transformers
    # model, must give our logits; so must transformers on the exported merged weights.
    import peft
    import transformers
    from test_parity import ATOL, RTOL, _left_padded_batch, _logits, _reference, _torch_logits

    model, config, params = _reference(case)  # qwen3: head_dim 16, so o maps 64 -> 32
    config = config.replace(lora=LORA)
    adapters = _adapters(config=config)
    merged = lora.merge(lora.attach(params, adapters), LORA)
    loading.export_hf(str(tmp_path / "hf"), merged, config, adapters=adapters)
    written = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == (3, 6.0)

    tokens, valid = _left_padded_batch(config.vocab_size)
    ours = np.asarray(_logits(lora.attach(params, adapters), tokens, valid, config=config))
    base = _torch_logits(model, tokens, valid)
    with_adapter = peft.PeftModel.from_pretrained(model, str(tmp_path / "hf" / "adapter"))
    expected = _torch_logits(with_adapter, tokens, valid)
    assert np.abs(expected[valid] - base[valid]).max() > 1.0, "the adapter changes little"
    np.testing.assert_allclose(ours[valid], expected[valid], atol=ATOL, rtol=RTOL)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    np.testing.assert_allclose(
        _torch_logits(exported, tokens, valid)[valid], expected[valid], atol=ATOL, rtol=RTOL
    )
    # And our own loader merges the exported adapter back into the same weights.
    remerged = loading.merge_peft_adapter(params, config, str(tmp_path / "hf" / "adapter"))
    for name in LORA.targets:
        np.testing.assert_allclose(
            remerged["layers"][name], merged["layers"][name], atol=1e-5, err_msg=name
        )


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_adapter_merges_into_the_base_weights(tmp_path, rslora):
    # An adapter that PEFT itself made (random A and B, four of the seven projections) and
    # saved: merged by our loader, our model gives the PEFT model's logits.
    import peft
    from test_parity import ATOL, RTOL, _left_padded_batch, _logits, _reference, _torch_logits

    model, config, params = _reference("qwen3_qknorm_tied")
    modules = ["q_proj", "k_proj", "o_proj", "down_proj"]
    lora_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False, use_rslora=rslora
    )
    adapted = peft.get_peft_model(model, lora_config)
    adapted.save_pretrained(str(tmp_path))
    tokens, valid = _left_padded_batch(config.vocab_size)
    expected = _torch_logits(adapted, tokens, valid)

    original = jax.tree.map(np.copy, params)
    merged = loading.merge_peft_adapter(params, config, str(tmp_path))
    ours = np.asarray(_logits(merged, tokens, valid, config=config))
    np.testing.assert_allclose(ours[valid], expected[valid], atol=ATOL, rtol=RTOL)
    moved = {
        n for n in params["layers"] if not np.array_equal(merged["layers"][n], params["layers"][n])
    }
    assert moved == {"q", "k", "o", "down"}
    jax.tree.map(np.testing.assert_array_equal, params, original)  # the input is left as it was


def _adapter_folder(path, tensors, **config):
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1, **config})
    )
    safetensors.numpy.save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


def test_adapters_that_cannot_merge_are_refused(tmp_path):
    params = _base()
    pair = lambda module, out, inp: {
        f"base_model.model.{module}.lora_A.weight": np.zeros((1, inp), np.float32),
        f"base_model.model.{module}.lora_B.weight": np.zeros((out, 1), np.float32),
    }
    d, v = CONFIG.hidden_size, CONFIG.vocab_size
    with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
        loading.merge_peft_adapter(params, CONFIG, str(tmp_path / "missing"))
    dora = _adapter_folder(
        tmp_path / "dora", pair("model.layers.0.mlp.up_proj", 64, d), use_dora=True
    )
    with pytest.raises(ValueError, match="only plain LoRA adapters merge"):
        loading.merge_peft_adapter(params, CONFIG, dora)
    head = _adapter_folder(tmp_path / "head", pair("lm_head", v, d))
    with pytest.raises(ValueError, match="lm_head.lora_A.weight adapts no supported projection"):
        loading.merge_peft_adapter(params, CONFIG, head)
