"""A third model family, with no edit to optkit: grouped-query attention and a parallel residual.

GPT-J and GPT-NeoX run attention and the MLP side by side on the same normalised input and add both
to the residual stream; grouped-query attention (LLaMA 2 70B, Mistral) gives several query heads one
key/value head, so the KV cache holds ``num_kv_heads`` heads instead of ``num_heads``. OPT's block has
neither. This plugin registers a ``block`` component that has both, built from whatever the spec chose
for the other kinds (linear, attention kernel, norm, MLP, positions)::

    decoder:
      block: {name: parallel_gqa, params: {num_kv_heads: 2}}

Keys and values are stored per key/value head (that is what ``kv_heads`` tells the cache) and repeated
for their query heads just before the kernel, so every optkit attention kernel works unchanged.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

import optkit
from optkit.interfaces import AttentionKernel, AttentionMask, DecoderBlock, KVCache, PositionalEmbedding

OPTKIT_PLUGIN_API = 1


class ParallelGQAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_kv_heads: int = Field(gt=0, description="key/value heads; must divide decoder.num_heads")


class GroupedQueryAttention(nn.Module):
    """q has ``num_heads`` heads, k and v ``num_kv_heads``; each k/v head serves ``num_heads // num_kv_heads``."""

    def __init__(self, *, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, out_proj: nn.Module,
                 kernel: AttentionKernel, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.kernel = kernel
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, *, mask: AttentionMask, positional: PositionalEmbedding, position_ids: Tensor,
                cache: KVCache | None, layer_idx: int) -> Tensor:
        batch, length, _ = x.shape
        query = self._heads(self.q_proj(x), self.num_heads)
        key = self._heads(self.k_proj(x), self.num_kv_heads)
        value = self._heads(self.v_proj(x), self.num_kv_heads)
        query, key = positional.rotate(query, key, position_ids)
        if cache is not None:
            key, value = cache.update(layer_idx, key, value)
        group = self.num_heads // self.num_kv_heads
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        output, _ = self.kernel(query, key, value, mask, scale=self.head_dim**-0.5)
        return self.out_proj(output.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class ParallelBlock(DecoderBlock):
    """``x + attention(norm(x)) + mlp(norm(x))``: one norm, both branches from the same input (GPT-J)."""

    def __init__(self, *, norm: nn.Module, self_attn: GroupedQueryAttention, mlp: nn.Module):
        super().__init__()
        self.norm, self.self_attn, self.mlp = norm, self_attn, mlp

    @property
    def kv_heads(self) -> int:
        return self.self_attn.num_kv_heads

    def forward(self, x: Tensor, *, mask: AttentionMask, positional: PositionalEmbedding, position_ids: Tensor,
                cache: KVCache | None, layer_idx: int, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        if need_weights:
            raise optkit.InputError("the parallel_gqa block does not return attention weights")
        h = self.norm(x)
        attended = self.self_attn(h, mask=mask, positional=positional, position_ids=position_ids, cache=cache,
                                  layer_idx=layer_idx)
        return x + attended + self.mlp(h), None


def parallel_gqa_block(params: ParallelGQAParams, ctx) -> ParallelBlock:
    d = ctx.decoder
    if d.num_heads % params.num_kv_heads:
        raise optkit.SpecValidationError([f"decoder.block.params.num_kv_heads: {params.num_kv_heads} does not divide "
                                          f"decoder.num_heads ({d.num_heads})"])
    width, kv_width = d.num_heads * d.head_dim, params.num_kv_heads * d.head_dim
    attention = GroupedQueryAttention(
        q_proj=ctx.linear(d.hidden_size, width, bias=d.bias), k_proj=ctx.linear(d.hidden_size, kv_width, bias=d.bias),
        v_proj=ctx.linear(d.hidden_size, kv_width, bias=d.bias), out_proj=ctx.linear(width, d.hidden_size, bias=d.bias),
        kernel=ctx.create("attention"), num_heads=d.num_heads, num_kv_heads=params.num_kv_heads, head_dim=d.head_dim)
    return ParallelBlock(norm=ctx.norm(d.hidden_size), self_attn=attention, mlp=ctx.create("mlp"))


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register("block", "parallel_gqa", parallel_gqa_block, params=ParallelGQAParams,
                      capabilities=optkit.Capabilities(cuda_graphs=True),
                      description="grouped-query attention + parallel residual (GPT-J style)")
