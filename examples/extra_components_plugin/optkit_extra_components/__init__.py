"""Three non-attention components for optkit, registered from one hook (no core edit):

- ``mlp: geglu``: ``down(gelu(gate(x)) * up(x))`` (Shazeer 2020), projections from the spec's linear;
- ``norm: scaled_rmsnorm``: RMSNorm with a learned per-channel weight times a fixed ``scale``;
- ``positional_embedding: sinusoidal``: the fixed sine/cosine positions of "Attention Is All You Need",
  added to the token embeddings (no weights, so nothing to save for them).

None of them exists in transformers' OPT: a model using them is saved in optkit's own checkpoint format.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

import optkit
from optkit.interfaces import MLP, Norm, PositionalEmbedding

OPTKIT_PLUGIN_API = 1


class GeGLUParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    approximate: bool = Field(default=False, description="tanh approximation of GELU")


class GeGLU(MLP):
    """``down_proj(gelu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, approximate: bool):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.approximate = "tanh" if approximate else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


def geglu(params: GeGLUParams, ctx) -> GeGLU:
    d = ctx.decoder
    return GeGLU(gate_proj=ctx.linear(d.hidden_size, d.ffn_dim, bias=d.bias),
                 up_proj=ctx.linear(d.hidden_size, d.ffn_dim, bias=d.bias),
                 down_proj=ctx.linear(d.ffn_dim, d.hidden_size, bias=d.bias),
                 approximate=params.approximate)


class ScaledRMSNormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float = Field(default=1e-6, gt=0)
    scale: float = Field(default=1.0, gt=0, description="a fixed factor on top of the learned weight")


class ScaledRMSNorm(Norm):
    """``scale * weight * x / sqrt(mean(x^2) + eps)``, statistics in float32."""

    def __init__(self, dim: int, eps: float, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.scale = eps, scale

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (self.scale * h).to(x.dtype)


def scaled_rmsnorm(params: ScaledRMSNormParams, ctx) -> Callable[[int], ScaledRMSNorm]:
    return lambda dim: ScaledRMSNorm(dim, params.eps, params.scale)


class SinusoidalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: float = Field(default=10000.0, gt=1)


class Sinusoidal(PositionalEmbedding):
    """Fixed sine/cosine vectors added to the token embeddings; padding slots (position -1) get zeros.

    Computed from the ids on every call: no buffer, so a model built on "meta" and loaded has nothing
    left unfilled, and the checkpoint holds no tensor for it."""

    def __init__(self, dim: int, base: float, max_positions: int):
        super().__init__()
        self.dim, self.base, self.max_positions = dim, base, max_positions

    @property
    def position_range(self) -> tuple[int, int] | None:
        return (0, self.max_positions - 1)

    def additive(self, position_ids: Tensor) -> Tensor:
        half = self.dim // 2
        exponents = torch.arange(half, device=position_ids.device, dtype=torch.float32) / half
        angles = position_ids.clamp(min=0).to(torch.float32)[..., None] * self.base ** -exponents
        table = torch.cat([angles.sin(), angles.cos()], dim=-1)
        if self.dim % 2:
            table = F.pad(table, (0, 1))
        return table * (position_ids >= 0)[..., None]


def sinusoidal(params: SinusoidalParams, ctx) -> Sinusoidal:
    return Sinusoidal(ctx.decoder.embed_dim, params.base, ctx.decoder.max_positions)


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register("mlp", "geglu", geglu, params=GeGLUParams, description="GeGLU feed-forward block")
    registry.register("norm", "scaled_rmsnorm", scaled_rmsnorm, params=ScaledRMSNormParams,
                      description="RMSNorm times a fixed scale")
    registry.register("positional_embedding", "sinusoidal", sinusoidal, params=SinusoidalParams,
                      description="fixed sine/cosine positions, added")
