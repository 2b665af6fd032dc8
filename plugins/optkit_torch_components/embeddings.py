"""Token and learned positional embeddings (OPT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from optkit.interfaces import PositionalEmbedding, TokenEmbedding, ShardStyle


class LearnedTokenEmbedding(TokenEmbedding):
    """A plain lookup table; no scaling and no dropout, as in OPT."""

    def __init__(self, vocab_size: int, embedding_dim: int, padding_idx: int | None, init_std: float):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(vocab_size, embedding_dim))
        nn.init.normal_(self.weight, std=init_std)
        if padding_idx is not None:
            with torch.no_grad():
                self.weight[padding_idx].zero_()

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx)

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Each rank holds a slice of the vocabulary ("" is the module itself)."""
        return {"": "vocab"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: ids outside a rank's slice are masked by the parallel style."""

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.embedding_dim}, padding_idx={self.padding_idx}"


class LearnedPositionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    offset: int = Field(default=2, ge=0, description="rows reserved before position 0 (OPT: 2)")


class LearnedPositionalEmbedding(PositionalEmbedding):
    """OPT's table of ``max_positions + offset`` rows; padding slots (position -1) use row offset-1."""

    def __init__(self, max_positions: int, dim: int, offset: int, init_std: float):
        super().__init__()
        self.max_positions, self.offset = max_positions, offset
        self.weight = nn.Parameter(torch.empty(max_positions + offset, dim))
        nn.init.normal_(self.weight, std=init_std)

    @property
    def position_range(self) -> tuple[int, int]:
        """Valid position ids (-1: padding); the model checks user-given ones against it."""
        return -1, self.max_positions - 1

    def additive(self, position_ids: Tensor) -> Tensor:
        return F.embedding(position_ids + self.offset, self.weight)

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Added to whole hidden vectors: every tensor-parallel rank keeps the table."""
        return {"": "replicate"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: kept whole."""

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, offset={self.offset}"


def token_embedding(params, ctx) -> LearnedTokenEmbedding:
    d = ctx.decoder
    return LearnedTokenEmbedding(d.vocab_size, d.embed_dim, ctx.spec.tokens.pad_token_id, d.init_std)


def learned_positions(params: LearnedPositionParams, ctx) -> LearnedPositionalEmbedding:
    d = ctx.decoder
    return LearnedPositionalEmbedding(d.max_positions, d.hidden_size, params.offset, d.init_std)
