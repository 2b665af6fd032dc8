"""xformers' memory-efficient attention as an optkit attention backend (``attention="xformers"``).

xformers is imported on first use, so the plugin always loads and can explain why it is unavailable. The mask
becomes one of xformers' structured biases -- never a dense ``(B, H, Tq, Tk)`` tensor -- chosen so that the
alignment is right (xformers' ``LowerTriangularMask`` is aligned top-left, which is wrong whenever
``q_len != kv_len``):

* no visible padding, square causal: ``LowerTriangularMask``;
* no visible padding, cached (``q_offset > 0``): keys up to the last query with
  ``LowerTriangularFromBottomRightMask`` (query ``i`` sees keys ``<= q_offset + i``); unwritten static-cache
  slots are sliced off first;
* one query, or non-causal, without padding: no bias;
* padding: the rows are packed with optkit_flash's `plan_varlen` (one plan per forward) and run with batch 1 under
  ``BlockDiagonalCausalFromBottomRightMask`` (real-token queries) and ``BlockDiagonalMask`` (pad-position queries
  that still see keys). Queries that see nothing are never handed to xformers and come out as zeros.

Layout: optkit hands (B, H, T, D); xformers wants (B, T, H, D) and accepts the transposed views as they are (it
only needs a unit stride on the last dimension). ``scale`` goes through unchanged (1.0 or a power of two for OPT; see docs/architecture.md).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

import optkit
from optkit.errors import BackendUnavailableError
from optkit.interfaces import AttentionKernel, AttentionMask, AttentionResult
from optkit.registration import Capabilities, Registry
from optkit_flash.library import cuda_reasons
from optkit_flash.varlen import Segments, VarlenPlan, plan_for, run_plan, visible_key_len

OPTKIT_PLUGIN_API = 1
INSTALL_HINT = ("install it with `pip install 'optkit[xformers]'`; each xformers wheel is built for one torch "
                "release, so pick the xformers that matches your torch (or pip would replace torch)")
MIN_CAPABILITY = (5, 0)
CAPABILITIES = Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"float16", "bfloat16"}), padding=True,
                            kv_cache=True, dropout=True, attention_weights=False, backward=True)
BiasKind = Literal["none", "causal", "causal_from_bottom_right", "block_diagonal",
                   "block_diagonal_causal_from_bottom_right"]


@dataclass(frozen=True)
class Bias:
    """Which xformers attention bias to build; kept library-free so the choice is testable on CPU."""

    kind: BiasKind
    q_seqlens: tuple[int, ...] = ()
    k_seqlens: tuple[int, ...] = ()

    @classmethod
    def block(cls, seg: Segments) -> "Bias":
        kind: BiasKind = "block_diagonal_causal_from_bottom_right" if seg.causal else "block_diagonal"
        return cls(kind, tuple(seg.seqlens_q), tuple(seg.seqlens_k))


class XformersBackend(Protocol):
    """``memory_efficient_attention`` behind a library-free bias description (real below, emulated in tests)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Bias, *, p: float, scale: float) -> Tensor: ...


class XformersOps:
    """The real xformers: translates `Bias` into ``xformers.ops.fmha.attn_bias`` classes."""

    def __init__(self) -> None:
        self.fmha = importlib.import_module("xformers.ops.fmha")
        self.attn_bias = importlib.import_module("xformers.ops.fmha.attn_bias")

    def bias(self, bias: Bias, device: torch.device) -> Any:
        b = self.attn_bias
        if bias.kind == "none":
            return None
        if bias.kind == "causal":
            return b.LowerTriangularMask()
        if bias.kind == "causal_from_bottom_right":
            return b.LowerTriangularFromBottomRightMask()
        cls = b.BlockDiagonalMask if bias.kind == "block_diagonal" else b.BlockDiagonalCausalFromBottomRightMask
        return cls.from_seqlens(list(bias.q_seqlens), list(bias.k_seqlens), device=device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Bias, *, p: float, scale: float) -> Tensor:
        return self.fmha.memory_efficient_attention(q, k, v, attn_bias=self.bias(bias, q.device), p=p, scale=scale)


