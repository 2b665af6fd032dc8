"""Finding, explaining and calling flash-attn without importing it until it is needed.

Two libraries provide the ``flash_attn`` package: flash-attn 2 (distribution ``flash-attn``, built from source
against one torch) and FlashAttention-4 (distribution ``flash-attn-4``, a pure-Python CuTe-DSL wheel that adds
``flash_attn.cute`` for Hopper/Blackwell). Their entry points differ in arguments and return values, so each is
wrapped in a `FlashLibrary` with one calling convention. Detection reads distribution metadata and import specs
only, so ``optkit info`` can say why flash is unavailable on a machine where importing it would crash.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Literal, Protocol

import torch
from torch import Tensor

from optkit.errors import BackendUnavailableError

from .varlen import Segments

Implementation = Literal["auto", "fa2", "fa4"]
INSTALL_HINT = ("install it with `pip install 'optkit[flash]'` (flash-attn 2 is a source build that needs the CUDA "
                "toolkit and a matching torch) or, on Hopper/Blackwell, `pip install flash-attn-4` (a wheel)")
FA2_DISTRIBUTIONS = ("flash-attn", "flash_attn")
FA4_DISTRIBUTIONS = ("flash-attn-4", "fa4")
FA2_MIN_VERSION = (2, 1)  # 2.1 moved the causal mask to the bottom-right corner, which cached decoding needs
MIN_CAPABILITY = {"fa2": (8, 0), "fa4": (9, 0)}
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


class FlashBackend(Protocol):
    """What the flash kernel needs from a library: the real ones below, or a pure-torch stand-in in tests."""

    label: str

    def validate(self, query: Tensor, dropout_p: float) -> None: ...

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, dropout_p: float) -> Tensor: ...

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, seg: Segments, *, scale: float, dropout_p: float) -> Tensor: ...


def _version(distributions: tuple[str, ...]) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as ``2.8.3.post2`` or ``4.0.0b36``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else ()


def _package_present() -> bool:
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def installed() -> dict[str, str]:
    """``{"fa2": version, "fa4": version}`` for what is installed (empty: neither)."""
    if not _package_present():
        return {}
    found = {}
    for kind, names in (("fa2", FA2_DISTRIBUTIONS), ("fa4", FA4_DISTRIBUTIONS)):
        version = _version(names)
        if version is not None:
            found[kind] = version
    return found or {"fa2": "?"}  # a source checkout on sys.path: assume flash-attn 2


def choose(implementation: Implementation, found: dict[str, str]) -> str | None:
    """flash-attn 2 first under "auto" (it has dropout and the longest track record), else FA4."""
    if implementation != "auto":
        return implementation if implementation in found else None
    return "fa2" if "fa2" in found else ("fa4" if "fa4" in found else None)


def cuda_reasons(device: torch.device, minimum: tuple[int, int]) -> list[str]:
    """No CUDA at all, or a GPU older than ``minimum`` compute capability."""
    if not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        return [f"no CUDA device ({build}, torch {torch.__version__})"]
    if device.type != "cuda":
        return []
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < minimum:
        name = torch.cuda.get_device_name(index)
        return [f"compute capability {capability[0]}.{capability[1]} of {name} is below "
                f"{minimum[0]}.{minimum[1]}"]
    return []


def unavailable_reasons(device: torch.device | str, dtype: torch.dtype,
                        implementation: Implementation = "auto") -> list[str]:
    """Why flash cannot run here; device/dtype support itself is reported by the registry's capabilities."""
    device = torch.device(device)
    found = installed()
    kind = choose(implementation, found)
    reasons = []
    if kind is None:
        missing = "flash_attn is not installed" if not found else f"flash-attn implementation '{implementation}' " \
                                                                  f"is not installed (found: {', '.join(found)})"
        reasons.append(f"{missing}: {INSTALL_HINT}")
    elif kind == "fa2" and found["fa2"] != "?" and _release(found["fa2"]) < FA2_MIN_VERSION:
        reasons.append(f"flash-attn {found['fa2']} aligns the causal mask top-left; optkit needs >= 2.1 "
                       "(bottom-right, for cached decoding): pip install -U flash-attn")
    reasons += cuda_reasons(device, MIN_CAPABILITY.get(kind or "fa2", (8, 0)))
    if kind is not None and not reasons and device.type == "cuda":
        error = _import_error(kind)
        if error:
            reasons.append(f"flash_attn is installed but does not import: {error}")
    return reasons


