"""Static model hyper-parameters for the supported decoder families, and their HF mapping."""

from __future__ import annotations

import dataclasses
from typing import Any

# Hugging Face `model_type` -> the class name written into an exported config.json.
SUPPORTED_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",  # Llama's layers; sliding-window attention refused
}

ATTENTION_IMPLS = ("xla", "cudnn", "auto", "splash")
# Activations and weights: float16 would need loss scaling, and an export names only these two.
DTYPES = ("bfloat16", "float32")  # narrowest first

# The projections a LoRA adapter may target, and how many of each weight's axes (after the
# layer axis) are its input: q/k/v/gate/up/down map one axis to the rest; o maps heads x
# head_dim to embed.
LORA_TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: each targeted weight W acts as W + (alpha / rank) A B, where A maps
    its input axes to `rank` and B maps `rank` to its output axes (models/lora.py)."""

    rank: int
    alpha: float = 32.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"LoRA targets must be distinct names from {tuple(LORA_TARGETS)}, "
                f"got {self.targets}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """The `rope_scaling={"rope_type": "llama3", ...}` block of Llama 3.1+ configs."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer. Hashable: it is a static jit argument."""

    model_type: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2/2.5 (and Llama with attention_bias=True)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    max_position_embeddings: int = 32768
    dtype: str = "bfloat16"  # activations / matmul inputs
    param_dtype: str = "float32"
    # Attention of the trainer's full-sequence forward (decoding always uses "xla"): "xla",
    # our einsum attention (the reference); "cudnn": cuDNN's fused kernel (GPU, bf16) through
    # jax.nn.dot_product_attention, on rows gathered valid-first so cuDNN's own causal +
    # padding mask applies; "splash": the Pallas splash kernel (TPU; models/splash.py);
    # "auto": splash on a TPU, else xla.
    attention_impl: str = "xla"
    # Rematerialise each layer in the backward pass ("none" | "full" | "dots").
    remat: str = "dots"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Train low-rank adapters on a frozen base instead of every weight (None: full fine-tuning).
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.model_type!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {'|'.join(ATTENTION_IMPLS)}, "
                f"got {self.attention_impl!r}"
            )
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none|full|dots, got {self.remat!r}")
        for knob, value in (("dtype", self.dtype), ("param_dtype", self.param_dtype)):
            if value not in DTYPES:
                raise ValueError(f"{knob} must be {'|'.join(DTYPES)}, got {value!r}")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def frozen_dtype(self) -> str:
        """The dtype a frozen copy of the weights (the KL reference) can be held in with no
        output changed: the forward casts every weight to `dtype` before use, so a copy in the
        narrower of `dtype` and `param_dtype` gives the same bits (bf16: half fp32's memory)."""
        return min(self.dtype, self.param_dtype, key=DTYPES.index)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h, k, dh = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * dh * 2 + d * k * dh * 2
        if self.qkv_bias:
            attn += (h + 2 * k) * dh
        if self.qk_norm:
            attn += 2 * dh
        per_layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a config from a Hugging Face `config.json` dict."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r} (architectures="
                f"{hf.get('architectures')}); supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
            raise ValueError(
                f"{model_type} with sliding-window attention (sliding_window="
                f"{hf['sliding_window']}) is not supported: every layer here attends to the "
                "whole context"
            )
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        kwargs = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=float(_rope_theta(hf)),
            rope_scaling=_rope_scaling(hf.get("rope_scaling") or hf.get("rope_parameters")),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict transformers needs to load exported weights."""
        hf: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16" if self.param_dtype == "bfloat16" else "float32",
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        if self.model_type == "mistral":
            hf["sliding_window"] = None
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            eos = list(self.eos_token_ids)
            hf["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return hf


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers >= 5 may nest theta under `rope_parameters`.
    params = hf.get("rope_parameters") or {}
    return hf.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(block: dict[str, Any] | None) -> Llama3RopeScaling | None:
    if not block:
        return None
    kind = block.get("rope_type", block.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
    return Llama3RopeScaling(
        factor=float(block["factor"]),
        low_freq_factor=float(block["low_freq_factor"]),
        high_freq_factor=float(block["high_freq_factor"]),
        original_max_position_embeddings=int(block["original_max_position_embeddings"]),
    )
