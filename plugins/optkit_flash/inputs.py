"""What every flash implementation accepts: half precision on CUDA (checked per call, one message for all)."""

from __future__ import annotations

import torch
from torch import Tensor

from optkit.errors import BackendUnavailableError

HALF_DTYPES = (torch.float16, torch.bfloat16)


def require_half_on_cuda(label: str, query: Tensor) -> None:
    """Refuse fp32 or CPU inputs naming the implementation (``label``) and the fix."""
    if query.device.type != "cuda" or query.dtype not in HALF_DTYPES:
        raise BackendUnavailableError(
            f"attention 'flash' ({label}) runs float16/bfloat16 on CUDA; got {query.dtype} on "
            f"{query.device.type}: build the model with dtype=torch.float16 or torch.bfloat16 on cuda, "
            "or use attention='sdpa'")
