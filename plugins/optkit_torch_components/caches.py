"""KV caches: a growing one, and a preallocated one updated in place (CUDA-graph friendly)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from optkit.errors import InputError
from optkit.interfaces import KVCache


def check_rows(kind: str, held: int, given: int) -> None:
    """A cache serves the batch it was filled (or made) for: another row count is the caller's mistake,
    named here instead of failing deep inside a reshape or a concatenation."""
    if held != given:
        raise InputError(f"the {kind} KV cache holds {held} row(s) but this forward has {given}; pass a cache made "
                         f"for this batch (model.new_cache({given}, ...))")


class DynamicCache(KVCache):
    """Concatenates new keys/values per layer; memory grows with the sequence.

    With ``layer_devices`` each layer's keys and values are kept on its device (where the layer computes,
    so normally they arrive there already).
    """

    def __init__(self, num_layers: int, layer_devices: Sequence[torch.device] | None = None):
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.layer_devices = list(layer_devices) if layer_devices is not None else None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[-2]

    def attended_length(self, new_tokens: int) -> int:
        return self.get_seq_length() + new_tokens

    def update(self, layer_idx: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.layer_devices is not None:
            key, value = key.to(self.layer_devices[layer_idx]), value.to(self.layer_devices[layer_idx])
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            check_rows("dynamic", self.keys[layer_idx].shape[0], key.shape[0])
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reorder(self, beam_idx: Tensor) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                index = beam_idx.to(k.device)
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)


class StaticCache(KVCache):
    """Fixed ``(batch, heads, max_length, head_dim)`` buffers per layer, written in place.

    ``update`` returns views of the written prefix, so attention never reads unwritten slots. When it
    follows a device-side slot (CUDA-graph decoding) it returns all ``max_length`` slots and the
    caller's mask keeps the unwritten ones out. ``layer_devices`` puts each layer's buffers where that
    layer computes (a model spread over devices); otherwise all are on ``device``.
    """

    def __init__(self, *, batch_size: int, max_length: int, num_layers: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, layer_devices: Sequence[torch.device] | None = None):
        shape = (batch_size, num_heads, max_length, head_dim)
        devices = list(layer_devices) if layer_devices is not None else [device] * num_layers
        if len(devices) != num_layers:
            raise InputError(f"layer_devices names {len(devices)} device(s) for {num_layers} layers; give one per layer")
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.lengths = [0] * num_layers
        self._max_length = max_length
        self._slot: Tensor | None = None  # device-side write position (CUDA-graph decoding)

    @property
    def max_length(self) -> int:
        return self._max_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def attended_length(self, new_tokens: int) -> int:
        return self._max_length if self._slot is not None else self.lengths[0] + new_tokens

    def follow(self, slot: Tensor | None) -> None:
        self._slot = slot

    def update(self, layer_idx: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        check_rows("static", self.keys[layer_idx].shape[0], key.shape[0])
        if self._slot is not None:  # the caller keeps the position in range (and advances it)
            index = self._slot if key.shape[-2] == 1 else self._slot + torch.arange(key.shape[-2], device=key.device)
            index = index.to(self.keys[layer_idx].device)
            self.keys[layer_idx].index_copy_(2, index, key)
            self.values[layer_idx].index_copy_(2, index, value)
            return self.keys[layer_idx], self.values[layer_idx]
        start, length = self.lengths[layer_idx], key.shape[-2]
        if start + length > self._max_length:
            raise InputError(f"the KV cache holds {self._max_length} tokens; {start} stored + {length} new "
                             "do not fit (create it with a larger max_length)")
        self.keys[layer_idx][:, :, start:start + length].copy_(key)
        self.values[layer_idx][:, :, start:start + length].copy_(value)
        self.lengths[layer_idx] = start + length
        # The written prefix only (a view): unwritten slots are never read, and an unpadded decode step
        # needs no mask at all. The device-position mode above returns every slot (a graph's shapes are fixed).
        return self.keys[layer_idx][:, :, :start + length], self.values[layer_idx][:, :, :start + length]

    def reorder(self, beam_idx: Tensor) -> None:
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def reset(self) -> None:
        """Empty again, slots zeroed: a step following a device slot reads every slot (masked), and a masked
        inf or nan left by an earlier sequence (an fp16 overflow) would still turn its output into nan."""
        for buffer in (*self.keys, *self.values):
            buffer.zero_()
        self.lengths = [0] * len(self.lengths)
        self._slot = None


class StaticCacheParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_length: int | None = Field(default=None, gt=0, description="capacity; default: the model's max positions")


def dynamic_cache(params, ctx):
    def make(*, num_layers: int, layer_devices: Sequence[torch.device] | None = None, **_: object) -> DynamicCache:
        return DynamicCache(num_layers, layer_devices)

    return make


def static_cache(params: StaticCacheParams, ctx):
    def make(*, max_length: int | None, max_positions: int, **shape: object) -> StaticCache:
        return StaticCache(max_length=max_length or params.max_length or max_positions, **shape)

    return make
