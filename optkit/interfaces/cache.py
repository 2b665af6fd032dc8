"""KV cache interface: where attention keys/values of past tokens live."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor


class KVCache(ABC):
    """Per-layer key/value storage, ``(batch, heads, len, head_dim)`` per layer.

    ``update`` stores the new keys/values of one layer and returns everything that
    layer's queries attend over. The past length advances per layer, so every layer of
    one forward sees the same offset. Subclass it (checked with ``isinstance`` when a cache is made);
    a cache with a ``max_length`` raises ``InputError`` when an update does not fit.
    """

    @abstractmethod
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens stored so far for ``layer_idx`` (the offset of the next query)."""

    @abstractmethod
    def attended_length(self, new_tokens: int) -> int:
        """Length of the keys ``update`` will return after adding ``new_tokens``."""

    @abstractmethod
    def update(self, layer_idx: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]: ...

    @property
    def max_length(self) -> int | None:
        """Capacity in tokens, or None when the cache grows without bound."""
        return None

    def follow(self, slot: Tensor | None) -> None:
        """Write new tokens at the device index ``slot`` (a 1-element long tensor) instead of a Python offset.

        The CUDA-graph decode path keeps the write position on the device so a captured step stays
        right on replay; None goes back to Python offsets. Only caches that declare
        ``cuda_graphs`` need it.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot write at a device-side position")

    def reorder(self, beam_idx: Tensor) -> None:
        """Select batch rows (beam search)."""
        raise NotImplementedError(f"{type(self).__name__} cannot reorder its batch")

    def reset(self) -> None:
        """Forget every stored token but keep the memory, so the cache can serve a new sequence.

        Optional: ``optkit.inference`` keeps a captured decode step (and its cache) for the next
        ``generate`` call only when the cache implements this.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be reset; make a new one")

    @classmethod
    def can_reset(cls) -> bool:
        """Whether this cache class implements :meth:`reset`."""
        return cls.reset is not KVCache.reset


class KVCacheFactory(Protocol):
    """What a ``kv_cache`` registration builds: a recipe for fresh caches. Every call returns a new, empty
    ``KVCache`` that shares no storage with earlier ones (the conformance kit checks this).

    ``layer_devices`` (one per layer) is where each layer computes when a device map spreads the model
    (``Model.new_cache`` passes it for a dispatched model); a cache keeps each layer's keys and values
    there. None: every layer on ``device``.
    """

    def __call__(
        self, *, batch_size: int, max_length: int | None, max_positions: int, num_layers: int, num_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device, layer_devices: Sequence[torch.device] | None = None,
    ) -> KVCache: ...
