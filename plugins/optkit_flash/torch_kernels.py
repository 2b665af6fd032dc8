"""The FlashAttention-2 kernels that PyTorch ships, as a `FlashBackend` (``implementation="torch"``).

Why: flash-attn 2 is a source build and FA4 is Hopper/Blackwell only, but every CUDA build of torch already
contains FlashAttention-2 behind ``scaled_dot_product_attention``. Its ATen op ``_flash_attention_forward`` is
both entry points at once (schema read on torch 2.13; the positional arguments and ``scale`` used here are
the same since at least torch 2.5)::

    _flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                             return_debug_mask, *, scale=None, ...) -> (output, logsumexp, rng_state, unused, debug)

* dense: ``cum_seq_q = cum_seq_k = None``, q/k/v ``(B, T, H, D)``;
* varlen: int32 ``cu_seqlens`` and the per-call maxima, q/k/v packed ``(total, H, D)``, the flash-attn layout.

``is_causal`` is aligned bottom-right as in flash-attn >= 2.1 (torch's ``flash_attn/mask.h`` limits query ``i`` to
keys ``< i + 1 + seqlen_k - seqlen_q``, and ``torch.nn.attention.bias.causal_lower_right`` calls the flash kernel
with ``is_causal=True``), so the varlen plans of `varlen.py` apply unchanged. The op has an autograd formula
(``FlashAttentionBackward0`` -> ``_flash_attention_backward``), so training works; dropout is the kernel's own.

The memory-efficient kernel (``_efficient_attention_forward``) is not used: the plugin declares fp16/bf16 on
compute capability >= 8.0, where flash is the faster of the two; fp32 and older GPUs are ``sdpa``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .inputs import require_half_on_cuda
from .varlen import Segments

MIN_CAPABILITY = (8, 0)


def missing_reason() -> str | None:
    """Why this torch has no flash kernels of its own, or None when it has them (a build property, no GPU needed)."""
    if torch.version.cuda is None:
        kind = "a ROCm build" if getattr(torch.version, "hip", None) else "a CPU-only build"
        return f"torch {torch.__version__} has no CUDA flash kernels of its own ({kind})"
    available = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    if available is not None and not available():
        return f"torch {torch.__version__} was built without flash attention"
    return None


@dataclass(frozen=True)
class TorchKernels:
    """torch's ``aten::_flash_attention_forward`` in the `FlashBackend` convention; ``forward`` is injectable."""

    label: str = field(default_factory=lambda: f"torch {torch.__version__} flash kernels")
    forward: Callable[..., Any] = torch.ops.aten._flash_attention_forward

    def validate(self, query: Tensor, dropout_p: float) -> None:
        require_half_on_cuda(self.label, query)

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, dropout_p: float) -> Tensor:
        return self.forward(q, k, v, None, None, q.shape[1], k.shape[1], dropout_p, causal, False, scale=scale)[0]

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, seg: Segments, *, scale: float, dropout_p: float) -> Tensor:
        return self.forward(q, k, v, seg.cu_seqlens_q, seg.cu_seqlens_k, seg.max_seqlen_q, seg.max_seqlen_k,
                            dropout_p, seg.causal, False, scale=scale)[0]
