"""oneDNN prepacked linears for CPU decoding (``linear="onednn"``).

Decoding reads every weight once per token, so on a CPU its speed is the memory bandwidth
divided by the bytes read. torch's default ``F.linear`` for one row (a GEMV) reaches well under
that bandwidth; oneDNN with weights reordered once into its blocked layout gets much closer,
and in bfloat16 reads half the bytes. The parameters stay ordinary ``nn.Linear`` weights (same
names, same checkpoint keys, trainable); a packed copy is made on first use in inference and
rebuilt whenever the weight changes. The packed copy costs as much memory as the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import optkit
from optkit import torch_internals
from optkit.interfaces import StackableLinear
from optkit.registration import Capabilities

OPTKIT_PLUGIN_API = 1
DTYPES = (torch.float32, torch.bfloat16)


def unavailable_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = []
    if not torch.backends.mkldnn.is_available():
        reasons.append("this torch build has no oneDNN (mkldnn)")
    elif not torch_internals.available("mkldnn_linear"):
        reasons.append(f"torch {torch.__version__} lacks torch.ops.mkldnn._linear_pointwise")
    return reasons


class PackedWeight:
    """A weight reordered for oneDNN, rebuilt when the parameter's storage or version changes."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: Tensor | None = None

    def get(self, weight: Tensor) -> Tensor:
        version = torch_internals.tensor_version(weight)
        key = (weight.data_ptr(), version, weight.dtype, tuple(weight.shape))
        if version is None or key != self._key:  # no version counter: repack, never use a stale copy
            self._packed = torch_internals.mkldnn_pack(weight)
            self._key = key
        return self._packed


def packable(x: Tensor, weight: Tensor) -> bool:
    """Inference on CPU in fp32/bf16 with matching dtypes, on a torch that has the kernel; anything else
    takes torch's public path (same values)."""
    return (not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad)) \
        and x.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype and not weight.is_meta \
        and torch_internals.available("mkldnn_linear")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, cache: PackedWeight) -> Tensor:
    if packable(x, weight):
        return torch_internals.mkldnn_linear(x, cache.get(weight), bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(StackableLinear):
    """``nn.Linear`` whose CPU inference runs on a oneDNN-packed copy of its weight.

    Stackable: given stacked weights it computes stacked outputs, so inference may fuse q/k/v (one GEMV).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._packed = PackedWeight()

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self._packed)

    def weights_changed(self) -> None:
        """Inference moved the weight into a stacked buffer: free the packed copy of the old storage now."""
        self._packed = PackedWeight()


class OneDNNLinearFactory:
    """Builds the projections; ``matmul`` lets a head (the tied LM head) use the same kernel."""

    def __init__(self, init_std: float) -> None:
        self.init_std = init_std

    def __call__(self, in_features: int, out_features: int, *, bias: bool) -> OneDNNLinear:
        layer = OneDNNLinear(in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, std=self.init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer

    @staticmethod
    def matmul_cache() -> PackedWeight:
        return PackedWeight()

    @staticmethod
    def matmul(x: Tensor, weight: Tensor, cache: PackedWeight) -> Tensor:
        return linear(x, weight, None, cache)


def onednn(params, ctx) -> OneDNNLinearFactory:
    return OneDNNLinearFactory(ctx.decoder.init_std)


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register("linear", "onednn", onednn,
                      capabilities=Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({"float32", "bfloat16"})),
                      check=unavailable_reasons,
                      description="oneDNN prepacked weights for fast CPU decoding (fp32, bf16)")
