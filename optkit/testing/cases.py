"""Random attention inputs for the conformance kit: one hypothesis strategy, one case type.

A case is plain data (sizes, padding layout, scale, seed) so that a failure message can
print it and a plugin author can rebuild the exact tensors with ``case.tensors()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

from optkit.interfaces import AttentionMask
from optkit.registration import Capabilities

PADDING_LAYOUTS = ("none", "left", "right", "slots", "random")
SHORT = st.integers(1, 8)
# Lengths that cross the usual chunk/tile sizes of blocked kernels (16, 32, 64, 128).
LONG_Q = st.sampled_from([1, 17, 63, 64, 65, 127])
LONG_PAST = st.sampled_from([0, 15, 33, 64, 96])


@dataclass(frozen=True)
class AttentionCase:
    """One kernel call: ``q (batch, heads, q_len, head_dim)`` against ``kv_len`` keys.

    Query ``i`` sits at key position ``past + i``. ``pads`` are per-row padding counts whose
    meaning depends on ``padding``: ``left``/``right`` pad that many keys at that end (a
    count of ``kv_len`` pads the whole row), ``slots`` left-pads and adds ``slots``
    never-written keys at the end (a static cache), ``random`` pads scattered keys.
    """

    batch: int
    heads: int
    head_dim: int
    q_len: int
    past: int
    causal: bool = True
    padding: str = "none"
    pads: tuple[int, ...] = ()
    slots: int = 0
    scale: float = 1.0
    spread: float = 1.0
    seed: int = 0

    @property
    def kv_len(self) -> int:
        return self.past + self.q_len + self.slots

    def describe(self) -> str:
        """The case in one line, for failure messages."""
        pads = f"{self.padding}{list(self.pads)}" if self.pads else self.padding
        return (f"batch={self.batch} heads={self.heads} head_dim={self.head_dim} q_len={self.q_len} "
                f"kv_len={self.kv_len} q_offset={self.past} causal={self.causal} padding={pads} "
                f"scale={self.scale:g} spread={self.spread:g} seed={self.seed}")

    def key_padding(self, device: torch.device | str = "cpu") -> Tensor | None:
        """``(batch, kv_len)`` bool, True = real key; None when nothing is padded."""
        if self.padding == "none":
            return None
        keep = torch.ones(self.batch, self.kv_len, dtype=torch.bool)
        for row, pad in enumerate(self.pads):
            if self.padding in ("left", "slots"):
                keep[row, :pad] = False
            elif self.padding == "right" and pad:
                keep[row, self.kv_len - pad:] = False
        if self.padding == "slots" and self.slots:
            keep[:, self.kv_len - self.slots:] = False
        if self.padding == "random":
            g = torch.Generator().manual_seed(self.seed + 1)
            keep = torch.rand(self.batch, self.kv_len, generator=g) > 0.3
        return keep.to(device)

    def mask(self, device: torch.device | str = "cpu") -> AttentionMask:
        return AttentionMask(batch_size=self.batch, q_len=self.q_len, kv_len=self.kv_len, q_offset=self.past,
                             key_padding=self.key_padding(device), causal=self.causal)

    def tensors(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                ) -> tuple[Tensor, Tensor, Tensor, AttentionMask]:
        """q, k, v (rounded to ``dtype``) and the mask; the same seed gives the same values."""
        g = torch.Generator().manual_seed(self.seed)
        shapes = [(self.batch, self.heads, n, self.head_dim) for n in (self.q_len, self.kv_len, self.kv_len)]
        q, k, v = (torch.randn(shape, generator=g) * self.spread for shape in shapes)
        return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), self.mask(device)


@st.composite
def attention_cases(draw: st.DrawFn, capabilities: Capabilities | None = None, *, long: bool = True,
                    max_head_dim: int = 128) -> AttentionCase:
    """Cases a backend with ``capabilities`` must handle: no padding unless it declares
    padding, no cache offset unless it declares kv_cache."""
    caps = capabilities or Capabilities()
    lengths = st.one_of(SHORT, LONG_Q) if long else SHORT
    pasts = st.one_of(st.integers(0, 8), LONG_PAST) if long else st.integers(0, 8)
    batch = draw(st.integers(1, 3))
    q_len = draw(lengths)
    past = draw(pasts) if caps.kv_cache else 0
    padding = draw(st.sampled_from(PADDING_LAYOUTS)) if caps.padding else "none"
    slots = draw(st.integers(1, 9)) if padding == "slots" else 0
    kv_len = past + q_len + slots
    counted = padding in ("left", "right", "slots")
    pads = tuple(draw(st.integers(0, kv_len)) for _ in range(batch)) if counted else ()
    head_dim = draw(st.integers(1, max_head_dim // 8).map(lambda n: 8 * n))
    scale = draw(st.one_of(st.just(head_dim**-0.5), st.just(1.0), st.floats(0.05, 2.0)))
    return AttentionCase(
        batch=batch, heads=draw(st.integers(1, 4)), head_dim=head_dim, q_len=q_len, past=past,
        causal=draw(st.sampled_from([True, True, True, False])), padding=padding, pads=pads, slots=slots,
        scale=scale, spread=draw(st.sampled_from([1.0, 0.1, 3.0])), seed=draw(st.integers(0, 2**16)))


def empty_row_cases() -> list[AttentionCase]:
    """Fixed cases with query rows that may see no key at all (and so must come out as 0)."""
    return [
        AttentionCase(batch=2, heads=2, head_dim=8, q_len=6, past=0, padding="left", pads=(3, 6)),
        AttentionCase(batch=2, heads=1, head_dim=16, q_len=1, past=5, padding="left", pads=(6, 2)),
        AttentionCase(batch=2, heads=2, head_dim=8, q_len=3, past=2, padding="slots", pads=(5, 0), slots=4),
        AttentionCase(batch=3, heads=2, head_dim=128, q_len=70, past=60, padding="left", pads=(130, 75, 0),
                      scale=128**-0.5),
        AttentionCase(batch=2, heads=2, head_dim=64, q_len=5, past=0, causal=False, padding="right",
                      pads=(5, 1), scale=0.125),
    ]
