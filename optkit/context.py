"""What a component factory receives: the spec, where it is built, and the sub-components built before it.

Its own module so that every layer can use it: the builder fills it, ``Model.new_cache`` uses it for
fresh caches, the conformance kit for lone components -- none of them importing another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from optkit.errors import ComponentError, OptkitError, SpecValidationError, brief_repr
from optkit.interfaces import (
    MLP,
    AttentionKernel,
    DecoderBlock,
    Head,
    LinearFactory,
    NormFactory,
    PositionalEmbedding,
    TokenEmbedding,
)
from optkit.plugins import describe, guarded
from optkit.registration import Registry
from optkit.spec import ComponentRef, DecoderSpec, ModelSpec, _pydantic_problems


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
        """Build one component through its registration, and check what the plugin's factory returned
        against its kind's interface: a broken plugin is one ComponentError here, naming the component,
        the plugin and the problem -- never a TypeError at the first forward."""
        ref = ref or self.ref(kind)
        entry = self.registry.get(kind, ref.name)
        try:
            params: BaseModel = entry.params.model_validate(ref.params)
        except ValidationError as exc:
            raise SpecValidationError(_pydantic_problems(exc, prefix=f"{kind}.params")) from None
        what = f"{kind} '{ref.name}' from {entry.provider}"
        try:
            with guarded():
                component = entry.factory(params, self)
        except OptkitError:
            raise  # already says what is wrong (a nested component, or the plugin's own deliberate error)
        except Exception as exc:  # noqa: BLE001 - a plugin bug, reported with the plugin's name
            raise ComponentError(f"{what} failed to build: {describe(exc)}") from exc
        problem = _interface_problem(kind, component, self)
        if problem:
            raise ComponentError(f"{what} {problem} (see docs/hooks.md, \"Component kinds\")")
        return component

    def linear(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        if self.linear_factory is None:
            self.linear_factory = self.create("linear")
        return self.linear_factory(in_features, out_features, bias=bias)

    def norm(self, dim: int) -> nn.Module:
        if self.norm_factory is None:
            self.norm_factory = self.create("norm")
        return self.norm_factory(dim)


# What a factory of each kind must return (docs/hooks.md, "Component kinds"); None: a callable factory.
_INTERFACES: dict[str, type | None] = {
    "token_embedding": TokenEmbedding, "positional_embedding": PositionalEmbedding, "attention": AttentionKernel,
    "mlp": MLP, "block": DecoderBlock, "head": Head, "norm": None, "linear": None, "kv_cache": None,
}


def _interface_problem(kind: str, component: Any, ctx: BuildContext) -> str | None:
    """Why ``component`` cannot serve as a ``kind`` (None: it can, as far as building can tell)."""
    interface = _INTERFACES.get(kind)
    got = f"{brief_repr(component, 80)} ({type(component).__name__})"
    if interface is None:
        return None if callable(component) else f"returned {got}, which is not callable; a {kind} factory " \
                                                  f"returns a factory of {kind} modules"
    if not isinstance(component, interface):
        return f"returned {got}, not an optkit.interfaces.{interface.__name__}"
    if kind == "attention" and next(component.parameters(), None) is not None:
        return "returned an attention kernel with parameters; a kernel computes only (weights belong to the block)"
    if kind == "token_embedding" and component.embedding_dim != ctx.decoder.embed_dim:
        return (f"built a token embedding {component.embedding_dim} wide, but the spec needs "
                f"{ctx.decoder.embed_dim} (decoder.word_embed_proj_dim or hidden_size)")
    if kind == "mlp":
        return _mlp_width_problem(component, ctx.decoder.hidden_size)
    return None


def _mlp_width_problem(mlp: nn.Module, width: int) -> str | None:
    """Run the MLP once on a meta tensor (no memory, no data, no random numbers) and check that it maps
    hidden_size features to hidden_size features. An MLP that cannot run on meta is not judged here."""
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in [*mlp.named_parameters(), *mlp.named_buffers()]}
    dtype = next((t.dtype for t in meta.values() if t.is_floating_point()), torch.get_default_dtype())
    x = torch.empty(1, 1, width, device="meta", dtype=dtype)
    try:
        with guarded(), torch.no_grad():
            out = torch.func.functional_call(mlp, meta, (x,), strict=False)
    except Exception:  # noqa: BLE001 - unsupported on meta (a custom kernel): the first forward will tell
        return None
    if not isinstance(out, torch.Tensor):
        return f"built an MLP whose forward returns {brief_repr(out, 80)}, not a tensor"
    if tuple(out.shape) != (1, 1, width):
        return (f"built an MLP that maps {width} features (decoder.hidden_size) to shape {tuple(out.shape)} for an "
                f"input of shape (1, 1, {width}); an mlp must return hidden_size features")
    return None
