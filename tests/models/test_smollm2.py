"""The real offline model: SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers' GGUF loader.

transformers reads the GGUF's config, tensor names, q/k row order and tokenizer with its own code
(both sides dequantise with the `gguf` package), so equal weights and equal greedy continuations
check all of ours, and our forward, at once. Its `from_pretrained(..., gguf_file=...)` needs
`accelerate`, which we do not install, so the reference goes through `load_gguf_checkpoint`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from grpo.models import loading
from grpo.models.transformer import forward, init_cache, logits, unstack_layers

pytestmark = pytest.mark.slow

NEW_TOKENS = 20
MESSAGES = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]


@pytest.fixture(scope="module")
def smollm2():
    config, params, tokenizer = loading.load_model(loading.SMOLLM2_NAME, dtype="float32")
    return config, jax.device_put(params), tokenizer  # host numpy would be re-sent every call


@pytest.fixture(scope="module")
def reference():
    path = loading.smollm2_gguf_path()
    folder, name = os.path.split(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    return model.eval(), tokenizer


def _prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _greedy(params, config, prompt: list[int], new_tokens: int) -> list[int]:
    """Our greedy decoding, as the sampler does it: prefill a KV cache, then one token a step."""

    @jax.jit
    def step(params, tokens, positions, cache):
        valid = jnp.ones_like(tokens, bool)
        hidden, cache = forward(params, tokens, positions, valid, config=config, cache=cache)
        return jnp.argmax(logits(params, hidden[:, -1:], config=config), axis=-1), cache

    p = len(prompt)
    params = unstack_layers(params)
    cache = init_cache(config, 1, p + new_tokens)
    token, cache = step(params, jnp.asarray([prompt]), jnp.arange(p)[None], cache)
    tokens = [token]
    for i in range(new_tokens - 1):
        token, cache = step(params, token, jnp.full((1, 1), p + i), cache)
        tokens.append(token)
    return [int(t[0, 0]) for t in tokens]


def test_config_matches_the_published_model(smollm2):
    config, params, _ = smollm2
    assert (config.model_type, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.intermediate_size) == (49152, 1536)
    assert config.tie_word_embeddings and "lm_head" not in params
    assert (config.rope_theta, config.rms_norm_eps) == (100000.0, 1e-5)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2, reference):
    _, _, ours = smollm2
    _, theirs = reference
    assert ours.chat_template == theirs.chat_template
    assert _prompt_ids(ours) == _prompt_ids(theirs)
    text = "GRPO: 12,345 apples\n\t<|im_end|> ünïcödé"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.eos_token == theirs.eos_token == "<|im_end|>"


def test_greedy_continuation_matches_transformers(smollm2, reference):
    config, params, tokenizer = smollm2
    model, _ = reference
    prompt = _prompt_ids(tokenizer)
    ours = _greedy(params, config, prompt, NEW_TOKENS)
    # transformers' greedy continuation equals ours iff its argmax after every prefix of
    # prompt + ours is our next token: one teacher-forced forward instead of `generate`.
    with torch.no_grad():
        reference_logits = model(torch.tensor([prompt + ours])).logits[0].numpy()
    theirs = reference_logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))


def test_export_loads_in_transformers_with_identical_weights(smollm2, reference, tmp_path):
    """Our dequantised, un-permuted weights equal transformers' own reading of the GGUF exactly."""
    config, params, tokenizer = smollm2
    model, _ = reference
    out = str(tmp_path / "smollm2")
    loading.export_hf(out, params, config, tokenizer)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    theirs = model.state_dict()
    assert exported.state_dict().keys() == theirs.keys()
    for name, tensor in exported.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), theirs[name].numpy(), err_msg=name)
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    assert _prompt_ids(exported_tokenizer) == _prompt_ids(tokenizer)
    assert exported.generation_config.eos_token_id in (2, [2])
