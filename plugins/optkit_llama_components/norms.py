"""RMSNorm as LLaMA-family checkpoints define it."""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from optkit.interfaces import Norm, ShardStyle


class RMSNormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float = Field(default=1e-6, gt=0, description="added to the mean square (Open-Llama V1: 1e-6, V2: 1e-5)")


class RMSNorm(Norm):
    """``weight * x / sqrt(mean(x^2) + eps)``: no mean subtraction and no bias.

    The statistics are taken in fp32 and the normalized value is cast back to the input
    dtype *before* the weight multiplies it, exactly as transformers' LLaMA/Open-Llama do;
    in fp16 the order changes the rounding, so it is part of the definition.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Normalises whole hidden vectors: every tensor-parallel rank keeps all of it."""
        return {"": "replicate"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: kept whole."""

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rmsnorm(params: RMSNormParams, ctx) -> Callable[[int], RMSNorm]:
    return lambda dim: RMSNorm(dim, params.eps)
