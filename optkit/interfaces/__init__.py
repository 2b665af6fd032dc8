"""Typed interfaces, one per component kind. Implementations come from plugins."""

from optkit.interfaces.adapters import LinearAdapter, MergeableLinear, WrappableLinear
from optkit.interfaces.attention import AttentionKernel, AttentionResult, is_power_of_two
from optkit.interfaces.cache import KVCache, KVCacheFactory
from optkit.interfaces.components import (
    DecoderBlock,
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
from optkit.interfaces.parallel import ShardStyle, TensorParallel
from optkit.interfaces.placement import Offloadable, Placement, PlacementUnit

__all__ = [
    "LinearAdapter", "MergeableLinear", "Offloadable", "Placement", "PlacementUnit", "ShardStyle", "TensorParallel",
    "WrappableLinear",
    "AttentionKernel", "AttentionMask", "DecoderBlock", "AttentionResult", "Head", "HeadInputs", "HeadMatmul", "KVCache",
    "KVCacheFactory", "LinearFactory", "MLP", "Norm", "NormFactory", "PositionalEmbedding",
    "StackableLinear", "TokenEmbedding", "is_power_of_two",
]
