"""Model FLOPs of the trainer's passes, and the peak bf16 FLOP/s of known accelerators, for MFU.

Convention (PaLM appendix B; the one `grpo/train.py` reports): a matmul with N parameters costs
2N FLOPs per token forward and 4N backward; attention adds QK^T and AV over the whole context,
4 x layers x heads x head_dim x context per token forward, not halved for the causal mask (our
einsum attention computes the masked half too; cuDNN and splash skip it, which makes their MFU
about 3% generous at the 1.5B shape with 1024 slots). Rematerialisation is not counted: this is
model FLOPs (MFU), not hardware FLOPs.

The log-prob pass runs every prompt + completion slot through the layers but computes logits
only for the completion slots, so the unembedding counts C tokens, the layers P + C. The input
embedding is a gather (no FLOPs); with tied embeddings its table is the unembedding. With
`prompt_group` G > 1 (TrainConfig.shared_prompt_forward) each prompt runs once for its G rows:
the layers count rows / G x P + rows x C slots, attention the prompts' P x P and each
completion's C x (P + C): the FLOPs the pass runs, not those of the per-row pass it replaces.

Under LoRA the base is frozen: its matmuls' backward is the input gradient alone (2N, not 4N;
grpo/models/lora.py forms no weight gradient for them), and each adapter counts as a matmul
of its own, 6 x its parameters per token.
"""

from __future__ import annotations

import math

import jax

from grpo.models import lora, transformer
from grpo.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix; the first match wins, so longer
# prefixes come first ("TPU v5 lite" is a v5e, plain "TPU v5" a v5p, as jax reports them).
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5" (or "TPU v5p")
    "TPU v4": 275e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The dense bf16 peak of one device of this kind, or None when unknown (e.g. CPU)."""
    for prefix, flops in PEAK_BF16_FLOPS.items():
        if device_kind.startswith(prefix):
            return flops
    return None


def layer_matmul_params(model: ModelConfig) -> int:
    """Weights of the matmuls inside the layers (q, k, v, o, gate, up, down), all layers."""
    d, dh = model.hidden_size, model.head_dim
    attention = d * dh * (2 * model.num_heads + 2 * model.num_kv_heads)
    return model.num_layers * (attention + 3 * d * model.intermediate_size)


def adapter_params(model: ModelConfig) -> int:
    """The LoRA adapters' parameters, all layers (0 without LoRA)."""
    if model.lora is None:
        return 0
    shapes = lora.adapter_shapes(transformer.param_shapes(model)["layers"], model.lora)
    factors = jax.tree.leaves(shapes["layers"]["lora"], is_leaf=lambda x: isinstance(x, tuple))
    return sum(math.prod(shape) for shape in factors)


def _slots_and_pairs(
    rows: int, prompt_len: int, completion_len: int, prompt_group: int
) -> tuple[float, float]:
    """(token slots through the layers, query-key pairs attended) of one log-prob forward."""
    context = prompt_len + completion_len
    if prompt_group == 1:
        return float(rows) * context, float(rows) * context * context
    prompts = rows / prompt_group
    slots = prompts * prompt_len + rows * completion_len
    return slots, prompts * prompt_len * prompt_len + rows * completion_len * context


def _forward_parts(
    model: ModelConfig, rows: int, prompt_len: int, completion_len: int, prompt_group: int = 1
) -> tuple[float, float]:
    """(weight matmuls, attention) FLOPs of one log-prob forward over `rows` sequences."""
    slots, pairs = _slots_and_pairs(rows, prompt_len, completion_len, prompt_group)
    layers = 2 * layer_matmul_params(model) * slots
    unembed = 2 * model.vocab_size * model.hidden_size * completion_len * float(rows)
    attention = 4 * model.num_layers * model.num_heads * model.head_dim * pairs
    return layers + unembed, attention


def forward_flops(
    model: ModelConfig, rows: int, prompt_len: int, completion_len: int, prompt_group: int = 1
) -> float:
    """FLOPs of one log-prob forward over `rows` sequences of prompt_len + completion_len slots."""
    return sum(_forward_parts(model, rows, prompt_len, completion_len, prompt_group))


def training_flops(
    model: ModelConfig, rows: int, prompt_len: int, completion_len: int, prompt_group: int = 1
) -> float:
    """FLOPs of one forward + backward of the log-prob pass: backward = 2 x forward, but for a
    frozen LoRA base (1 x) plus its adapters (6 x their params per token)."""
    weights, attention = _forward_parts(model, rows, prompt_len, completion_len, prompt_group)
    if model.lora is None:
        return 3 * (weights + attention)
    slots, _ = _slots_and_pairs(rows, prompt_len, completion_len, prompt_group)
    return 2 * weights + 3 * attention + 6 * adapter_params(model) * slots
