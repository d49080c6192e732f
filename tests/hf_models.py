"""Tiny random transformers models: the dimensions the parity tests share, and reward models
(sequence classifiers saved as Hugging Face folders) for the reward-model tests and the
multi-process runs (tests/test_multihost.py)."""

import torch
import transformers

PAD = 0  # the classifiers' pad_token_id
TINY_DIMS = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
_CLASSIFIER = dict(TINY_DIMS, num_labels=1, pad_token_id=PAD)
CASES = {
    "qwen2": lambda vocab: transformers.Qwen2Config(vocab_size=vocab, **_CLASSIFIER),
    "qwen3": lambda vocab: transformers.Qwen3Config(vocab_size=vocab, head_dim=16, **_CLASSIFIER),
    "llama": lambda vocab: transformers.LlamaConfig(vocab_size=vocab, **_CLASSIFIER),
}


def save_classifier(folder, tokenizer, case="qwen2", vocab=96, **changes):
    """A random transformers sequence classifier saved as a Hugging Face folder with
    `tokenizer`; every weight std 0.3 (norms around 1), so a misplaced tensor shows."""
    torch.manual_seed(0)
    config = CASES[case](vocab)
    for key, value in changes.items():
        setattr(config, key, value)
    model = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager"
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
