"""LayerNorm, the two-matrix feed-forward block and the plain torch projection."""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from optkit import torch_internals
from optkit.interfaces import MLP, Norm, ShardStyle


class LayerNorm(nn.LayerNorm, Norm):
    """torch's LayerNorm; ``elementwise_affine=False`` has no weight and no bias (OPT)."""

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Normalises whole hidden vectors: every tensor-parallel rank keeps all of it."""
        return {"": "replicate"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: kept whole."""


class LayerNormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float = Field(default=1e-5, gt=0)
    elementwise_affine: bool = True


def layernorm(params: LayerNormParams, ctx) -> Callable[[int], LayerNorm]:
    return lambda dim: LayerNorm(dim, eps=params.eps, elementwise_affine=params.elementwise_affine)


def gelu_new(x: Tensor) -> Tensor:
    """The tanh approximation exactly as transformers writes it (``gelu_new``)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}
Activation = Literal["relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish"]


class FeedForwardParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    activation: Activation = "relu"


class FeedForward(MLP):
    """fc2(act(fc1(x))); OPT has no dropout between the two."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module, activation: str):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        if self._relu_in_gemm(x):  # cuBLASLt applies bias + ReLU in fc1's epilogue: one kernel fewer
            hidden = torch_internals.relu_addmm(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t())
            return self.fc2(hidden.view(*x.shape[:-1], hidden.shape[-1]))
        return self.fc2(self._act(self.fc1(x)))

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Megatron's MLP: fc1 by columns, fc2 by rows (one all-reduce)."""
        return {"fc1": "colwise", "fc2": "rowwise"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: the activation is elementwise on each rank's columns."""

    def _relu_in_gemm(self, x: Tensor) -> bool:
        return (self.activation == "relu" and x.is_cuda and type(self.fc1) is nn.Linear
                and self.fc1.bias is not None and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling())  # inductor fuses bias + ReLU itself

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def feed_forward(params: FeedForwardParams, ctx) -> FeedForward:
    d = ctx.decoder
    return FeedForward(ctx.linear(d.hidden_size, d.ffn_dim, bias=d.bias), ctx.linear(d.ffn_dim, d.hidden_size, bias=d.bias),
                       params.activation)


def torch_linear(params, ctx) -> Callable[..., nn.Linear]:
    std = ctx.decoder.init_std

    def make(in_features: int, out_features: int, *, bias: bool) -> nn.Linear:
        layer = nn.Linear(in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, std=std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer

    return make
