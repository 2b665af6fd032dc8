"""What a component factory receives: the spec, where it is built, and the sub-components built before it.

Its own module so that every layer can use it: the builder fills it, ``Model.new_cache`` uses it for
fresh caches, the conformance kit for lone components -- none of them importing another.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optkit.errors import ComponentError, OptkitError, SpecValidationError, brief_repr
from optkit.interfaces import (
    MLP,
    AttentionKernel,
    DecoderBlock,
    Head,
    KVCache,
    LinearFactory,
    NormFactory,
    PositionalEmbedding,
    TokenEmbedding,
    WrappableLinear,
)
from optkit.plugins import FIRST_PARTY, describe, guarded
from optkit.registration import Registry
from optkit.spec import ComponentRef, DecoderSpec, ModelSpec, validated_params


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
        params, problems = validated_params(entry, ref.params, f"{kind}.params")
        if problems:
            raise SpecValidationError(problems)
        what = f"{kind} '{ref.name}' from {entry.provider}"
        try:
            with guarded():
                component = entry.factory(params, self)
        except OptkitError:
            raise  # already says what is wrong (a nested component, or the plugin's own deliberate error)
        except Exception as exc:  # noqa: BLE001 - a plugin bug, reported with the plugin's name
            raise ComponentError(f"{what} failed to build: {describe(exc)}{_avoid(kind, entry.provider)}") from exc
        problem = _interface_problem(kind, component, self)
        if problem:
            raise ComponentError(f"{what} {problem} (see docs/hooks.md, \"Component kinds\")")
        return CheckedCacheFactory(component, what) if kind == "kv_cache" else component

    def linear(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module:
        if self.linear_factory is None:
            self.linear_factory = self.create("linear")
        layer = self._made("linear", lambda: self.linear_factory(in_features, out_features, bias=bias))
        problem = _linear_problem(layer, in_features, out_features)
        if problem:
            raise ComponentError(f"{self._what('linear')} {problem} (see docs/hooks.md, \"Component kinds\")")
        return layer

    def norm(self, dim: int) -> nn.Module:
        if self.norm_factory is None:
            self.norm_factory = self.create("norm")
        norm = self._made("norm", lambda: self.norm_factory(dim))
        problem = _width_problem(norm, dim, dim, "a norm", f"dim={dim}") if isinstance(norm, nn.Module) \
            else f"built {brief_repr(norm, 80)} ({type(norm).__name__}), not an nn.Module"
        if problem:
            raise ComponentError(f"{self._what('norm')} {problem} (see docs/hooks.md, \"Component kinds\")")
        return norm

    def _what(self, kind: str, ref: ComponentRef | None = None) -> str:
        ref = ref or self.ref(kind)
        return f"{kind} '{ref.name}' from {self.registry.get(kind, ref.name).provider}"

    def _made(self, kind: str, make: Any) -> Any:
        """What a factory's factory made; its crash is a ComponentError naming the component and plugin."""
        try:
            with guarded():
                return make()
        except OptkitError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin bug, reported with the plugin's name
            provider = self.registry.get(kind, self.ref(kind).name).provider
            raise ComponentError(f"{self._what(kind)} failed to build a {kind}: {describe(exc)}"
                                 f"{_avoid(kind, provider)}") from exc


def _avoid(kind: str, provider: Any) -> str:
    """How a user gets past a third-party component that crashes (an optkit component's crash is optkit's bug)."""
    if provider.distribution in (FIRST_PARTY, "?"):
        return ""
    return (f"; report it to the authors of {provider.distribution}, and meanwhile name another {kind} in the spec "
            f"(optkit info lists them) or block the plugin with OPTKIT_BLOCK_PLUGINS={provider.plugin}")


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
    call_problem = _forward_problem(component, interface)
    if call_problem:
        return call_problem
    if kind == "attention" and next(component.parameters(), None) is not None:
        return "returned an attention kernel with parameters; a kernel computes only (weights belong to the block)"
    if kind == "token_embedding" and component.embedding_dim != ctx.decoder.embed_dim:
        return (f"built a token embedding {component.embedding_dim} wide, but the spec needs "
                f"{ctx.decoder.embed_dim} (decoder.word_embed_proj_dim or hidden_size)")
    if kind == "mlp":
        return _mlp_width_problem(component, ctx.decoder.hidden_size)
    return None


