"""The "stable" token embedding: a lookup table followed by a LayerNorm (Open-Llama V1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from optkit.interfaces import ShardStyle, TokenEmbedding


class StableEmbeddingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float = Field(default=1e-5, gt=0, description="of the LayerNorm (transformers: nn.LayerNorm's default)")


class StableTokenEmbedding(TokenEmbedding):
    """Embedding, then LayerNorm (weight and bias), as bitsandbytes' StableEmbedding and BLOOM.

    ``weight`` stays the bare lookup table, so a shared LM head multiplies by the
    embedding matrix itself, not by anything normalized.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, padding_idx: int | None, eps: float):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(vocab_size, embedding_dim))
        nn.init.xavier_normal_(self.weight)  # transformers' init when use_stable_embedding is on
        if padding_idx is not None:
            with torch.no_grad():
                self.weight[padding_idx].zero_()
        self.layer_norm = nn.LayerNorm(embedding_dim, eps=eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.layer_norm(F.embedding(input_ids, self.weight, self.padding_idx))

    def embed_inputs(self, inputs_embeds: Tensor) -> Tensor:
        """User-supplied embeddings skip the LayerNorm, as in transformers' Open-Llama."""
        return inputs_embeds

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Each rank holds a slice of the vocabulary; the LayerNorm after the lookup is kept whole."""
        return {"": "vocab"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: ids outside a rank's slice are masked by the parallel style."""

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.embedding_dim}, padding_idx={self.padding_idx}"


def stable_embedding(params: StableEmbeddingParams, ctx) -> StableTokenEmbedding:
    d = ctx.decoder
    return StableTokenEmbedding(d.vocab_size, d.embed_dim, ctx.spec.tokens.pad_token_id, params.eps)
