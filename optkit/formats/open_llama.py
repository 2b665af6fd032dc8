"""transformers' Open-Llama (``model_type: open-llama``): config.json fields and state-dict key names.

The components come from the ``optkit_llama_components`` plugin (rmsnorm, rotary, gated,
stable); the module tree is the one every family shares, so only names are mapped here.
Config defaults are ``OpenLlamaConfig``'s signature defaults, which are the real ones (its
docstring says vocab 32000 and eps 1e-12; the code uses 100000 and 1e-6).
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

import torch

from optkit.errors import SpecValidationError
from optkit.formats.base import BOOL, INT, NUMBER, STR, CheckpointFormat, with_head_and_dtype
from optkit.spec import ModelSpec, validate_spec

MODEL_TYPE = "open-llama"
FAMILY = "open-llama"
HEAD_CLASSES = {
    "causal_lm": "OpenLlamaForCausalLM",
    "base": "OpenLlamaModel",
    "sequence_classification": "OpenLlamaForSequenceClassification",
}
STABLE_EPS = 1e-5  # transformers builds the stable-embedding LayerNorm with nn.LayerNorm's default
SCALINGS = ("linear", "dynamic")
CONFIG_TYPES = {  # rope_scaling has its own check (_rope_scaling)
    "vocab_size": INT, "hidden_size": INT, "intermediate_size": INT, "num_hidden_layers": INT,
    "num_attention_heads": INT, "max_position_embeddings": INT, "rope_theta": NUMBER, "rms_norm_eps": NUMBER,
    "initializer_range": NUMBER, "hidden_act": STR, "hidden_dropout_prob": NUMBER, "attention_dropout_prob": NUMBER,
    "use_stable_embedding": BOOL, "shared_input_output_embedding": BOOL, "num_key_value_heads": (int, None),
}

# transformers key (``model.`` already stripped) -> optkit module path; applied in order.
RENAMES = (
    (r"^embed_layer_norm\.", "decoder.embed_tokens.layer_norm."),
    (r"^embed_tokens\.", "decoder.embed_tokens."),
    (r"^norm\.", "decoder.final_layer_norm."),
    (r"^layers\.(\d+)\.input_layernorm\.", r"decoder.layers.\1.self_attn_layer_norm."),
    (r"^layers\.(\d+)\.post_attention_layernorm\.", r"decoder.layers.\1.final_layer_norm."),
    (r"^layers\.(\d+)\.self_attn\.o_proj\.", r"decoder.layers.\1.self_attn.out_proj."),
    (r"^layers\.", "decoder.layers."),
)
INVERSE = (
    (r"^decoder\.embed_tokens\.layer_norm\.", "embed_layer_norm."),
    (r"^decoder\.embed_tokens\.", "embed_tokens."),
    (r"^decoder\.final_layer_norm\.", "norm."),
    (r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"layers.\1.input_layernorm."),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.", r"layers.\1.post_attention_layernorm."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.self_attn.o_proj."),
    (r"^decoder\.layers\.", "layers."),
)


# -- config.json -> spec ------------------------------------------------------------------------
def _rope_scaling(config: dict[str, Any], source: str | None) -> tuple[str, float]:
    """``rope_scaling`` as (type, factor); transformers accepts exactly {type, factor > 1}."""
    scaling = config.get("rope_scaling")
    if scaling is None:
        return "none", 1.0
    problem = None
    if not isinstance(scaling, dict) or set(scaling) != {"type", "factor"}:
        problem = f"must be a mapping with exactly 'type' and 'factor', got {reprlib.repr(scaling)}"
    elif scaling["type"] not in SCALINGS:
        problem = f"type must be one of {', '.join(SCALINGS)}, got {reprlib.repr(scaling['type'])}"
    elif not isinstance(scaling["factor"], (int, float)) or scaling["factor"] <= 1:
        problem = f"factor must be a number > 1, got {reprlib.repr(scaling['factor'])}"
    elif not math.isfinite(scaling["factor"]):  # NaN passes `<= 1`; both would break the context length
        problem = f"factor must be finite, got {scaling['factor']!r}"
    if problem:
        raise SpecValidationError([f"rope_scaling: {problem}"], source=source)
    return scaling["type"], float(scaling["factor"])


def _positions(config: dict[str, Any], source: str | None) -> tuple[dict[str, Any], int]:
    """The rotary params and the longest input optkit accepts.

    Scaling exists to run past the trained length, so a scaled model accepts
    ``factor * max_position_embeddings`` tokens; dynamic NTK starts past the trained length.
    """
    trained = config.get("max_position_embeddings", 2048)
    params: dict[str, Any] = {"theta": float(config.get("rope_theta", 10000.0))}
    kind, factor = _rope_scaling(config, source)
    if kind == "none":
        return params, trained
    params.update(scaling=kind, factor=factor, original_max_positions=trained)
    return params, int(trained * factor)


def _check_no_grouped_kv(config: dict[str, Any], source: str | None) -> None:
    """Open-Llama has one key/value head per query head; transformers' OpenLlama ignores a
    ``num_key_value_heads`` field, so a different value means the file is for another model."""
    heads, kv_heads = config.get("num_attention_heads", 32), config.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        raise SpecValidationError([f"num_key_value_heads: Open-Llama has no grouped-query attention (one key/value "
                                   f"head per query head, num_attention_heads={reprlib.repr(heads)}), got "
                                   f"{reprlib.repr(kv_heads)}; remove the field or set it to num_attention_heads, "
                                   f"or load the checkpoint as the family it was made for"], source=source)


def _head_params(config: dict[str, Any], head: str, num_labels: int | None) -> dict[str, Any]:
    g = config.get
    if head == "causal_lm":  # a shared embedding reads the table directly; tie_word_embeddings ties lm_head
        return {"tie_word_embeddings": bool(g("shared_input_output_embedding", True) or g("tie_word_embeddings", False))}
    if head == "sequence_classification":
        labels = num_labels or g("num_labels") or len(g("id2label") or {}) or 2
        return {"num_labels": labels, "problem_type": g("problem_type")}
    return {}


def spec_from_config(config: dict[str, Any], *, head: str = "causal_lm", num_labels: int | None = None,
                     source: str | None = None) -> ModelSpec:
    """An Open-Llama ``config.json`` as an optkit spec (every field that changes the forward)."""
    g = config.get
    _check_no_grouped_kv(config, source)
    rotary, max_positions = _positions(config, source)
    stable = g("use_stable_embedding", True)
    data = {
        "family": FAMILY,
        "decoder": {
            "vocab_size": g("vocab_size", 100000),
            "hidden_size": g("hidden_size", 4096),
            "num_layers": g("num_hidden_layers", 32),
            "num_heads": g("num_attention_heads", 32),
            "ffn_dim": g("intermediate_size", 11008),
            "max_positions": max_positions,
            "norm_position": "pre",
            "final_norm": True,
            "bias": False,
            "dropout": 0.0,  # hidden_dropout_prob acts inside the MLP only
            "attention_dropout": g("attention_dropout_prob", 0.1),
            "layerdrop": 0.0,
            "init_std": g("initializer_range", 0.02),
            "query_scaling": "scores",
            "token_embedding": {"name": "stable", "params": {"eps": STABLE_EPS}} if stable else {"name": "learned"},
            "positional_embedding": {"name": "rotary", "params": rotary},
            "mlp": {"name": "gated", "params": {"activation": g("hidden_act", "silu"),
                                                "dropout": g("hidden_dropout_prob", 0.1)}},
            "norm": {"name": "rmsnorm", "params": {"eps": g("rms_norm_eps", 1e-6)}},
        },
        "head": {"name": head, "params": _head_params(config, head, num_labels)},
        "tokens": {"pad_token_id": g("pad_token_id", 0), "bos_token_id": g("bos_token_id", 1),
                   "eos_token_id": g("eos_token_id", 2)},
    }
    return validate_spec(data, source=source)


# -- spec -> config.json ------------------------------------------------------------------------
EXPECTED = {"positional_embedding": ("rotary",), "mlp": ("gated",), "norm": ("rmsnorm",),
            "token_embedding": ("stable", "learned")}


def _save_problems(spec: ModelSpec) -> list[str]:
    """Why transformers' Open-Llama cannot express this spec (empty: it can)."""
    d = spec.decoder
    problems = [f"decoder.{kind}: '{getattr(d, kind).name}' has no Open-Llama equivalent (needs "
                f"{' or '.join(repr(n) for n in names)})"
                for kind, names in EXPECTED.items() if getattr(d, kind).name not in names]
    if d.token_embedding.name == "stable" and d.token_embedding.params.get("eps", STABLE_EPS) != STABLE_EPS:
        problems.append(f"decoder.token_embedding.params.eps: Open-Llama's stable-embedding LayerNorm eps is "
                        f"fixed at {STABLE_EPS}")
    fixed = {"query_scaling": "scores", "bias": False, "norm_position": "pre", "final_norm": True,
             "word_embed_proj_dim": None, "dropout": 0.0, "layerdrop": 0.0}
    why = {"dropout": " (Open-Llama drops out the MLP output only: use decoder.mlp.params.dropout)"}
    problems += [f"decoder.{field}: Open-Llama needs {value!r}{why.get(field, '')}"
                 for field, value in fixed.items() if getattr(d, field) != value]
    if spec.head.name not in HEAD_CLASSES:
        problems.append(f"head: '{spec.head.name}' has no transformers Open-Llama class "
                        f"({', '.join(HEAD_CLASSES)})")
    return problems


