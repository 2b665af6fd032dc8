"""Chunked attention with an online softmax: an example third-party optkit plugin.

Keys and values are visited ``chunk_size`` at a time while each query row keeps a running
maximum ``m``, a running normaliser ``l`` and an unnormalised output ``acc`` (the
FlashAttention recurrence). The full ``(q_len, kv_len)`` score matrix never exists, only one
``(q_len, chunk_size)`` slice of it, so memory grows with the chunk, not with the context.

Plain torch ops only: it runs on every device and dtype torch does, and autograd provides
the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

import optkit
from optkit.interfaces import AttentionKernel, AttentionMask, AttentionResult
from optkit.registration import Capabilities

OPTKIT_PLUGIN_API = 1
NAME = "chunked"


class ChunkedParams(BaseModel):
    """``decoder.attention.params`` of this backend; unknown keys are spec errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_size: int = Field(default=64, ge=1, description="keys per step of the online softmax")


class ChunkedAttention(AttentionKernel):
    """softmax(scale * q k^T) v, one chunk of keys at a time."""

    name = NAME

    def __init__(self, chunk_size: int = 64) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *, scale: float,
                dropout_p: float = 0.0, need_weights: bool = False) -> AttentionResult:
        if need_weights:
            raise NotImplementedError(
                "chunked attention never materialises the attention weights; "
                "use attention='eager' for output_attentions=True")
        allowed = mask.allowed(query.device)
        state = _initial_state(query)
        for start in range(0, key.shape[-2], self.chunk_size):
            if _past_last_query(mask, start):
                break
            stop = start + self.chunk_size
            state = _step(state, query, key[..., start:stop, :], value[..., start:stop, :],
                          allowed[..., start:stop], scale, dropout_p)
        return AttentionResult(_finish(state, query.dtype), None)

    def extra_repr(self) -> str:
        return f"backend={self.name!r}, chunk_size={self.chunk_size}"


State = tuple[Tensor, Tensor, Tensor]  # running max m, normaliser l (both (B, H, Tq, 1)), acc (B, H, Tq, D)


def _initial_state(query: Tensor) -> State:
    """m = -inf, l = 0, acc = 0, in fp32 (the eager reference also normalises in fp32)."""
    rows = (*query.shape[:-1], 1)
    m = torch.full(rows, float("-inf"), dtype=torch.float32, device=query.device)
    l = torch.zeros(rows, dtype=torch.float32, device=query.device)  # noqa: E741 - the paper's name
    acc = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    return m, l, acc


def _past_last_query(mask: AttentionMask, start: int) -> bool:
    """Causal chunks that start after the last query's position hold no visible key."""
    return mask.causal and start > mask.q_offset + mask.q_len - 1


def _step(state: State, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor, scale: float,
          dropout_p: float) -> State:
    """Fold one chunk of keys into the running (m, l, acc)."""
    m, l, acc = state  # noqa: E741
    scores = torch.matmul(query, key.transpose(-1, -2))  # in the input dtype, as eager computes them
    scores = (scores.float() * scale).masked_fill(~allowed, float("-inf"))
    # The running max only keeps exp() in range: the result does not depend on it (it cancels
    # between acc and l), so it is a constant to autograd. Detaching it everywhere, not just
    # here or there, is what keeps the gradient exact.
    m_new = torch.maximum(m, scores.detach().amax(dim=-1, keepdim=True))
    # Rows that have seen no key yet keep m = -inf; shifting them by 0 instead makes every
    # exp() an exact 0 rather than exp(-inf - -inf) = NaN.
    shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    probs = torch.exp(scores - shift)
    rescale = torch.exp(m - shift)
    kept = F.dropout(probs, p=dropout_p, training=True) if dropout_p > 0.0 else probs
    acc = acc * rescale + torch.matmul(kept, value.float())
    l = l * rescale + probs.sum(dim=-1, keepdim=True)  # noqa: E741 - dropout never touches the normaliser
    return m_new, l, acc


def _finish(state: State, dtype: torch.dtype) -> Tensor:
    """acc / l; rows that saw no key have acc = l = 0 and come out as exact zeros.

    After the last step l is either 0 (no visible key) or >= 1 (the maximal key contributes
    exp(0) = 1), so dividing by max(l, 1) is exact where it matters, gives 0/1 = 0 on empty
    rows, and never puts an inf or NaN into the backward pass (torch.where would).
    """
    _, l, acc = state  # noqa: E741
    return (acc / l.clamp_min(1.0)).to(dtype)


def chunked(params: ChunkedParams, ctx: object) -> ChunkedAttention:
    """Factory: one kernel per layer, configured by the spec's params."""
    return ChunkedAttention(chunk_size=params.chunk_size)


CAPABILITIES = Capabilities(
    devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
    dtypes=frozenset({"float32", "float16", "bfloat16"}),
    padding=True,
    kv_cache=True,
    dropout=True,
    attention_weights=False,
    backward=True,
)


@optkit.hookimpl
def optkit_register(registry) -> None:
    """Called once by optkit's plugin loader with the global registry."""
    registry.register("attention", NAME, chunked, params=ChunkedParams, capabilities=CAPABILITIES,
                      description="chunked keys with an online softmax (plain torch; memory O(chunk))")
