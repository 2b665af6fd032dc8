"""The typed attention mask the core hands every attention backend.

A backend is never handed "no mask" to mean "unmasked": it always receives an
`AttentionMask` that says what is causal, which keys are padding and where the
queries sit relative to the keys (the cache offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class cached_property:  # noqa: N801 - a drop-in for functools'
    """functools.cached_property without its lock: Python < 3.12 takes an RLock there, which
    torch.compile cannot trace (each use would break the compiled decode step's graph)."""

    def __init__(self, compute):
        self.compute, self.name = compute, compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)  # later reads find it first
        return value


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """Which keys each query may attend to.

    Query ``i`` sits at absolute key position ``q_offset + i``. With ``causal`` it may see
    keys ``j <= q_offset + i``; ``key_padding`` (``(batch, kv_len)``, True = real token)
    removes padded keys; None means no key is padding.

    Query rows that may see no key at all (padded positions in a left-padded batch)
    produce a zero output in every backend: a defined value, never NaN.
    """

    batch_size: int
    q_len: int
    kv_len: int
    q_offset: int = 0
    key_padding: Tensor | None = None
    causal: bool = True
    every_query_sees_a_key: bool = False  # a promise (decode steps): skips a check that syncs with the device

    def __post_init__(self) -> None:
        if self.key_padding is not None:
            if self.key_padding.dtype != torch.bool:
                raise TypeError("AttentionMask.key_padding must be a bool tensor (True = real token)")
            if tuple(self.key_padding.shape) != (self.batch_size, self.kv_len):
                raise ValueError(
                    f"AttentionMask.key_padding has shape {tuple(self.key_padding.shape)}, "
                    f"expected (batch, kv_len) = ({self.batch_size}, {self.kv_len})"
                )
        if self.q_offset < 0 or (self.causal and self.q_offset + self.q_len > self.kv_len):
            raise ValueError(
                f"AttentionMask: queries at {self.q_offset}..{self.q_offset + self.q_len - 1} "
                f"do not fit in {self.kv_len} keys"
            )

    @property
    def device(self) -> torch.device | None:
        return None if self.key_padding is None else self.key_padding.device

    @property
    def has_padding(self) -> bool:
        return self.key_padding is not None

    @property
    def is_plain_causal(self) -> bool:
        """Square causal attention without padding: kernels' fastest path."""
        return self.causal and self.key_padding is None and self.q_offset == 0 and self.q_len == self.kv_len

    @property
    def sees_every_key(self) -> bool:
        """Every query may attend to every key (e.g. one decode step without padding)."""
        causal_free = not self.causal or self.q_offset + 1 >= self.kv_len and self.q_len == 1
        return causal_free and self.key_padding is None

    def allowed(self, device: torch.device | str | None = None) -> Tensor:
        """Boolean ``(batch|1, 1, q_len, kv_len)``: True where the query may attend."""
        if device is None or torch.device(device) == self._allowed.device:
            return self._allowed
        device = torch.device(device)
        if device not in self._moved:  # built on the host (no padding tensor to say where): copy once per mask
            self._moved[device] = self._allowed.to(device)
        return self._moved[device]

    @cached_property
    def _moved(self) -> dict[torch.device, Tensor]:
        return {}

    @cached_property
    def _allowed(self) -> Tensor:
        device = self.device
        allowed = torch.ones(1, 1, self.q_len, self.kv_len, dtype=torch.bool, device=device)
        if self.causal:
            q_pos = torch.arange(self.q_len, device=device)[:, None] + self.q_offset
            k_pos = torch.arange(self.kv_len, device=device)[None, :]
            allowed = allowed & (k_pos <= q_pos)
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, None, :]
        return allowed

    @cached_property
    def query_has_keys(self) -> Tensor:
        """``(batch|1, 1, q_len, 1)``: False for rows that may attend to nothing."""
        return self._allowed.any(dim=-1, keepdim=True)

    @cached_property
    def has_empty_rows(self) -> bool:
        if self.key_padding is None or self.every_query_sees_a_key:
            return False  # causal rows always see at least their own key
        return not bool(self.query_has_keys.all())

    def additive(self, dtype: torch.dtype) -> Tensor:
        """Float mask **in** ``dtype``, shape ``(batch or 1, 1, q_len, kv_len)``: 0 where allowed,
        ``finfo(dtype).min`` elsewhere (transformers' eager form). Pass the scores' dtype, add it to the
        scores; fully masked rows still need zeroing after softmax.

        Computed once per dtype and shared by all layers (a boolean mask is converted by SDPA in every call).
        """
        if dtype not in self._additive:
            zero = torch.zeros((), dtype=dtype, device=self.device)
            self._additive[dtype] = torch.where(self._allowed, zero, torch.finfo(dtype).min)
        return self._additive[dtype]

    @cached_property
    def _additive(self) -> dict[torch.dtype, Tensor]:
        return {}
