"""The gated feed-forward block of LLaMA-family models."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from optkit.interfaces import MLP, ShardStyle
from optkit_torch_components.layers import ACTIVATIONS, Activation


class GatedMLPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    activation: Activation = Field(default="silu", description="applied to the gate (transformers' hidden_act)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0,
                           description="on the block's output, training only (Open-Llama's hidden_dropout_prob)")


class GatedMLP(MLP):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, then dropout while training.

    The projections keep transformers' names so checkpoint keys map one to one; their
    bias follows the spec's ``decoder.bias`` (Open-Llama has none).
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, activation: str,
                 dropout: float):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation, self.dropout = activation, dropout
        self._act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        out = self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))
        return F.dropout(out, p=self.dropout, training=self.training) if self.dropout else out

    def tp_plan(self) -> dict[str, ShardStyle]:
        """SwiGLU under tensor parallelism: gate/up by columns, down by rows (one all-reduce)."""
        return {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: the activation is elementwise on each rank's columns."""

    def extra_repr(self) -> str:
        return f"activation={self.activation}, dropout={self.dropout}"


def gated_mlp(params: GatedMLPParams, ctx) -> GatedMLP:
    d = ctx.decoder
    return GatedMLP(gate_proj=ctx.linear(d.hidden_size, d.ffn_dim, bias=d.bias),
                    up_proj=ctx.linear(d.hidden_size, d.ffn_dim, bias=d.bias),
                    down_proj=ctx.linear(d.ffn_dim, d.hidden_size, bias=d.bias),
                    activation=params.activation, dropout=params.dropout)