@lru_cache(maxsize=None)
def _import_error(kind: str) -> str | None:
    try:
        importlib.import_module("flash_attn.cute" if kind == "fa4" else "flash_attn")
    except Exception as exc:  # noqa: BLE001 - any failure (ABI mismatch, missing CUDA libs) is the reason
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def check_head_dim(head_dim: int) -> None:
    """flash-attn kernels exist for head_dim <= 256 in steps of 8; say so before the kernel does, cryptically."""
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        raise BackendUnavailableError(
            f"attention 'flash' supports head_dim <= {MAX_HEAD_DIM} and a multiple of 8; this model has "
            f"head_dim={head_dim}: use attention='sdpa' (or 'xformers')")


@dataclass(frozen=True)
class FlashLibrary:
    """flash-attn 2 or FA4 behind one convention: (B, T, H, D) dense, (total, H, D) varlen, output tensors."""

    label: str
    fa4: bool
    dense_fn: Callable[..., Any]
    varlen_fn: Callable[..., Any]

    def validate(self, query: Tensor, dropout_p: float) -> None:
        if query.device.type != "cuda" or query.dtype not in HALF_DTYPES:
            raise BackendUnavailableError(
                f"attention 'flash' ({self.label}) runs float16/bfloat16 on CUDA; got {query.dtype} on "
                f"{query.device.type}: build the model with dtype=torch.float16 or torch.bfloat16 on cuda, "
                "or use attention='sdpa'")
        if self.fa4 and dropout_p > 0.0:
            raise BackendUnavailableError(
                f"attention 'flash' ({self.label}) has no attention dropout; set decoder.attention_dropout to 0, "
                "train with flash-attn 2 (params: {implementation: fa2}), or use attention='sdpa'")

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, dropout_p: float) -> Tensor:
        if self.fa4:
            return _output(self.dense_fn(q, k, v, softmax_scale=scale, causal=causal))
        return self.dense_fn(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, seg: Segments, *, scale: float, dropout_p: float) -> Tensor:
        if self.fa4:  # FA4 betas differ on max_seqlen_*; cu_seqlens alone is accepted by all of them
            return _output(self.varlen_fn(q, k, v, cu_seqlens_q=seg.cu_seqlens_q, cu_seqlens_k=seg.cu_seqlens_k,
                                          softmax_scale=scale, causal=seg.causal))
        return self.varlen_fn(q, k, v, seg.cu_seqlens_q, seg.cu_seqlens_k, seg.max_seqlen_q, seg.max_seqlen_k,
                              dropout_p=dropout_p, softmax_scale=scale, causal=seg.causal)


def _output(result: Any) -> Tensor:
    """FA4 returns ``(out, lse)``; flash-attn 2 returns ``out`` unless asked for probabilities."""
    return result[0] if isinstance(result, tuple) else result


@lru_cache(maxsize=None)
def load(implementation: Implementation = "auto") -> FlashLibrary:
    """Import the chosen flash-attn (first use only); a missing one is a `BackendUnavailableError`."""
    found = installed()
    kind = choose(implementation, found)
    if kind is None:
        raise BackendUnavailableError(f"attention 'flash': flash_attn is not installed; {INSTALL_HINT}")
    module = importlib.import_module("flash_attn.cute" if kind == "fa4" else "flash_attn")
    label = f"flash-attn-4 {found[kind]}" if kind == "fa4" else f"flash-attn {found[kind]}"
    return FlashLibrary(label=label, fa4=kind == "fa4", dense_fn=module.flash_attn_func,
                        varlen_fn=module.flash_attn_varlen_func)
