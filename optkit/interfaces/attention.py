"""Attention kernel interface: compute only, no parameters.

The core owns q/k/v/out projections and the mask; a kernel only turns
``(q, k, v, mask)`` into the attention output. That is what makes kernels
swappable without touching a single checkpoint key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import math
from typing import NamedTuple

from torch import Tensor, nn

from optkit.interfaces.mask import AttentionMask


def is_power_of_two(scale: float) -> bool:
    """Scaling by a power of two is exact in floating point: q * scale and (q k^T) * scale give the
    same bits, so the scale may be applied to whichever is cheaper (or safer for fp16 range)."""
    return scale > 0 and math.frexp(scale)[0] == 0.5


class AttentionResult(NamedTuple):
    output: Tensor  # (batch, heads, q_len, head_dim)
    weights: Tensor | None  # (batch, heads, q_len, kv_len) when requested and supported; after dropout


class AttentionKernel(nn.Module, ABC):
    """Computes softmax(scale * q k^T, masked) v.

    Tensors arrive as ``(batch, heads, len, head_dim)``. ``scale`` is what the kernel
    must apply to the scores: the reference OPT block pre-scales q and passes ``scale=1.0``; the
    prepared block (``optkit.inference``) passes ``head_dim**-0.5`` instead when that is a power of
    two (bit-identical), and ``query_scaling: scores`` specs always pass it.
    Fully masked query rows must come out as zeros, never NaN.

    ``need_weights=True`` (only when the registration declares ``attention_weights``): return the
    probabilities *after* dropout, the tensor that multiplies v -- eager's (and transformers' eager OPT's)
    behaviour; with ``dropout_p > 0`` the kept ones carry the 1/(1-p) scale. Subclass it (checked with
    ``isinstance``); a kernel owns no parameters.
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
