"""Spec -> torch.nn.Module, asking the registry for every component.

Nothing here names a concrete backend: a new component or family is a registration
plus YAML, never an edit to this file.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from optkit.context import BuildContext
from optkit.errors import BackendUnavailableError, InputError, SpecValidationError, brief_repr
from optkit.interfaces import AttentionKernel, Head
from optkit.model import Decoder, Model
from optkit.registration import AUTO_KINDS, Registry, checked_device, checked_dtype
from optkit.spec import AUTO, DECODER_COMPONENTS, ModelSpec, load_spec, memory_problems, training_needs, validate_spec

__all__ = ["AUTO_KINDS", "BuildContext", "build", "build_head", "set_backend"]

log = logging.getLogger("optkit")


def _resolve_auto(spec: ModelSpec, registry: Registry, device: torch.device, dtype: torch.dtype) -> ModelSpec:
    choices = {}
    for kind in AUTO_KINDS:
        if getattr(spec.decoder, kind).name == AUTO:
            entry = registry.select_auto(kind, device, dtype)
            log.info("optkit: %s=auto picked '%s' for %s/%s", kind, entry.name, device.type, dtype)
            choices[kind] = entry.name
    return spec.with_components(registry=registry, **choices) if choices else spec


def _check_usable(spec: ModelSpec, registry: Registry, device: torch.device, dtype: torch.dtype) -> None:
    problems = []
    for kind in DECODER_COMPONENTS + ("head",):
        ref = spec.head if kind == "head" else getattr(spec.decoder, kind)
        reasons = registry.get(kind, ref.name).unavailable_reasons(device, dtype)
        if reasons:
            problems.append(f"{kind} '{ref.name}': " + "; ".join(reasons))
    if problems:
        raise BackendUnavailableError(
            f"cannot build this model on {device.type} in {str(dtype).removeprefix('torch.')}: " + " | ".join(problems))


def build_head(model: Model, device: torch.device, dtype: torch.dtype) -> Head:
    """A freshly initialised head for ``model`` (its spec's head, from its registry)."""
    ctx = BuildContext(spec=model.spec, registry=model.registry, device=device, dtype=dtype,
                       token_embedding=model.decoder.embed_tokens)
    with torch.device(device):
        return ctx.create("head")


def _decoder(ctx: BuildContext) -> Decoder:
    d = ctx.decoder
    projected = d.embed_dim != d.hidden_size
    return Decoder(
        embed_tokens=ctx.create("token_embedding"),
        embed_positions=ctx.create("positional_embedding"),
        layers=[ctx.create("block") for _ in range(d.num_layers)],
        project_in=ctx.linear(d.embed_dim, d.hidden_size, bias=False) if projected else None,
        project_out=ctx.linear(d.hidden_size, d.embed_dim, bias=False) if projected else None,
        final_layer_norm=ctx.norm(d.hidden_size) if d.final_norm and d.norm_position == "pre" else None,
        max_positions=d.max_positions, layerdrop=d.layerdrop)


def _check_registry(registry: Any) -> Registry:
    """``registry`` if it is one (an optkit.registration.Registry), else an InputError naming what was passed."""
    if not isinstance(registry, Registry):
        raise InputError(f"registry must be an optkit Registry (optkit.registry, or optkit.testing.fresh_registry()), "
                         f"got {brief_repr(registry, 80)} ({type(registry).__name__})")
    return registry


def build(spec: ModelSpec | str | dict[str, Any], *, dtype: torch.dtype | None = None,
          device: torch.device | str | None = None, registry: Registry | None = None,
          target_device: torch.device | str | None = None, **component_overrides: Any) -> Model:
    """Build a model from a spec (or preset name / YAML path) with fresh weights.

    ``component_overrides`` swap components by kind, e.g. ``attention="sdpa"``.
    ``target_device`` is where the model will run when it is built on "meta" for loading.
    """
    if registry is None:
        from optkit import registry
    _check_registry(registry)
    dtype = checked_dtype(dtype)
    device = checked_device(device)
    target = checked_device(target_device, argument="target_device") if target_device is not None else device
    if not isinstance(spec, ModelSpec):
        spec = load_spec(spec, registry=registry)
    if component_overrides:
        spec = spec.with_components(registry=registry, **component_overrides)
    spec = validate_spec(spec, registry=registry)
    too_large = memory_problems(spec, device, dtype)  # from the spec alone, before anything is allocated
    if too_large:
        raise SpecValidationError(too_large)
    spec = _resolve_auto(spec, registry, target, dtype)
    if target.type != "meta":
        _check_usable(spec, registry, target, dtype)
    if device.type != "meta":  # fresh weights are for training: what training this spec needs must be there
        for kind, needs in training_needs(spec).items():
            registry.require_capabilities(kind, getattr(spec.decoder, kind).name, needs)
    ctx = BuildContext(spec=spec, registry=registry, device=device, dtype=dtype)
    with torch.device(device):
        decoder = _decoder(ctx)
        ctx.token_embedding = decoder.embed_tokens
        head = ctx.create("head")
        model = Model(decoder=decoder, head=head, spec=spec, registry=registry)
    model = model.to(dtype=dtype)
    if spec.adapters is not None:  # the spec's `adapters:` block: LoRA on the built projections (optkit.adapters)
        from optkit.adapters import add_adapters_from_options

        add_adapters_from_options(model, spec.adapters.model_dump())
    return model


def set_backend(model: Model, *, attention: str | dict[str, Any] | None = None, registry: Registry | None = None,
                **others: Any) -> Model:
    """Swap the attention backend of a loaded model in place; weights are untouched.

    The new kernel comes from ``registry`` when given (and the model remembers it), else from the
    registry that built the model.
    """
    if not isinstance(model, Model):
        raise InputError(f"set_backend expects an optkit Model (from optkit.build or optkit.from_pretrained), got "
                         f"{brief_repr(model, 80)} ({type(model).__name__})")
    registry = model.registry if registry is None else _check_registry(registry)
    if others:
        raise SpecValidationError([f"{kind}: set_backend swaps attention only; rebuild the model to change "
                                   f"{kind} (optkit.from_pretrained(..., {kind}=...))" for kind in others])
    if attention is None:
        return model
    device, dtype = model.device, model.dtype
    spec = model.spec.with_components(attention=attention, registry=registry)
    spec = _resolve_auto(spec, registry, device, dtype)
    registry.require_usable("attention", spec.decoder.attention.name, device, dtype)
    ctx = BuildContext(spec=spec, registry=registry, device=device, dtype=dtype)
    for name, _ in model.attention_kernels():  # wherever a block keeps its kernels
        parent, _, attribute = name.rpartition(".")
        kernel: AttentionKernel = ctx.create("attention")
        setattr(model.get_submodule(parent), attribute, kernel.to(device))
    model.spec, model.registry = spec, registry
    return model
