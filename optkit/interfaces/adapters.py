"""What an adapter (LoRA and the like) may rely on from the linear it wraps, and what it offers back.

An adapter wraps whatever linear the spec chose -- torch, int8, oneDNN, a third party's -- so it may use
only this: the linear's ``in_features``/``out_features`` and its forward. Merging the adapter into the
base needs the base's weight in floating point, which a quantized linear must provide (or refuse with a
reason) through :class:`MergeableLinear`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class WrappableLinear(Protocol):
    """Any registered linear: sizes and a forward; nothing about how its weight is stored."""

    in_features: int
    out_features: int

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class MergeableLinear(Protocol):
    """A linear whose weight can be read and rewritten in floating point (for merging a low-rank delta)."""

    def dense_weight(self) -> Tensor:
        """The weight as a float tensor ``(out_features, in_features)`` (dequantized if stored otherwise)."""
        ...

    def set_dense_weight(self, weight: Tensor) -> None:
        """Store ``weight`` (re-quantizing if the layer is quantized)."""
        ...


@runtime_checkable
class LinearAdapter(Protocol):
    """A module that wraps a linear (``base``) and adds a trainable delta to its output."""

    base: nn.Module

    @property
    def adapter_names(self) -> list[str]:
        """The adapters this wrapper holds, in the order they were added (what a checkpoint must describe)."""
        ...

    def merge(self) -> None:
        """Fold the delta into ``base`` (needs a :class:`MergeableLinear` base)."""
        ...

    def unmerge(self) -> None:
        """Take a merged delta out of ``base`` again."""
        ...


def held_adapters(model: nn.Module) -> list[str]:
    """Every adapter the model's linear wrappers hold (:class:`LinearAdapter`), in the order they were added:
    what the core asks (e.g. before saving) without knowing the adapters room."""
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, LinearAdapter):
            names.update(dict.fromkeys(module.adapter_names))
    return list(names)
