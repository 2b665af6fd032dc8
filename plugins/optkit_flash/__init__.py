"""FlashAttention as an optkit attention backend (``attention="flash"``).

Three implementations (`library.ORDER`): flash-attn 2, FlashAttention-4, and the FlashAttention-2 kernels torch
itself ships (`torch_kernels`, any CUDA build of torch, no install). flash-attn is imported on first use, never at
plugin import, so this plugin always loads and can explain why flash is unavailable (no library and a CPU-only
torch, no CUDA, an old GPU, float32). Masks map onto all three exactly:

* no visible padding: ``flash_attn_func`` (torch: ``_flash_attention_forward`` without ``cum_seq_*``); causal
  with a cache offset uses the bottom-right alignment all three share (flash-attn >= 2.1) over the keys up to the
  last query, so unwritten static-cache slots never enter;
* padding: `varlen.plan_varlen` packs the real rows and calls ``flash_attn_varlen_func`` (torch: the same op with
  ``cum_seq_q``/``cum_seq_k``) at most twice;
  pad positions are zero-filled, the contract every backend shares (never NaN).

``scale`` goes to flash-attn as ``softmax_scale`` unchanged (1.0 from the reference OPT block, which pre-scales q;
``head_dim**-0.5`` from the prepared block when that is a power of two -- see optkit.inference).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

import optkit
from optkit.interfaces import AttentionKernel, AttentionMask, AttentionResult
from optkit.registration import Capabilities, Registry

from . import library
from .library import FlashBackend, Implementation, check_head_dim
from .varlen import Segments, VarlenPlan, plan_for, run_plan, visible_key_len

OPTKIT_PLUGIN_API = 1
CAPABILITIES = Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"float16", "bfloat16"}), padding=True,
                            kv_cache=True, dropout=True, attention_weights=False, backward=True)


class FlashParams(BaseModel):
    """``implementation``: "auto" (the first usable of flash-attn 2, FA4, torch's own kernels), or force
    "fa2" / "fa4" / "torch"."""

    model_config = ConfigDict(extra="forbid")

    implementation: Implementation = "auto"


class FlashAttention(AttentionKernel):
    """Compute-only kernel; ``backend`` is injectable so the mask handling is testable without a GPU."""

    name = "flash"

    def __init__(self, implementation: Implementation = "auto", backend: FlashBackend | None = None) -> None:
        super().__init__()
        self.implementation = implementation
        self._backend = backend

    @property
    def backend(self) -> FlashBackend:
        if self._backend is None:
            self._backend = library.load(self.implementation)
        return self._backend

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *, scale: float,
                dropout_p: float = 0.0, need_weights: bool = False) -> AttentionResult:
        if need_weights:
            raise NotImplementedError("flash cannot return attention weights; use attention='eager'")
        check_head_dim(query.shape[-1])
        backend = self.backend
        backend.validate(query, dropout_p)
        plan = plan_for(mask, query.device)
        if plan is not None:
            return AttentionResult(self._varlen(backend, query, key, value, plan, scale, dropout_p), None)
        return AttentionResult(self._dense(backend, query, key, value, mask, scale, dropout_p), None)

    @staticmethod
    def _dense(backend: FlashBackend, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask,
               scale: float, dropout_p: float) -> Tensor:
        """No visible padding: one call; bottom-right causal equals "key <= q_offset + i" over the visible keys."""
        keys = visible_key_len(mask)
        causal = mask.causal and mask.q_len > 1  # one query at the end sees every visible key
        out = backend.dense(query.transpose(1, 2), key[:, :, :keys].transpose(1, 2),
                            value[:, :, :keys].transpose(1, 2), causal=causal, scale=scale, dropout_p=dropout_p)
        return out.transpose(1, 2)

    @staticmethod
    def _varlen(backend: FlashBackend, query: Tensor, key: Tensor, value: Tensor, plan: VarlenPlan,
                scale: float, dropout_p: float) -> Tensor:
        def attend(seg: Segments, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return backend.varlen(q, k, v, seg, scale=scale, dropout_p=dropout_p)

        return run_plan(plan, query, key, value, attend)

    def extra_repr(self) -> str:
        return f"backend='flash', implementation={self.implementation!r}"


def flash(params: FlashParams | None, ctx: Any) -> FlashAttention:
    """Refuse an unsupported head_dim at build time rather than at the first forward."""
    params = params or FlashParams()
    if ctx is not None:
        check_head_dim(ctx.decoder.head_dim)
    return FlashAttention(params.implementation)


def check(device: torch.device, dtype: torch.dtype) -> list[str]:
    return library.unavailable_reasons(device, dtype)


def auto_check(device: torch.device, dtype: torch.dtype) -> list[str]:
    """``attention="auto"`` takes flash only from a flash library: torch's own flash kernels are the ones
    ``sdpa`` already dispatches to, and sdpa keeps CUDA-graph decoding, which flash does not declare."""
    if library.resolve(device)[0] == "torch":
        return ["only torch's own flash kernels are present, which sdpa already runs (with CUDA-graph decoding); "
                "name attention='flash' to use them"]
    return []


@optkit.hookimpl
def optkit_register(registry: Registry) -> None:
    registry.register("attention", "flash", flash, params=FlashParams, capabilities=CAPABILITIES, check=check,
                      auto_check=auto_check,
                      description="flash-attn 2 / FlashAttention-4 / torch's FA2 kernels: fp16/bf16 on CUDA, varlen "
                                  "for padding")
