"""Typed interfaces, one per component kind. Implementations come from plugins."""

from optkit.interfaces.attention import AttentionKernel, AttentionResult
from optkit.interfaces.cache import KVCache, KVCacheFactory
from optkit.interfaces.components import (
    MLP,
    Head,
    HeadInputs,
    LinearFactory,
    Norm,
    NormFactory,
    PositionalEmbedding,
    TokenEmbedding,
)
from optkit.interfaces.mask import AttentionMask

__all__ = [
    "AttentionKernel", "AttentionMask", "AttentionResult", "Head", "HeadInputs", "KVCache",
    "KVCacheFactory", "LinearFactory", "MLP", "Norm", "NormFactory", "PositionalEmbedding",
    "TokenEmbedding",
]
