"""Attention kernel interface: compute only, no parameters.

The core owns q/k/v/out projections and the mask; a kernel only turns
``(q, k, v, mask)`` into the attention output. That is what makes kernels
swappable without touching a single checkpoint key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

from torch import Tensor, nn

from optkit.interfaces.mask import AttentionMask


class AttentionResult(NamedTuple):
    output: Tensor  # (batch, heads, q_len, head_dim)
    weights: Tensor | None  # (batch, heads, q_len, kv_len) when requested and supported


class AttentionKernel(nn.Module, ABC):
    """Computes softmax(scale * q k^T, masked) v.

    Tensors arrive as ``(batch, heads, len, head_dim)``. ``scale`` is what the kernel
    must apply to the scores: OPT pre-scales q in the core and passes ``scale=1.0``.
    Fully masked query rows must come out as zeros, never NaN.
    """

    name: str = "?"

    @abstractmethod
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: AttentionMask,
        *,
        scale: float,
        dropout_p: float = 0.0,
        need_weights: bool = False,
    ) -> AttentionResult: ...

    def extra_repr(self) -> str:
        return f"backend={self.name!r}"