def _rope_fields(spec: ModelSpec) -> dict[str, Any]:
    d = spec.decoder
    rope = d.positional_embedding.params
    scaling = rope.get("scaling", "none")
    fields: dict[str, Any] = {"rope_theta": float(rope.get("theta", 10000.0)), "rope_scaling": None,
                              "max_position_embeddings": d.max_positions}
    if scaling != "none":
        fields["rope_scaling"] = {"type": scaling, "factor": float(rope["factor"])}
        fields["max_position_embeddings"] = rope.get("original_max_positions") or d.max_positions
    return fields


def config_from_spec(spec: ModelSpec, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The Open-Llama ``config.json`` transformers (4.31-4.57) needs to rebuild this model."""
    problems = _save_problems(spec)
    if problems:
        raise SpecValidationError(problems, source="save_pretrained (transformers Open-Llama config)")
    d = spec.decoder
    tied = spec.head.params.get("tie_word_embeddings", True) if spec.head.name == "causal_lm" else True
    config: dict[str, Any] = {
        "architectures": [HEAD_CLASSES[spec.head.name]],
        "model_type": MODEL_TYPE,
        "vocab_size": d.vocab_size,
        "hidden_size": d.hidden_size,
        "intermediate_size": d.ffn_dim,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "hidden_act": d.mlp.params.get("activation", "silu"),
        "initializer_range": d.init_std,
        "rms_norm_eps": d.norm.params.get("eps", 1e-6),
        "use_cache": True,
        "pad_token_id": spec.tokens.pad_token_id,
        "bos_token_id": spec.tokens.bos_token_id,
        "eos_token_id": spec.tokens.eos_token_id,
        "tie_word_embeddings": False,  # Open-Llama shares through shared_input_output_embedding instead
        # True would make transformers ignore the padding mask whenever it trains (xformers or not).
        "use_memory_efficient_attention": False,
        "hidden_dropout_prob": d.mlp.params.get("dropout", 0.0),
        "attention_dropout_prob": d.attention_dropout,
        "use_stable_embedding": d.token_embedding.name == "stable",
        "shared_input_output_embedding": bool(tied),
        **_rope_fields(spec),
    }
    return with_head_and_dtype(config, spec, dtype)


OPEN_LLAMA = (CheckpointFormat(
    model_type=MODEL_TYPE,
    family=FAMILY,
    spec_from_config=spec_from_config,
    config_from_spec=config_from_spec,
    renames=RENAMES,
    inverse=INVERSE,
    head_classes=HEAD_CLASSES,
    config_types=CONFIG_TYPES,
    tie_fields=("shared_input_output_embedding", "tie_word_embeddings"),
))
