"""`Int8Linear`: bitsandbytes' ``Linear8bitLt`` made safe for optkit's build and load paths.

Imported only when an int8 model is built (it imports bitsandbytes). ``Linear8bitLt`` quantizes when its
``Int8Params`` weight moves from CPU to a device. optkit's loader instead builds on "meta" and assigns
checkpoint tensors with ``load_state_dict(assign=True)``, which replaces the parameter with a plain
``nn.Parameter`` and would lose the int8 machinery. This subclass therefore:

* re-wraps an assigned weight as ``Int8Params`` and quantizes it right away when it lands on an accelerator
  (on CPU it stays float until the first forward or a move, as bitsandbytes documents);
* quantizes a float weight at the first forward if nothing else did (a model built directly on CUDA);
* keeps int8 rows int8 under ``model.to(dtype)`` and moves the row scales along with ``model.to(device)``;
* returns the *dequantized* weight from ``state_dict()``, so ``save_pretrained`` writes a checkpoint that
  transformers (and a non-int8 optkit build) can read.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .quiet_bitsandbytes import bnb, bnbF  # first: bitsandbytes without its import-time warning

from bitsandbytes.nn import Int8Params, Linear8bitLt  # noqa: E402 - after the quiet import


class Int8Linear(Linear8bitLt):
    """LLM.int8 projection with frozen int8 weights (``has_fp16_weights=False``) and outlier threshold.

    ``offloadable = False`` (``optkit.interfaces.Offloadable``): its weight changes form (quantizes) on the
    device it lands on, so a device map may place it on any one device but never stream it from CPU or disk.
    """

    offloadable = False

    def __init__(self, in_features: int, out_features: int, *, bias: bool, threshold: float) -> None:
        super().__init__(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=threshold)
        self.float_dtype = self.weight.dtype  # what the weight was (and dequantizes to) before int8

    @property
    def is_quantized(self) -> bool:
        return self.weight.dtype == torch.int8

    def quantize_(self) -> None:
        """Replace the float weight by int8 rows and per-row absmax scales (vector-wise LLM.int8), once."""
        weight = self.weight
        if self.is_quantized or weight.device.type == "meta":
            return
        self.float_dtype = weight.dtype
        rows, scales, _ = bnbF.int8_vectorwise_quant(weight.data.to(torch.float16).contiguous())
        self.weight = Int8Params(rows, requires_grad=False, has_fp16_weights=False)
        self.state.CB, self.state.SCB = rows, scales

    def dequantized_weight(self) -> Tensor:
        """The float weight the int8 rows stand for: ``rows * scale / 127``."""
        scales = self.state.SCB if self.state.SCB is not None else self.weight.SCB
        return bnbF.int8_vectorwise_dequant(self.weight.data, scales).to(self.float_dtype)

    def forward(self, x: Tensor) -> Tensor:
        """bitsandbytes quantizes activations from fp16 whatever their dtype (and warns on every call when they
        are not fp16), so the cast happens here once; the output comes back in the input's dtype."""
        self.quantize_()
        self.state.is_training = self.training
        if self.weight.CB is not None:
            self.init_8bit_state()
        bias = None if self.bias is None else self.bias.to(torch.float16)
        return bnb.matmul(x.to(torch.float16), self.weight, bias=bias, state=self.state).to(x.dtype)

    # -- keeping the int8 state consistent through torch's module machinery -------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "Int8Linear":
        probe = fn(torch.empty(0, dtype=self.float_dtype))
        if probe.is_floating_point():
            self.float_dtype = probe.dtype  # a later dequantize follows model.to(dtype)
        result = super()._apply(fn, recurse)
        self._sync_quant_state()
        return result

    def _sync_quant_state(self) -> None:
        """Keep rows and scales in ``self.state`` on the weight's device (torch moved only the parameter)."""
        weight = self.weight
        if not self.is_quantized:
            return
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else self.state.SCB
        self.state.CB = weight.data
        self.state.SCB = None if scales is None else scales.to(weight.device)
        weight.CB = weight.SCB = None

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)  # no bitsandbytes SCB/format keys
        if self.is_quantized and self.weight.device.type != "meta":
            destination[prefix + "weight"] = self.dequantized_weight()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        incoming = state_dict.get(prefix + "weight")
        float_incoming = isinstance(incoming, Tensor) and incoming.is_floating_point()
        if float_incoming and self.is_quantized:  # a float checkpoint replaces the int8 rows: quantize it anew
            self._reset_to_float(incoming)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not isinstance(self.weight, Int8Params):  # load_state_dict(assign=True) put a plain Parameter here
            self.weight = Int8Params(self.weight.data, requires_grad=False, has_fp16_weights=False)
        if float_incoming:
            self.float_dtype = self.weight.dtype
            if self.weight.device.type not in ("cpu", "meta"):
                self.quantize_()

    def _reset_to_float(self, like: Tensor) -> None:
        empty = torch.empty(self.weight.shape, dtype=like.dtype, device=self.weight.device)
        self.weight = Int8Params(empty, requires_grad=False, has_fp16_weights=False)
        self.state.CB = self.state.SCB = None

    def extra_repr(self) -> str:
        state = "int8" if self.is_quantized else f"{str(self.float_dtype).removeprefix('torch.')}, not yet quantized"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.state.threshold}, {state}")


def make_factory(threshold: float, init_std: float) -> Callable[..., Int8Linear]:
    """The ``LinearFactory`` the core calls for q/k/v/out, fc1/fc2 and project_in/out."""

    def make(in_features: int, out_features: int, *, bias: bool) -> Int8Linear:
        layer = Int8Linear(in_features, out_features, bias=bias, threshold=threshold)
        nn.init.normal_(layer.weight, std=init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        if layer.weight.device.type not in ("cpu", "meta"):  # built straight on the GPU: no fp16 copy kept
            layer.quantize_()
        return layer

    return make


__all__ = ["Int8Linear", "bnb", "make_factory"]