class XformersAttention(AttentionKernel):
    """Compute-only kernel; ``backend`` is injectable so the bias choice is testable without a GPU."""

    name = "xformers"

    def __init__(self, backend: XformersBackend | None = None) -> None:
        super().__init__()
        self._backend = backend

    @property
    def backend(self) -> XformersBackend:
        if self._backend is None:
            self._backend = load()
        return self._backend

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *, scale: float,
                dropout_p: float = 0.0, need_weights: bool = False) -> AttentionResult:
        if need_weights:
            raise NotImplementedError("xformers cannot return attention weights; use attention='eager'")
        backend = self.backend
        plan = plan_for(mask, query.device)
        if plan is not None:
            return AttentionResult(self._packed(backend, query, key, value, plan, scale, dropout_p), None)
        keys = visible_key_len(mask)
        out = backend.attend(query.transpose(1, 2), key[:, :, :keys].transpose(1, 2),
                             value[:, :, :keys].transpose(1, 2), Bias(dense_bias(mask)), p=dropout_p, scale=scale)
        return AttentionResult(out.transpose(1, 2), None)

    @staticmethod
    def _packed(backend: XformersBackend, query: Tensor, key: Tensor, value: Tensor, plan: VarlenPlan,
                scale: float, dropout_p: float) -> Tensor:
        def attend(seg: Segments, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return backend.attend(q[None], k[None], v[None], Bias.block(seg), p=dropout_p, scale=scale)[0]

        return run_plan(plan, query, key, value, attend)


def dense_bias(mask: AttentionMask) -> BiasKind:
    """The bias for a mask without visible padding, over keys already cut at `visible_key_len`."""
    if not mask.causal or mask.q_len == 1:
        return "none"
    return "causal" if mask.q_offset == 0 else "causal_from_bottom_right"


@lru_cache(maxsize=1)
def load() -> XformersOps:
    if not _present():
        raise BackendUnavailableError(f"attention 'xformers': xformers is not installed; {INSTALL_HINT}")
    return XformersOps()


def _present() -> bool:
    try:
        return importlib.util.find_spec("xformers") is not None
    except (ImportError, ValueError):
        return False


@lru_cache(maxsize=None)
def _import_error() -> str | None:
    try:
        importlib.import_module("xformers.ops.fmha")
    except Exception as exc:  # noqa: BLE001 - a wheel built for another torch fails here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


@lru_cache(maxsize=None)
def _run_error(device: torch.device) -> str | None:
    """One tiny attention call: a wheel whose CUDA operators do not load for this torch imports fine but
    refuses every input (xformers 0.0.35 under torch 2.11: "xFormers wasn't build with CUDA support")."""
    try:
        q = torch.randn(1, 2, 1, 64, device=device, dtype=torch.float16)
        importlib.import_module("xformers.ops.fmha").memory_efficient_attention(q, q, q)
    except Exception as exc:  # noqa: BLE001 - whatever the library raises is the reason
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "build" in line or "built" in line), lines[0] if lines else "")
        return f"{type(exc).__name__}: {detail}"
    return None


def unavailable_reasons(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Why xformers cannot run here; device/dtype support itself is reported by the registry's capabilities."""
    device = torch.device(device)
    reasons = [] if _present() else [f"xformers is not installed: {INSTALL_HINT}"]
    reasons += cuda_reasons(device, MIN_CAPABILITY)
    if not reasons and device.type == "cuda":
        error = _import_error()
        if error:
            reasons.append(f"xformers is installed but does not import: {error}")
        elif error := _run_error(torch.device("cuda", device.index or 0)):
            reasons.append(f"xformers is installed but cannot run on this GPU with this torch ({error}); "
                           f"`python -m xformers.info` lists its operators. {INSTALL_HINT}")
    return reasons


def xformers(params: Any, ctx: Any) -> XformersAttention:
    return XformersAttention()


def check(device: torch.device, dtype: torch.dtype) -> list[str]:
    return unavailable_reasons(device, dtype)


@optkit.hookimpl
def optkit_register(registry: Registry) -> None:
    registry.register("attention", "xformers", xformers, capabilities=CAPABILITIES, check=check,
                      description="xformers memory_efficient_attention: fp16/bf16 on CUDA, block-diagonal "
                                  "biases for padding")
