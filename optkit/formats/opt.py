"""transformers' OPT: config.json fields and state-dict key names."""

from __future__ import annotations

from typing import Any

import torch

from optkit.errors import SpecValidationError
from optkit.formats.base import BOOL, INT, NUMBER, STR, CheckpointFormat, with_head_and_dtype
from optkit.spec import ModelSpec, validate_spec

HEAD_CLASSES = {
    "causal_lm": "OPTForCausalLM",
    "base": "OPTModel",
    "sequence_classification": "OPTForSequenceClassification",
    "question_answering": "OPTForQuestionAnswering",
}
CONFIG_TYPES = {
    "vocab_size": INT, "hidden_size": INT, "num_hidden_layers": INT, "num_attention_heads": INT, "ffn_dim": INT,
    "max_position_embeddings": INT, "word_embed_proj_dim": (int, None), "do_layer_norm_before": BOOL,
    "_remove_final_layer_norm": BOOL, "enable_bias": BOOL, "layer_norm_elementwise_affine": BOOL,
    "activation_function": STR, "dropout": NUMBER, "attention_dropout": NUMBER, "layerdrop": NUMBER,
    "init_std": NUMBER,
}

def spec_from_config(config: dict[str, Any], *, head: str = "causal_lm", num_labels: int | None = None,
                        source: str | None = None) -> ModelSpec:
    """An OPT ``config.json`` as an optkit spec (every OPTConfig field that changes the forward)."""
    g = config.get
    hidden = g("hidden_size", 768)
    pre = g("do_layer_norm_before", True)
    head_params: dict[str, Any] = {}
    if head == "causal_lm":
        head_params["tie_word_embeddings"] = g("tie_word_embeddings", True)
    elif head == "sequence_classification":
        labels = num_labels or g("num_labels") or len(g("id2label") or {}) or 2
        head_params = {"num_labels": labels, "problem_type": g("problem_type")}
    data = {
        "family": "opt",
        "decoder": {
            "vocab_size": g("vocab_size", 50272),
            "hidden_size": hidden,
            "num_layers": g("num_hidden_layers", 12),
            "num_heads": g("num_attention_heads", 12),
            "ffn_dim": g("ffn_dim", 3072),
            "max_positions": g("max_position_embeddings", 2048),
            "word_embed_proj_dim": g("word_embed_proj_dim") or hidden,
            "norm_position": "pre" if pre else "post",
            "final_norm": bool(pre and not g("_remove_final_layer_norm", False)),
            "bias": g("enable_bias", True),
            "dropout": g("dropout", 0.1),
            "attention_dropout": g("attention_dropout", 0.0),
            "layerdrop": g("layerdrop", 0.0),
            "init_std": g("init_std", 0.02),
            "mlp": {"name": "ffn", "params": {"activation": g("activation_function", "relu")}},
            "norm": {"name": "layernorm",
                     "params": {"eps": 1e-5, "elementwise_affine": g("layer_norm_elementwise_affine", True)}},
        },
        "head": {"name": head, "params": head_params},
        "tokens": {"pad_token_id": g("pad_token_id", 1), "bos_token_id": g("bos_token_id", 2),
                   "eos_token_id": g("eos_token_id", 2)},
    }
    if data["decoder"]["word_embed_proj_dim"] == hidden:
        data["decoder"]["word_embed_proj_dim"] = None
    return validate_spec(data, source=source)


def config_from_spec(spec: ModelSpec, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The OPT ``config.json`` transformers needs to rebuild this model."""
    d = spec.decoder
    problems = []
    expected = {"token_embedding": "learned", "positional_embedding": "learned", "mlp": "ffn", "norm": "layernorm"}
    for kind, name in expected.items():
        if getattr(d, kind).name != name:
            problems.append(f"decoder.{kind}: '{getattr(d, kind).name}' has no OPT equivalent (needs '{name}')")
    if d.positional_embedding.params.get("offset", 2) != 2:
        problems.append("decoder.positional_embedding.params.offset: OPT checkpoints need 2")
    if d.norm.params.get("eps", 1e-5) != 1e-5:
        problems.append("decoder.norm.params.eps: OPT's LayerNorm eps is fixed at 1e-5")
    if d.query_scaling != "projection":
        problems.append("decoder.query_scaling: OPT scales q after the projection")
    if spec.head.name not in HEAD_CLASSES:
        problems.append(f"head: '{spec.head.name}' has no transformers OPT class")
    if problems:
        raise SpecValidationError(problems, source="save_pretrained (transformers OPT config)")
    config: dict[str, Any] = {
        "architectures": [HEAD_CLASSES[spec.head.name]],
        "model_type": "opt",
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "ffn_dim": d.ffn_dim,
        "max_position_embeddings": d.max_positions,
        "word_embed_proj_dim": d.embed_dim,
        "do_layer_norm_before": d.norm_position == "pre",
        "_remove_final_layer_norm": d.norm_position == "pre" and not d.final_norm,
        "enable_bias": d.bias,
        "layer_norm_elementwise_affine": d.norm.params.get("elementwise_affine", True),
        "activation_function": d.mlp.params.get("activation", "relu"),
        "dropout": d.dropout,
        "attention_dropout": d.attention_dropout,
        "layerdrop": d.layerdrop,
        "init_std": d.init_std,
        "pad_token_id": spec.tokens.pad_token_id,
        "bos_token_id": spec.tokens.bos_token_id,
        "eos_token_id": spec.tokens.eos_token_id,
        "tie_word_embeddings": spec.head.params.get("tie_word_embeddings", True),
        "use_cache": True,
    }
    return with_head_and_dtype(config, spec, dtype)


OPT = (CheckpointFormat(
    model_type="opt",
    family="opt",
    spec_from_config=spec_from_config,
    config_from_spec=config_from_spec,
    renames=((r"^(decoder\.layers\.\d+\.)(fc1|fc2)\.", r"\1mlp.\2."),),
    inverse=((r"^(decoder\.layers\.\d+\.)mlp\.(fc1|fc2)\.", r"\1\2."),),
    head_classes=HEAD_CLASSES,
    config_types=CONFIG_TYPES,
))
