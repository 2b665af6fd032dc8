"""ModelOutput: attribute access like transformers' outputs, plus ``out[0]`` / ``out["logits"]``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from optkit.interfaces.cache import KVCache


class _Fields:
    """transformers' output access: attributes, ``out[0]`` (first set field), ``out["name"]``, ``"name" in out``."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r} is not set in this output (set: {', '.join(self.keys())})")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.keys()


@dataclass
class ModelOutput(_Fields):
    loss: Tensor | None = None
    logits: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class GenerateOutput(_Fields):
    """``generate(..., return_dict_in_generate=True)``: transformers' GenerateDecoderOnlyOutput fields."""

    sequences: Tensor  # prompt + new ids, (rows, length)
    scores: tuple[Tensor, ...] | None = None  # per new token: scores after the processors, (rows, vocab)
    logits: tuple[Tensor, ...] | None = None  # per new token: the raw next-token logits, (rows, vocab)
    attentions: tuple[Any, ...] | None = None  # never recorded by optkit (kept for transformers' field names)
    hidden_states: tuple[Any, ...] | None = None  # never recorded by optkit
    past_key_values: KVCache | None = None  # not returned: optkit's cache is preallocated per call


class ConfigView(Mapping[str, Any]):
    """``model.config`` for transformers users: the config.json fields as read-only attributes.

    The spec is the truth; this is a view of it, so setting a field is an error that says how to change the
    model instead (transformers would accept the value and silently not rebuild anything).
    """

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"model.config has no field {name!r} (fields: {', '.join(self._values)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        from optkit.errors import InputError

        raise InputError(f"model.config is a read-only view of model.spec; to change {name}, edit the spec and "
                         "rebuild (optkit.build), or for generation settings assign model.generation_config")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        return f"ConfigView({self._values!r})"
