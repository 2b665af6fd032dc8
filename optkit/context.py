"""What a component factory receives: the spec, where it is built, and the sub-components built before it.

Its own module so that every layer can use it: the builder fills it, ``Model.new_cache`` uses it for
fresh caches, the conformance kit for lone components -- none of them importing another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from optkit.interfaces import LinearFactory, NormFactory, TokenEmbedding
from optkit.registry import Registry
from optkit.spec import ComponentRef, DecoderSpec, ModelSpec


@dataclass
class BuildContext:
    """What a component factory sees: the spec, the target device/dtype, and the sub-components
    built before it (the linear and norm factories every projection/norm comes from, and the token
    embedding a tied head shares)."""

    spec: ModelSpec
    registry: Registry
    device: torch.device
    dtype: torch.dtype
    linear_factory: LinearFactory | None = None
    norm_factory: NormFactory | None = None
    token_embedding: TokenEmbedding | None = None

    @property
    def decoder(self) -> DecoderSpec:
        return self.spec.decoder

    def ref(self, kind: str) -> ComponentRef:
        return self.spec.head if kind == "head" else getattr(self.spec.decoder, kind)

    def create(self, kind: str, ref: ComponentRef | None = None) -> Any:
        ref = ref or self.ref(kind)
        entry = self.registry.get(kind, ref.name)
        params: BaseModel = entry.params.model_validate(ref.params)
        return entry.factory(params, self)

    def linear(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        if self.linear_factory is None:
            self.linear_factory = self.create("linear")
        return self.linear_factory(in_features, out_features, bias=bias)

    def norm(self, dim: int) -> nn.Module:
        if self.norm_factory is None:
            self.norm_factory = self.create("norm")
        return self.norm_factory(dim)
