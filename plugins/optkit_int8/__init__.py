"""bitsandbytes LLM.int8 as an optkit linear backend (``linear="int8"``).

Every projection the core builds through ``ctx.linear`` becomes an int8 ``Linear8bitLt`` (frozen int8 weights,
outlier threshold 6.0 by default): q/k/v/out_proj, fc1/fc2 and project_in/project_out -- the same set
transformers converts for OPT. The LM head and the embeddings are not built through ``ctx.linear`` and stay in
the model dtype, as in transformers (``get_keys_to_not_convert``). Weights are quantized from the fp16/fp32
checkpoint as they are loaded (see `linear.Int8Linear`).

bitsandbytes is imported on first use, so the plugin always loads and can explain why int8 is unavailable.
Whether it can run is decided by trying it: a tiny int8 matmul on the requested device (cached), because
bitsandbytes' CPU and GPU support depends on its version and build more than on anything checkable up front.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from functools import lru_cache
from typing import Any, Callable

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


def unavailable_reasons(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Library missing or too old, no CUDA for a CUDA request, or a failed int8 matmul on ``device``."""
    device = torch.device(device)
    if not _present():
        reasons = [f"bitsandbytes is not installed: {INSTALL_HINT}"]
    elif _too_old(_version()):
        reasons = [f"bitsandbytes {_version()} is older than 0.45 (LLM.int8 fails on Hopper GPUs before it, "
                   "bitsandbytes#1401): pip install -U bitsandbytes"]
    else:
        reasons = []
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        reasons.append(f"no CUDA device ({build}, torch {torch.__version__})")
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


@optkit.hookimpl
def optkit_register(registry: Registry) -> None:
    registry.register("linear", "int8", int8, params=Int8LinearParams, capabilities=CAPABILITIES, check=check,
                      description="bitsandbytes LLM.int8 projections (q/k/v/out, fc1/fc2, project_in/out)")
