"""Checkpoint formats: how one model family's ``config.json`` and key names map to optkit.

A format is data plus two small functions; adding a family adds a format, never an
edit to the loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from optkit.errors import CheckpointError
from optkit.spec import ModelSpec

HEAD_PREFIXES = ("lm_head", "score", "qa_outputs")


@dataclass(frozen=True)
class CheckpointFormat:
    """transformers' layout of one family.

    ``renames`` map keys (after stripping the ``model.`` prefix) to optkit module paths;
    each pair is (transformers regex, optkit replacement) and must be invertible by
    ``inverse`` pairs for saving.
    """

    model_type: str
    family: str
    spec_from_config: Callable[..., ModelSpec]
    config_from_spec: Callable[[ModelSpec, torch.dtype | None], dict[str, Any]]
    renames: tuple[tuple[str, str], ...] = ()
    inverse: tuple[tuple[str, str], ...] = ()
    head_classes: dict[str, str] = field(default_factory=dict)

    def optkit_key(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = re.sub(pattern, replacement, key)
        return key

    def hf_key(self, key: str) -> str:
        for pattern, replacement in self.inverse:
            key = re.sub(pattern, replacement, key)
        return key


FORMATS: dict[str, CheckpointFormat] = {}


def with_head_and_dtype(config: dict[str, Any], spec: ModelSpec, dtype: torch.dtype | None) -> dict[str, Any]:
    """The config fields every family shares: classification labels and the weights' dtype."""
    if spec.head.name == "sequence_classification":
        labels = spec.head.params.get("num_labels", 2)
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
        if spec.head.params.get("problem_type"):
            config["problem_type"] = spec.head.params["problem_type"]
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    FORMATS[fmt.model_type] = fmt
    return fmt


def _load_builtin() -> None:
    from optkit.formats import opt  # noqa: F401

    try:
        from optkit.formats import open_llama  # noqa: F401
    except ImportError:
        pass


def format_for_config(config: dict[str, Any], source: str | None = None) -> CheckpointFormat:
    _load_builtin()
    model_type = config.get("model_type")
    if model_type not in FORMATS:
        raise CheckpointError(f"{source or 'config.json'}: model_type is {model_type!r}; optkit loads "
                              + ", ".join(repr(m) for m in sorted(FORMATS)) + " checkpoints")
    return FORMATS[model_type]


def format_for_spec(spec: ModelSpec) -> CheckpointFormat:
    _load_builtin()
    for fmt in FORMATS.values():
        if fmt.family == spec.family:
            return fmt
    raise CheckpointError(f"family: no checkpoint format for '{spec.family}' "
                          f"(formats: {', '.join(f.family for f in FORMATS.values())})")
