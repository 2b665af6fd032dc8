"""Finding, explaining and calling flash-attn without importing it until it is needed.

Three implementations: flash-attn 2 (distribution ``flash-attn``, built from source against one torch),
FlashAttention-4 (distribution ``flash-attn-4``, a pure-Python CuTe-DSL wheel that adds ``flash_attn.cute`` for
Hopper/Blackwell), and the FlashAttention-2 kernels inside every CUDA build of torch (`torch_kernels`, no install).
Their entry points differ in arguments and return values, so each is wrapped with one calling convention.
Detection reads distribution metadata, import specs and torch's build flags only, so ``optkit info`` can say why
flash is unavailable on a machine where importing it would crash. "auto" takes the first of `ORDER` that can run.
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

from . import torch_kernels
from .inputs import require_half_on_cuda
from .varlen import Segments

Implementation = Literal["auto", "fa2", "fa4", "torch"]
ORDER = ("fa2", "fa4", "torch")  # flash-attn 2 has dropout and the longest record; torch's copy is the fallback
LABELS = {"fa2": "flash-attn 2", "fa4": "FlashAttention-4", "torch": "torch's own flash kernels"}
INSTALL_HINT = ("install it with `pip install 'optkit[flash]'` (flash-attn 2: a source build needing the CUDA "
                "toolkit) or, on Hopper/Blackwell, `pip install flash-attn-4` (a wheel)")
FA2_DISTRIBUTIONS = ("flash-attn", "flash_attn")
FA4_DISTRIBUTIONS = ("flash-attn-4", "fa4")
FA2_MIN_VERSION = (2, 1)  # 2.1 moved the causal mask to the bottom-right corner, which cached decoding needs
MIN_CAPABILITY = {"fa2": (8, 0), "fa4": (9, 0), "torch": torch_kernels.MIN_CAPABILITY}
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
    """``{"fa2": version, "fa4": version, "torch": version}`` for what is present (empty: none)."""
    found = {}
    if _package_present():
        for kind, names in (("fa2", FA2_DISTRIBUTIONS), ("fa4", FA4_DISTRIBUTIONS)):
            version = _version(names)
            if version is not None:
                found[kind] = version
        found = found or {"fa2": "?"}  # a source checkout on sys.path: assume flash-attn 2
    if torch_kernels.missing_reason() is None:
        found["torch"] = torch.__version__
    return found


def choose(implementation: Implementation, found: dict[str, str]) -> str | None:
    """The first present implementation in `ORDER` under "auto" (whether it can run here is `resolve`'s job)."""
    if implementation != "auto":
        return implementation if implementation in found else None
    return next((kind for kind in ORDER if kind in found), None)


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


def _missing(implementation: Implementation, found: dict[str, str]) -> list[str]:
    """Nothing to run: name every implementation asked for and how to get it (each reason < 200 characters)."""
    torch_missing = f"{torch_kernels.missing_reason()}, so implementation 'torch' (its FlashAttention-2 kernels, " \
                    "no extra install) cannot serve: use a CUDA build of torch"
    if implementation == "torch":
        return [torch_missing]
    if implementation == "auto":
        return [f"flash_attn is not installed: {INSTALL_HINT}", torch_missing]
    return [f"flash-attn implementation '{implementation}' is not installed (found: {', '.join(found) or 'none'}): "
            f"{INSTALL_HINT}"]


def _kind_reasons(kind: str, found: dict[str, str], device: torch.device) -> list[str]:
    """Why one present implementation cannot run on ``device``."""
    reasons = []
    if kind == "fa2" and found["fa2"] != "?" and _release(found["fa2"]) < FA2_MIN_VERSION:
        reasons.append(f"flash-attn {found['fa2']} aligns the causal mask top-left; optkit needs >= 2.1 "
                       "(bottom-right, for cached decoding): pip install -U flash-attn")
    reasons += cuda_reasons(device, MIN_CAPABILITY[kind])
    if kind != "torch" and not reasons and device.type == "cuda":
        error = _import_error(kind)
        if error:
            reasons.append(f"flash_attn is installed but does not import: {error}")
    return reasons


def resolve(device: torch.device | str, implementation: Implementation = "auto") -> tuple[str | None, list[str]]:
    """(the implementation that runs on ``device``, []) or (None, why none can).

    "auto" walks `ORDER` over what is present and takes the first that can run, so a FA4 install on an A100 or a
    flash-attn 2 built for another torch falls back to torch's own kernels. With several present and none usable,
    each reason is prefixed by its implementation's name.
    """
    device = torch.device(device)
    found = installed()
    kinds = [kind for kind in ORDER if kind in found] if implementation == "auto" else \
        [implementation] if implementation in found else []
    if not kinds:
        return None, _missing(implementation, found) + cuda_reasons(device, (8, 0))
    per_kind = {kind: _kind_reasons(kind, found, device) for kind in kinds}
    usable = [kind for kind in kinds if not per_kind[kind]]
    if usable:
        return usable[0], []
    if len(kinds) == 1:
        return None, per_kind[kinds[0]]
    return None, list(dict.fromkeys(f"{LABELS[kind]}: {reason}" for kind in kinds for reason in per_kind[kind]))


def unavailable_reasons(device: torch.device | str, dtype: torch.dtype,
                        implementation: Implementation = "auto") -> list[str]:
    """Why flash cannot run here; device/dtype support itself is reported by the registry's capabilities."""
    return resolve(device, implementation)[1]


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
        require_half_on_cuda(self.label, query)
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
def load(implementation: Implementation = "auto") -> FlashBackend:
    """The implementation `resolve` picks for CUDA (imported on first use only); none is a `BackendUnavailableError`."""
    kind, reasons = resolve("cuda", implementation)
    if kind is None:
        raise BackendUnavailableError(f"attention 'flash' (implementation '{implementation}') cannot run: "
                                      f"{'; '.join(reasons)}")
    if kind == "torch":
        return torch_kernels.TorchKernels()
    found = installed()
    module = importlib.import_module("flash_attn.cute" if kind == "fa4" else "flash_attn")
    label = f"flash-attn-4 {found[kind]}" if kind == "fa4" else f"flash-attn {found[kind]}"
    return FlashLibrary(label=label, fa4=kind == "fa4", dense_fn=module.flash_attn_func,
                        varlen_fn=module.flash_attn_varlen_func)
