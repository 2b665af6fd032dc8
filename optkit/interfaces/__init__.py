"""Typed interfaces, one per component kind. Implementations come from plugins."""

from optkit.interfaces.attention import AttentionKernel, AttentionResult, is_power_of_two
from optkit.interfaces.cache import KVCache, KVCacheFactory
from optkit.interfaces.components import (
    MLP,
    Head,
    HeadInputs,
    HeadMatmul,
    LinearFactory,
    Norm,
    NormFactory,
    PositionalEmbedding,
    StackableLinear,
    TokenEmbedding,
)
from optkit.interfaces.mask import AttentionMask

__all__ = [
    "AttentionKernel", "AttentionMask", "AttentionResult", "Head", "HeadInputs", "HeadMatmul", "KVCache",
    "KVCacheFactory", "LinearFactory", "MLP", "Norm", "NormFactory", "PositionalEmbedding",
    "StackableLinear", "TokenEmbedding", "is_power_of_two",
]
