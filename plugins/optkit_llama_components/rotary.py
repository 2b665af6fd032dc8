"""Rotary position embeddings (RoPE), half-split layout, with linear and dynamic-NTK scaling.

Nothing is cached between calls: the tables are recomputed from ``position_ids`` every
time, so the result is a pure function of the positions (transformers keeps an enlarged
dynamic-NTK base after one long input; see docs/open-llama.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from optkit.errors import SpecValidationError
from optkit.interfaces import PositionalEmbedding, ShardStyle

Scaling = Literal["none", "linear", "dynamic"]


class RotaryParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    theta: float = Field(default=10000.0, gt=0, description="the base of the frequencies (rope_theta)")
    scaling: Scaling = Field(default="none", description="linear: positions / factor; dynamic: NTK-aware base")
    factor: float = Field(default=1.0, gt=0, description="rope_scaling.factor; > 1 when scaling is used")
    original_max_positions: int | None = Field(
        default=None, gt=0,
        description="the length trained on (config max_position_embeddings); dynamic scaling starts past it. "
                    "Default: decoder.max_positions")

    @model_validator(mode="after")
    def _factor_fits_scaling(self) -> "RotaryParams":
        if self.scaling == "none" and self.factor != 1.0:
            raise ValueError("factor is used only with scaling 'linear' or 'dynamic'")
        if self.scaling != "none" and self.factor <= 1.0:
            raise ValueError(f"scaling '{self.scaling}' needs a factor > 1, got {self.factor}")
        return self


def inverse_frequencies(base: float, dim: int, device: torch.device | None = None) -> Tensor:
    """``1 / base^(2i/dim)`` in fp32, written as transformers writes it so the bits agree."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (base ** exponents)


def ntk_base(theta: float, factor: float, length: int, original: int, dim: int) -> float:
    """Dynamic-NTK base for a sequence of ``length`` tokens; ``theta`` up to the original length."""
    if length <= original:
        return theta
    return theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))


def rotate_half(x: Tensor) -> Tensor:
    """Half-split layout: (x1, x2) -> (-x2, x1), not the interleaved pairs of the original paper."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(PositionalEmbedding):
    """Rotates q and k by position-dependent angles; adds nothing to the hidden states.

    ``rotate`` runs before the KV cache, so the cache holds rotated keys and each call
    sees only the positions of its new tokens.
    """

    def __init__(self, head_dim: int, theta: float, scaling: str, factor: float, original_max_positions: int):
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.factor = head_dim, theta, scaling, factor
        self.max_positions = original_max_positions

    def rotate(self, query: Tensor, key: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos_sin(position_ids, query.dtype)
        return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin

    def tp_plan(self) -> dict[str, ShardStyle]:
        """No weights; rotates each head on its own, so it works on a rank's local heads unchanged."""
        return {"": "replicate"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: rotation is per head."""

    def cos_sin(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(batch, 1, length, head_dim)`` tables, computed in fp32 and cast to ``dtype``."""
        positions = position_ids.to(torch.float32)
        if self.scaling == "linear":
            positions = positions / self.factor
        angles = positions.unsqueeze(-1) * self.frequencies(position_ids)
        table = torch.cat((angles, angles), dim=-1)
        return table.cos().to(dtype).unsqueeze(1), table.sin().to(dtype).unsqueeze(1)

    def frequencies(self, position_ids: Tensor) -> Tensor:
        """``(head_dim/2,)``; with dynamic scaling past the original length, ``(batch, 1, head_dim/2)``.

        Dynamic NTK takes the current length of each row as ``max(position_ids) + 1``: the
        whole input without a cache, the sequence so far with one (the new tokens' positions).
        """
        device = position_ids.device
        if self.scaling != "dynamic":
            return inverse_frequencies(self.theta, self.head_dim, device)
        lengths = position_ids.reshape(-1, position_ids.shape[-1]).amax(dim=-1) + 1
        if int(lengths.max()) <= self.max_positions:
            return inverse_frequencies(self.theta, self.head_dim, device)
        per_length = {n: inverse_frequencies(ntk_base(self.theta, self.factor, n, self.max_positions, self.head_dim),
                                             self.head_dim, device) for n in set(lengths.tolist())}
        return torch.stack([per_length[n] for n in lengths.tolist()]).unsqueeze(1)

    def extra_repr(self) -> str:
        scaled = "" if self.scaling == "none" else f", scaling={self.scaling}, factor={self.factor}"
        return f"head_dim={self.head_dim}, theta={self.theta}{scaled}, original_max_positions={self.max_positions}"


def rotary(params: RotaryParams, ctx) -> RotaryEmbedding:
    d = ctx.decoder
    if d.head_dim % 2:
        raise SpecValidationError([f"decoder.positional_embedding: rotary needs an even head_dim, got "
                                   f"{d.head_dim} (hidden_size {d.hidden_size} / num_heads {d.num_heads})"])
    if params.scaling == "dynamic" and d.head_dim < 4:  # the NTK exponent head_dim / (head_dim - 2)
        raise SpecValidationError([f"decoder.positional_embedding.params.scaling: dynamic NTK needs head_dim >= 4, "
                                   f"got {d.head_dim} (hidden_size {d.hidden_size} / num_heads {d.num_heads}); "
                                   f"use fewer heads or scaling 'linear'"])
    return RotaryEmbedding(d.head_dim, params.theta, params.scaling, params.factor,
                           params.original_max_positions or d.max_positions)
