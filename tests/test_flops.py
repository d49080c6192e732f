"""Model FLOPs by hand on tiny-qwen2, and the peak table's device-kind matching."""

import pytest

from grpo import flops
from grpo.models import presets
from grpo.models.config import LoraConfig


def test_forward_flops_by_hand():
    # tiny-qwen2: D=32, F=64, L=2, H=4, K=2, dh=8, V=128.
    # matmul params per layer: q,k,v,o = 32*8*(2*4 + 2*2) = 3072; gate,up,down = 3*32*64 = 6144.
    model = presets.preset("tiny-qwen2")
    assert flops.layer_matmul_params(model) == 2 * (3072 + 6144)
    # One sequence, P=2, C=3 (context 5): layers 2*18432*5 = 184320; attention
    # 4*L*H*dh*5*5 = 4*2*4*8*25 = 6400; unembedding over the 3 completion slots 2*128*32*3 = 24576.
    assert flops.forward_flops(model, 1, 2, 3) == 184320 + 6400 + 24576
    assert flops.training_flops(model, 2, 2, 3) == 3 * 2 * (184320 + 6400 + 24576)


def test_shared_prompt_flops_by_hand():
    # tiny-qwen2, 4 rows in 2 groups of 2, P=2, C=3: 2 prompts x 2 slots + 4 x 3 completion
    # slots = 16 through the layers (20 per row), so 2*18432*16 = 589824; attention pairs
    # 2 x 2*2 + 4 x 3*5 = 68, 4*2*4*8*68 = 17408; the unembedding as before, 4 x 24576.
    model = presets.preset("tiny-qwen2")
    expected = 589824 + 17408 + 4 * 24576
    assert flops.forward_flops(model, 4, 2, 3, prompt_group=2) == expected
    assert flops.training_flops(model, 4, 2, 3, prompt_group=2) == 3 * expected
    lora_model = presets.preset("tiny-qwen2", lora=LoraConfig(rank=4))
    lora_expected = 2 * (589824 + 4 * 24576) + 3 * 17408 + 6 * 4096 * 16
    assert flops.training_flops(lora_model, 4, 2, 3, prompt_group=2) == lora_expected


def test_lora_training_flops_by_hand():
    # Rank 4 on all seven targets, per layer r x (in + out): q 4*(32+32), k and v 4*(32+16) each,
    # o 4*(32+32), gate and up 4*(32+64) each, down 4*(64+32): 2048; two layers 4096.
    model = presets.preset("tiny-qwen2", lora=LoraConfig(rank=4))
    assert flops.adapter_params(model) == 4096
    # Two sequences as above: the frozen weights' backward is the input gradient alone (forward
    # + backward = 2 x forward), attention 3 x, the adapters 6 x 4096 per token.
    expected = 2 * 2 * (184320 + 24576) + 3 * 2 * 6400 + 6 * 4096 * 2 * 5
    assert flops.training_flops(model, 2, 2, 3) == expected
    assert flops.adapter_params(presets.preset("tiny-qwen2")) == 0


def test_training_flops_per_token_is_six_times_params_for_a_tied_model():
    # With the attention term negligible (one slot) and every slot a completion, the count is
    # 6 x (matmul params + tied unembedding), i.e. 6 x params up to norms and biases.
    model = presets.preset("qwen2.5-1.5b")
    assert flops.training_flops(model, 1, 0, 1) == pytest.approx(6 * model.num_params, rel=1e-3)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v6 lite", 918e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v4", 275e12),
        ("cpu", None),
    ],
)
def test_peak_flops_by_device_kind(kind, peak):
    assert flops.peak_flops(kind) == peak