def _forward_problem(component: nn.Module, interface: type) -> str | None:
    """Why optkit cannot call ``component`` the way ``interface.forward`` says it does (positional arguments by
    position, keyword-only ones by name): caught at build time, not as a bare TypeError at the first forward."""
    if "forward" not in vars(interface):
        return None
    try:
        expected = inspect.signature(interface.forward)
        actual = inspect.signature(component.forward)
    except (TypeError, ValueError):  # no signature to read (a builtin, a C extension): the call will tell
        return None
    params = list(expected.parameters.values())[1:]  # without self
    args = [None for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kwargs = {p.name: None for p in params if p.kind is p.KEYWORD_ONLY}
    try:
        actual.bind(*args, **kwargs)
    except TypeError as exc:
        return (f"returned {type(component).__name__} whose forward{_bare(actual.parameters.values())} cannot be "
                f"called as optkit calls an optkit.interfaces.{interface.__name__}, forward{_bare(params)}: {exc}")
    return None


def _bare(params: Any) -> inspect.Signature:
    """A signature without annotations, for messages."""
    return inspect.Signature([p.replace(annotation=p.empty) for p in params])


def _linear_problem(layer: Any, in_features: int, out_features: int) -> str | None:
    """A linear must be a module with the sizes it was asked for (adapters and tensor parallelism read them)."""
    got = f"{brief_repr(layer, 80)} ({type(layer).__name__})"
    if not isinstance(layer, nn.Module):
        return f"built {got}, not an nn.Module"
    if not isinstance(layer, WrappableLinear):
        return (f"built {type(layer).__name__} without in_features/out_features attributes "
                "(optkit.interfaces.WrappableLinear)")
    if (layer.in_features, layer.out_features) != (in_features, out_features):
        return (f"was asked for a {in_features} -> {out_features} linear but built one with in_features="
                f"{layer.in_features}, out_features={layer.out_features}")
    return _width_problem(layer, in_features, out_features, "a linear", f"in_features={in_features}")


class CheckedCacheFactory:
    """A kv_cache factory whose every product is checked to be a KVCache (a ComponentError otherwise)."""

    def __init__(self, factory: Any, what: str) -> None:
        self.factory, self.what = factory, what

    def __call__(self, **shape: Any) -> KVCache:
        try:
            with guarded():
                cache = self.factory(**shape)
        except OptkitError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin bug, reported with the plugin's name
            raise ComponentError(f"{self.what} failed to make a cache: {describe(exc)}") from exc
        if not isinstance(cache, KVCache):
            raise ComponentError(f"{self.what} made {brief_repr(cache, 80)} ({type(cache).__name__}), not an "
                                 "optkit.interfaces.KVCache (see docs/hooks.md, \"Component kinds\")")
        return cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factory, name)


def _mlp_width_problem(mlp: nn.Module, width: int) -> str | None:
    return _width_problem(mlp, width, width, "an MLP", "decoder.hidden_size", "an mlp must return hidden_size features")


def _width_problem(module: nn.Module, width: int, out_width: int, what: str, source: str,
                   rule: str = "") -> str | None:
    """Run the module once on a meta tensor (no memory, no data, no random numbers) and check that it maps
    ``width`` features to ``out_width``. A module that cannot run on meta is not judged here."""
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in [*module.named_parameters(), *module.named_buffers()]}
    dtype = next((t.dtype for t in meta.values() if t.is_floating_point()), torch.get_default_dtype())
    x = torch.empty(1, 1, width, device="meta", dtype=dtype)
    try:
        with guarded(), torch.no_grad():
            out = torch.func.functional_call(module, meta, (x,), strict=False)
    except Exception:  # noqa: BLE001 - unsupported on meta (a custom kernel): the first forward will tell
        return None
    if not isinstance(out, torch.Tensor):
        return f"built {what} whose forward returns {brief_repr(out, 80)}, not a tensor"
    if tuple(out.shape) != (1, 1, out_width):
        return (f"built {what} that maps {width} features ({source}) to shape {tuple(out.shape)} for an "
                f"input of shape (1, 1, {width}); {rule or f'it must return {out_width} features'}")
    return None
