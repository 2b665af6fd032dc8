"""Tiny transformers OPT models as the oracle, and the same weights in optkit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import optkit

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37,
            max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2)

# Every OPTConfig field that changes the forward pass, one variant each.
VARIANTS: dict[str, dict[str, Any]] = {
    "pre_ln": {},
    "post_ln_projected": dict(do_layer_norm_before=False, word_embed_proj_dim=16),  # opt-350m
    "no_bias_no_affine": dict(enable_bias=False, layer_norm_elementwise_affine=False),
    "removed_final_ln": dict(_remove_final_layer_norm=True),
    "gelu": dict(activation_function="gelu"),
    "gelu_new": dict(activation_function="gelu_new"),
    "silu": dict(activation_function="silu"),
    "untied": dict(tie_word_embeddings=False),
    "pre_ln_projected": dict(word_embed_proj_dim=24),
}

HF_CLASSES = {
    "causal_lm": "OPTForCausalLM",
    "base": "OPTModel",
    "sequence_classification": "OPTForSequenceClassification",
    "question_answering": "OPTForQuestionAnswering",
}


def hf_model(head: str = "causal_lm", seed: int = 0, **overrides: Any):
    import transformers

    torch.manual_seed(seed)
    config = transformers.OPTConfig(**{**TINY, **overrides})
    model = getattr(transformers, HF_CLASSES[head])(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a skipped one shows
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def saved_pair(tmp_path: Path, head: str = "causal_lm", attention: str = "eager", seed: int = 0, **overrides: Any):
    """(transformers model, optkit model) with the same weights, loaded through a checkpoint."""
    hf = hf_model(head, seed, **overrides)
    directory = tmp_path / f"hf-{head}-{seed}"
    hf.save_pretrained(directory)
    return hf, optkit.from_pretrained(directory, head=head, attention=attention)


def batch(seed: int = 0, batch_size: int = 3, length: int = 9, vocab: int = 99, padding: str = "left"):
    """Token ids and a mask with left/right padding of different amounts per row (row 0 unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch_size):
        pad = min(row * 2, length - 1)
        if padding == "left":
            mask[row, :pad] = 0
        elif padding == "right":
            mask[row, length - pad:] = 0
    ids = ids.masked_fill(mask == 0, TINY["pad_token_id"])
    return ids, mask
