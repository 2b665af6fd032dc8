"""OPT's decoder block, built from the spec's components: the ``sequential`` block.

The block itself (:class:`optkit.model.DecoderLayer`) is the core's reference; this factory only
chooses its parts: four projections from the spec's ``linear``, the ``attention`` kernel, two norms
and the ``mlp``. Open-Llama uses the same block with other parts.
"""

from __future__ import annotations

from optkit.context import BuildContext
from optkit.model import Attention, DecoderLayer


def sequential_block(params, ctx: BuildContext) -> DecoderLayer:
    d = ctx.decoder
    width = d.num_heads * d.head_dim
    attention = Attention(
        q_proj=ctx.linear(d.hidden_size, width, bias=d.bias), k_proj=ctx.linear(d.hidden_size, width, bias=d.bias),
        v_proj=ctx.linear(d.hidden_size, width, bias=d.bias), out_proj=ctx.linear(width, d.hidden_size, bias=d.bias),
        kernel=ctx.create("attention"), num_heads=d.num_heads, head_dim=d.head_dim,
        query_scaling=d.query_scaling, dropout=d.attention_dropout)
    return DecoderLayer(self_attn=attention, self_attn_layer_norm=ctx.norm(d.hidden_size), mlp=ctx.create("mlp"),
                        final_layer_norm=ctx.norm(d.hidden_size), norm_position=d.norm_position, dropout=d.dropout)
