"""optkit's attention mask as variable-length ("varlen") calls: pure torch index math, no GPU library.

Why this exists: flash-attn's ``flash_attn_varlen_func`` and xformers' block-diagonal biases know one mask per
packed sequence, *full* or *causal aligned to the bottom-right corner* (query ``i`` of ``n_q`` may see keys
``j <= i + n_k - n_q``). optkit's `AttentionMask` is richer: causal at a cache offset, arbitrary key padding,
unwritten static-cache slots. This module rewrites any such mask, exactly, as at most two varlen calls:

* **causal call** -- per batch row, the queries whose own position is a real token ("stepping" queries) against
  the real keys up to the last query. Query ``i`` sees every real key ``<= q_offset + i``; after dropping pad keys
  that is a prefix of the real keys that grows by one per stepping query, i.e. bottom-right causal.
* **full call** -- queries sitting on a pad position that still see some key (right padding, pads between tokens,
  non-causal masks). Such a query sees the same keys as the last real token before it, but with its own query
  vector, so runs of them that see the same ``c`` keys form one sequence with full (non-causal) attention over
  the first ``c`` real keys of their row.

Queries that see no key at all (left padding) are in no call and come out as zeros: the shared contract.
Everything is on the mask's device; the only host syncs are the sequence-length maxima the kernels need.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from optkit.interfaces import AttentionMask


@dataclass(frozen=True)
class Segments:
    """One varlen call: which query/key rows go in, packed and cut into sequences.

    ``q_index`` indexes the ``(batch * q_len)`` flattened queries, ``k_index`` the ``(batch * key_len)``
    flattened keys (see `VarlenPlan.key_len`). ``cu_seqlens_*`` are int32 offsets into the packed rows.
    """

    q_index: Tensor
    k_index: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool

    @property
    def seqlens_q(self) -> list[int]:
        """Per-sequence query lengths as Python ints (xformers' ``from_seqlens`` wants lists)."""
        return self.cu_seqlens_q.diff().tolist()

    @property
    def seqlens_k(self) -> list[int]:
        return self.cu_seqlens_k.diff().tolist()


@dataclass(frozen=True)
class VarlenPlan:
    """The calls that together compute one masked attention; queries in no call output zero."""

    batch_size: int
    q_len: int
    key_len: int  # keys past this are never visible (causal): slice k/v to it before flattening
    calls: tuple[Segments, ...]


def visible_key_len(mask: AttentionMask) -> int:
    """Keys a causal query can ever see end at the last query; the rest (static-cache slots) are dropped."""
    return mask.q_offset + mask.q_len if mask.causal else mask.kv_len


def needs_varlen(mask: AttentionMask) -> bool:
    """True when some visible key is padding; otherwise a dense call (plain or bottom-right causal) is exact."""
    if mask.key_padding is None:
        return False
    return not bool(mask.key_padding[:, : visible_key_len(mask)].all())


def _cu_seqlens(lengths: Tensor) -> Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _segments(q_index: Tensor, k_index: Tensor, seqlens_q: Tensor, seqlens_k: Tensor, causal: bool) -> Segments:
    return Segments(q_index=q_index, k_index=k_index, cu_seqlens_q=_cu_seqlens(seqlens_q),
                    cu_seqlens_k=_cu_seqlens(seqlens_k), max_seqlen_q=int(seqlens_q.max()),
                    max_seqlen_k=int(seqlens_k.max()), causal=causal)


def _causal_call(real: Tensor, stepping: Tensor) -> Segments | None:
    """Stepping queries of each row against that row's real keys, bottom-right causal."""
    n_q = stepping.sum(1)
    rows = n_q > 0
    if not bool(rows.any()):
        return None
    q_index = stepping.flatten().nonzero().squeeze(1)
    k_index = (real & rows[:, None]).flatten().nonzero().squeeze(1)
    return _segments(q_index, k_index, n_q[rows], real.sum(1)[rows], causal=True)


def _full_call(real: Tensor, seen: Tensor, flat: Tensor) -> Segments | None:
    """Pad-position queries grouped by (row, number of real keys seen); each group sees a key prefix, unmasked."""
    q_index = flat.flatten().nonzero().squeeze(1)
    if q_index.numel() == 0:
        return None
    key_len = real.shape[1]
    rows = q_index // flat.shape[1]
    groups, seqlens_q = torch.unique_consecutive(rows * (key_len + 1) + seen.flatten()[q_index],
                                                 return_counts=True)
    group_row, seqlens_k = groups // (key_len + 1), groups % (key_len + 1)
    real_keys = real.flatten().nonzero().squeeze(1)  # compacted real keys, row after row
    row_start = torch.cumsum(real.sum(1), 0) - real.sum(1)
    starts = torch.repeat_interleave(row_start[group_row], seqlens_k)
    within = torch.arange(int(seqlens_k.sum()), device=real.device)
    within = within - torch.repeat_interleave(torch.cumsum(seqlens_k, 0) - seqlens_k, seqlens_k)
    return _segments(q_index, real_keys[starts + within], seqlens_q, seqlens_k, causal=False)


def plan_varlen(mask: AttentionMask, device: torch.device | str | None = None) -> VarlenPlan:
    """Rewrite ``mask`` exactly as at most two varlen calls (see the module docstring for why this is exact)."""
    key_len = visible_key_len(mask)
    padding = mask.key_padding
    if padding is None:
        real = torch.ones(mask.batch_size, key_len, dtype=torch.bool, device=device)
    else:
        real = padding[:, :key_len].to(device) if device is not None else padding[:, :key_len]
    start, stop = mask.q_offset, mask.q_offset + mask.q_len
    if mask.causal:
        stepping = real[:, start:stop]
        seen = torch.cumsum(real, 1)[:, start:stop]
    else:
        stepping = torch.zeros(mask.batch_size, mask.q_len, dtype=torch.bool, device=real.device)
        seen = real.sum(1, keepdim=True).expand(mask.batch_size, mask.q_len)
    calls = (_causal_call(real, stepping), _full_call(real, seen, ~stepping & (seen > 0)))
    return VarlenPlan(mask.batch_size, mask.q_len, key_len, tuple(c for c in calls if c is not None))


_PLANS: "weakref.WeakKeyDictionary[AttentionMask, dict[str, VarlenPlan | None]]" = weakref.WeakKeyDictionary()


def plan_for(mask: AttentionMask, device: torch.device) -> VarlenPlan | None:
    """`plan_varlen` computed once per mask object, or None when one dense call is exact.

    The core builds one `AttentionMask` per forward and hands it to every layer, so caching on the mask makes
    a 24-layer model pay for one plan (and its host syncs) instead of 24.
    """
    per_device = _PLANS.setdefault(mask, {})
    key = str(device)
    if key not in per_device:
        per_device[key] = plan_varlen(mask, device) if needs_varlen(mask) else None
    return per_device[key]


Attend = Callable[[Segments, Tensor, Tensor, Tensor], Tensor]
"""(segments, packed q (total_q, H, D), packed k, packed v (total_k, H, D)) -> packed output (total_q, H, D)."""


def run_plan(plan: VarlenPlan, query: Tensor, key: Tensor, value: Tensor, attend: Attend) -> Tensor:
    """Gather rows per call, run ``attend``, scatter into zeros: ``(B, H, T, D)`` in, ``(B, H, T, D)`` out.

    Differentiable with respect to q/k/v (gathers and ``index_copy`` have gradients), so backward works
    whenever ``attend`` has one.
    """
    batch, heads, q_len, dim = query.shape
    q_rows = query.transpose(1, 2).reshape(batch * q_len, heads, dim)
    k_rows = key[:, :, : plan.key_len].transpose(1, 2).reshape(batch * plan.key_len, heads, dim)
    v_rows = value[:, :, : plan.key_len].transpose(1, 2).reshape(batch * plan.key_len, heads, value.shape[-1])
    out = query.new_zeros(batch * q_len, heads, value.shape[-1])
    for seg in plan.calls:
        packed = attend(seg, q_rows.index_select(0, seg.q_index), k_rows.index_select(0, seg.k_index),
                        v_rows.index_select(0, seg.k_index))
        out = out.index_copy(0, seg.q_index, packed.to(out.dtype))
    if not plan.calls and torch.is_grad_enabled():  # nothing visible anywhere: zero gradients, as eager, not an error
        out = out + (q_rows[:0].sum() + k_rows[:0].sum() + v_rows[:0].sum())  # empty sums are exactly 0
    return out.view(batch, q_len, heads, -1).transpose(1, 2)
