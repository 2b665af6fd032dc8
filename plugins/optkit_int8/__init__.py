"""bitsandbytes LLM.int8 and 4-bit NF4 / FP4 as optkit linear backends (``linear="int8"``, ``"nf4"``, ``"fp4"``).

Every projection the core builds through ``ctx.linear`` becomes an int8 ``Linear8bitLt`` (frozen int8 weights,
outlier threshold 6.0 by default): q/k/v/out_proj, fc1/fc2 and project_in/project_out -- the same set
transformers converts for OPT. The LM head and the embeddings are not built through ``ctx.linear`` and stay in
the model dtype, as in transformers (``get_keys_to_not_convert``). Weights are quantized from the fp16/fp32
checkpoint as they are loaded (see `linear.Int8Linear`).

``nf4`` / ``fp4`` store the same projections in 4 bits (`fourbit.FourBitLinear`: block-wise absmax, optional
double quantization, a chosen compute dtype): the frozen base of QLoRA. They run wherever the installed
bitsandbytes runs ``matmul_4bit`` forward and backward (0.50 does on CPU and CUDA); LoRA adapters on top train,
the 4-bit weight never does, and merging an adapter into it is refused (re-quantizing would erase the delta).

bitsandbytes is imported on first use, so the plugin always loads and can explain why a backend is unavailable.
Whether it can run is decided by trying it: a tiny int8 matmul on the requested device (cached), because
bitsandbytes' CPU and GPU support depends on its version and build more than on anything checkable up front.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from functools import lru_cache
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

import optkit
from optkit.registration import ALL_DTYPES, Capabilities, Registry

OPTKIT_PLUGIN_API = 1
INSTALL_HINT = "install it with `pip install 'optkit[int8]'`"
MIN_VERSION = (0, 45)  # LLM.int8 on Hopper (H100/H200) failed before bitsandbytes PR #1401, released in 0.45.0
CAPABILITIES = Capabilities(devices=frozenset({"cpu", "cuda"}), dtypes=ALL_DTYPES, padding=True, kv_cache=True,
                            dropout=True, attention_weights=False, backward=True)


class Int8LinearParams(BaseModel):
    """``threshold``: activations above it in any column go through the fp16 outlier path (LLM.int8 default 6.0;
    0 quantizes every column)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(default=6.0, ge=0.0)


class FourBitLinearParams(BaseModel):
    """``compute_dtype``: the dtype of the matmul (None: the input's; bfloat16 is QLoRA's choice on GPUs);
    ``double_quant``: quantize the per-block scales too (about 0.4 bit per weight less; QLoRA's option)."""

    model_config = ConfigDict(extra="forbid")

    compute_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    double_quant: bool = False


def fourbit_component(quant_type: str) -> Callable[[FourBitLinearParams, Any], Callable[..., Any]]:
    """The component factory of ``nf4`` or ``fp4``."""

    def create(params: FourBitLinearParams, ctx: Any) -> Callable[..., Any]:
        from .fourbit import make_factory  # imports bitsandbytes

        compute = None if params.compute_dtype is None else getattr(torch, params.compute_dtype)
        return make_factory(quant_type, compute, params.double_quant, ctx.decoder.init_std)

    return create


def int8(params: Int8LinearParams, ctx: Any) -> Callable[..., Any]:
    from .linear import make_factory  # imports bitsandbytes

    return make_factory(params.threshold, ctx.decoder.init_std)


def _version() -> str | None:
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None


def _present() -> bool:
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False


def _too_old(version: str | None) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return bool(match) and (int(match[1]), int(match[2])) < MIN_VERSION


def library_reasons() -> list[str]:
    """Why the installed bitsandbytes cannot serve at all (missing, or too old); empty when it may."""
    if not _present():
        return [f"bitsandbytes is not installed: {INSTALL_HINT}"]
    if _too_old(_version()):
        return [f"bitsandbytes {_version()} is older than 0.45 (LLM.int8 fails on Hopper GPUs before it, "
                "bitsandbytes#1401): pip install -U bitsandbytes"]
    return []


def cuda_reasons(device: torch.device) -> list[str]:
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        return [f"no CUDA device ({build}, torch {torch.__version__})"]
    return []


def unavailable_reasons(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Library missing or too old, no CUDA for a CUDA request, or a failed int8 matmul on ``device``."""
    device = torch.device(device)
    reasons = library_reasons() + cuda_reasons(device)
    if not reasons and device.type in CAPABILITIES.devices:
        error = probe(device.type, device.index)
        if error:
            reasons.append(f"bitsandbytes {_version()} cannot run LLM.int8 on {device.type}: {error}")
    return reasons


@lru_cache(maxsize=None)
def probe(device_type: str, index: int | None) -> str | None:
    """Run one small int8 projection on the device; the error text if bitsandbytes cannot."""
    try:
        from .linear import Int8Linear

        device = torch.device(device_type, index) if index is not None else torch.device(device_type)
        layer = Int8Linear(64, 64, bias=True, threshold=6.0).to(device)
        with torch.no_grad():
            out = layer(torch.randn(2, 64, device=device, dtype=torch.float16))
        if not bool(torch.isfinite(out).all()):
            return "the int8 matmul returned non-finite values"
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def check(device: torch.device, dtype: torch.dtype) -> list[str]:
    return unavailable_reasons(device, dtype)


def fourbit_unavailable_reasons(quant_type: str, device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """As for int8 (library, CUDA), then a tiny 4-bit forward and backward on ``device``."""
    device = torch.device(device)
    reasons = library_reasons() + cuda_reasons(device)
    if not reasons and device.type in CAPABILITIES.devices:
        error = probe_fourbit(quant_type, device.type, device.index)
        if error:
            reasons.append(f"bitsandbytes {_version()} cannot run 4-bit {quant_type} on {device.type}: {error}")
    return reasons


@lru_cache(maxsize=None)
def probe_fourbit(quant_type: str, device_type: str, index: int | None) -> str | None:
    """One small 4-bit projection forward and backward (to its input) on the device; the error text if not."""
    try:
        from .fourbit import FourBitLinear

        device = torch.device(device_type, index) if index is not None else torch.device(device_type)
        layer = FourBitLinear(64, 64, bias=True, quant_type=quant_type, compute_dtype=None, double_quant=True)
        torch.nn.init.normal_(layer.weight, std=0.02)
        torch.nn.init.zeros_(layer.bias)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return "the 4-bit matmul's backward gave no finite gradient"
    except Exception as exc:  # noqa: BLE001 - any failure is the reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def fourbit_check(quant_type: str) -> Callable[[torch.device, torch.dtype], list[str]]:
    return lambda device, dtype: fourbit_unavailable_reasons(quant_type, device, dtype)


@optkit.hookimpl
def optkit_register(registry: Registry) -> None:
    registry.register("linear", "int8", int8, params=Int8LinearParams, capabilities=CAPABILITIES, check=check,
                      description="bitsandbytes LLM.int8 projections (q/k/v/out, fc1/fc2, project_in/out)")
    for quant_type, what in (("nf4", "4-bit NormalFloat"), ("fp4", "4-bit float")):
        registry.register("linear", quant_type, fourbit_component(quant_type), params=FourBitLinearParams,
                          capabilities=CAPABILITIES, check=fourbit_check(quant_type),
                          description=f"bitsandbytes {what} projections, frozen (the base of QLoRA)")
