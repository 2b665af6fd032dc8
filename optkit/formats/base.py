"""What a checkpoint format is: how one family's ``config.json`` and key names map to optkit.

A format is data plus two small functions. Formats are registered like components, through the
plugin hook (``registry.register_format(fmt)``), so a family from a third-party plugin brings its
own; ``optkit.formats`` looks them up in a registry.
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from typing import TYPE_CHECKING

from optkit.errors import CheckpointError

if TYPE_CHECKING:
    from optkit.spec import ModelSpec

# transformers' names for the task heads' weights (OPTForCausalLM.lm_head, ...ForSequenceClassification.score,
# ...ForQuestionAnswering.qa_outputs); a format may name others.
TRANSFORMERS_HEAD_PREFIXES = ("lm_head", "score", "qa_outputs")

# JSON kinds a config field may have: int (not bool), float (any number), bool, str, dict, list, None (null).
Kinds = tuple[Any, ...]
INT: Kinds = (int,)
NUMBER: Kinds = (float,)
BOOL: Kinds = (bool,)
STR: Kinds = (str,)
# Fields every family reads the same way (heads and special tokens).
COMMON_CONFIG_TYPES: dict[str, Kinds] = {
    "tie_word_embeddings": BOOL, "num_labels": INT, "id2label": (dict,), "problem_type": (str, None),
    "pad_token_id": (int, None), "bos_token_id": (int, None), "eos_token_id": (int, None),
}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
               list: "a list", None: "null"}


def _fits(value: Any, kinds: Kinds) -> bool:
    """Whether a JSON value has one of the kinds (true/false never counts as a number)."""
    for kind in kinds:
        if kind is None:
            if value is None:
                return True
        elif isinstance(value, bool):
            if kind is bool:
                return True
        elif kind is float and isinstance(value, (int, float)) or kind is not float and isinstance(value, kind):
            return True
    return False


def _as_json(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 120 else text[:117] + "..."


def check_config_types(config: dict[str, Any], types: dict[str, Kinds], source: str | None) -> None:
    """One CheckpointError naming every config field whose JSON type is wrong (``"yes"`` for a boolean...).

    Values of the right type but out of range are the spec's to judge (SpecValidationError).
    """
    problems = [f"field '{name}' must be {' or '.join(_KIND_NAMES[k] for k in kinds)}, got {_as_json(config[name])}"
                for name, kinds in types.items() if name in config and not _fits(config[name], kinds)]
    if problems:
        raise CheckpointError(f"{source or 'config.json'}: " + "; ".join(problems) + ". Fix the field(s) in the file")


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
    config_types: dict[str, Kinds] = field(default_factory=dict)  # config.json field -> the JSON kinds it may have
    head_prefixes: tuple[str, ...] = TRANSFORMERS_HEAD_PREFIXES  # module names of task heads' weights in files
    tie_fields: tuple[str, ...] = ("tie_word_embeddings",)  # config.json fields that tie the LM head to the embedding

    def check_config(self, config: dict[str, Any], source: str | None = None) -> None:
        """Refuse config fields of the wrong JSON type, naming the file and each field."""
        check_config_types(config, {**COMMON_CONFIG_TYPES, **self.config_types}, source)

    def optkit_key(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = re.sub(pattern, replacement, key)
        return key

    def hf_key(self, key: str) -> str:
        for pattern, replacement in self.inverse:
            key = re.sub(pattern, replacement, key)
        return key


def with_head_and_dtype(config: dict[str, Any], spec: ModelSpec, dtype: torch.dtype | None) -> dict[str, Any]:
    """The config fields transformers' task heads share (classification labels) and the weights' dtype."""
    if spec.head.name == "sequence_classification":
        labels = spec.head.params.get("num_labels", 2)
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
        if spec.head.params.get("problem_type"):
            config["problem_type"] = spec.head.params["problem_type"]
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config
