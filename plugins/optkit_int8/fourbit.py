"""`FourBitLinear`: bitsandbytes' 4-bit weights (NF4 or FP4, the "Q" of QLoRA) as an optkit linear.

Imported only when a 4-bit model is built (it imports bitsandbytes). The weight is quantized block-wise
(64 values per absmax scale, optionally with the scales themselves quantized: ``double_quant``) into packed
``uint8`` pairs and stays frozen; forward runs ``bnb.matmul_4bit`` in ``compute_dtype`` (default: the input's
dtype), and its backward passes gradients to the input (and the bias), so LoRA adapters on top train.

Written on bitsandbytes' functional API rather than ``bnb.nn.Linear4bit`` so that optkit's build and load
paths stay plain: the model is built on "meta", checkpoint tensors arrive through
``load_state_dict(assign=True)`` as float tensors and are quantized right there (on any device, CPU included);
``state_dict()`` gives the *dequantized* float weight back, so ``save_pretrained`` writes a checkpoint that
transformers and a non-4-bit optkit build read. Merging a LoRA delta into the 4-bit weight is refused (see
``merge_refusal_reason``).

bitsandbytes 0.50.2 on CPU dequantizes a 2-D weight wrongly when its row length is not a multiple of the block
size (rows of 32 or 96 values come back scrambled; the packed bytes are right), and ``matmul_4bit`` uses that
dequantization. Such a layer (``in_features % 64 != 0``, e.g. a narrow ``project_in``) is therefore quantized as
one flat vector, dequantized flat and multiplied with ``F.linear``; every other layer uses ``matmul_4bit``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quiet_bitsandbytes import bnb, bnbF

BLOCKSIZE = 64  # values per absmax scale (bitsandbytes' and QLoRA's default)


class FourBitLinear(nn.Module):
    """A frozen 4-bit projection: ``weight`` is the packed ``uint8`` data once quantized, float before."""

    offloadable = False  # the weight changes form on its device: placeable, never streamed
    merge_refusal_reason = ("its weight is stored in 4 bits: folding the adapter in would re-quantize W + scale*B@A "
                            "with a step far larger than the adapter's delta, erasing most of it; keep the adapter "
                            "unmerged (it runs on top of the 4-bit base), or load the base with linear='torch' and "
                            "merge there")

    def __init__(self, in_features: int, out_features: int, *, bias: bool, quant_type: str,
                 compute_dtype: torch.dtype | None, double_quant: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.compute_dtype, self.double_quant = quant_type, compute_dtype, double_quant
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.quant_state: Any = None  # bitsandbytes' QuantState (absmax, code, shape, dtype) once quantized
        self.float_dtype = self.weight.dtype  # what the weight dequantizes to
        self.flat = in_features % BLOCKSIZE != 0  # see the module doc: bitsandbytes' 2-D path is wrong for these

    @property
    def is_quantized(self) -> bool:
        return self.quant_state is not None

    def quantize_(self) -> None:
        """Replace the float weight by its packed 4-bit blocks, once (not on "meta")."""
        weight = self.weight
        if self.is_quantized or weight.device.type == "meta":
            return
        self.float_dtype = weight.dtype
        data = weight.data.reshape(-1) if self.flat else weight.data.contiguous()
        packed, state = bnbF.quantize_4bit(data, blocksize=BLOCKSIZE, quant_type=self.quant_type,
                                           compress_statistics=self.double_quant, quant_storage=torch.uint8)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state

    def dequantized_weight(self) -> Tensor:
        """The float ``(out_features, in_features)`` weight the 4-bit blocks stand for."""
        if not self.is_quantized:
            return self.weight.data
        weight = bnbF.dequantize_4bit(self.weight.data, self.quant_state)
        return weight.view(self.out_features, self.in_features).to(self.float_dtype)

    def forward(self, x: Tensor) -> Tensor:
        self.quantize_()
        compute = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        if self.flat:
            return F.linear(x.to(compute), self.dequantized_weight().to(compute), bias).to(x.dtype)
        out = bnb.matmul_4bit(x.to(compute), self.weight.t(), quant_state=self.quant_state, bias=bias)
        return out.to(x.dtype)

    # -- keeping the 4-bit state consistent through torch's module machinery -------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "FourBitLinear":
        probe = fn(torch.empty(0, dtype=self.float_dtype))
        if probe.is_floating_point() and self.is_quantized:
            self.float_dtype = probe.dtype  # a later dequantize follows model.to(dtype); packed bytes stay
        result = super()._apply(fn, recurse)
        if self.is_quantized and self.weight.device != self.quant_state.absmax.device:
            self.quant_state.to(self.weight.device)
        return result

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        if self.is_quantized and self.weight.device.type != "meta":
            destination[prefix + "weight"] = self.dequantized_weight()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        incoming = state_dict.get(prefix + "weight")
        if isinstance(incoming, Tensor) and not incoming.is_floating_point():
            error_msgs.append(f"{prefix}weight: a 4-bit linear loads float weights (it quantizes them itself), "
                              f"got {incoming.dtype}")
            return
        if isinstance(incoming, Tensor) and self.is_quantized:  # new float weights replace the 4-bit ones
            device = self.weight.device
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=incoming.dtype,
                                                   device=device), requires_grad=False)
            self.quant_state = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.weight.requires_grad_(False)
        if isinstance(incoming, Tensor):
            self.quantize_()

    def extra_repr(self) -> str:
        compute = "input dtype" if self.compute_dtype is None else str(self.compute_dtype).removeprefix("torch.")
        state = self.quant_type if self.is_quantized else f"{str(self.float_dtype).removeprefix('torch.')}, not yet quantized"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{state}, compute={compute}, double_quant={self.double_quant}")


def make_factory(quant_type: str, compute_dtype: torch.dtype | None, double_quant: bool,
                 init_std: float) -> Callable[..., FourBitLinear]:
    """The ``LinearFactory`` the core calls for q/k/v/out, fc1/fc2 and project_in/out."""

    def make(in_features: int, out_features: int, *, bias: bool) -> FourBitLinear:
        layer = FourBitLinear(in_features, out_features, bias=bias, quant_type=quant_type,
                              compute_dtype=compute_dtype, double_quant=double_quant)
        nn.init.normal_(layer.weight, std=init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer  # quantized when it first runs, or when weights are loaded into it

    return make


__all__ = ["BLOCKSIZE", "FourBitLinear", "bnb", "make_factory"]
