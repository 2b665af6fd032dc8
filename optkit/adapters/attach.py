"""Adapters on a whole model: which projections, which adapter runs, merging, taking them off again.

Targets are named as the checkpoint names them (OPT: q_proj, k_proj, v_proj, out_proj, fc1, fc2;
Open-Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), i.e. PEFT's
``target_modules``; a name matches that projection in every decoder layer. The names a model offers are
read from its layers and its checkpoint format, so a third-party family's projections work the same way.

A model may hold several named adapters; one is active at a time (``set_adapter``), as with PEFT.
Anything that replaces modules or changes what forward computes drops the decode steps an inference
session keeps (a captured CUDA graph would otherwise replay the old computation). On a prepared model,
stacked q/k/v never bypass an adapter (a block whose projection is wrapped computes three GEMMs), and once
the wrappers are gone the block stacks them again by itself (``optkit.inference.attention``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from optkit.adapters.lora import DEFAULT_ALPHA, LoRALinear, LoRASettings, check_adapter_name, merge_refusal
from optkit.errors import CheckpointError, InputError, brief_repr
from optkit.interfaces import WrappableLinear
from optkit.interfaces.adapters import held_adapters

if TYPE_CHECKING:
    from optkit.model import Model

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear but the output layer
DEFAULT_TARGETS = ("q_proj", "v_proj")


# -- which modules -------------------------------------------------------------------------------
def layer_linears(model: Model) -> dict[str, nn.Module]:
    """Every linear of the decoder an adapter may wrap, by module path (an adapted one as its wrapper): the
    layers' projections and, where a model has them (OPT-350m), ``project_in``/``project_out``, which PEFT's
    "all-linear" adapts too. The LM head is never one (PEFT leaves the output layer alone)."""
    found: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}"
            if isinstance(child, LoRALinear) or isinstance(child, WrappableLinear):
                found[path] = child
            else:
                visit(path, child)

    visit("decoder", model.decoder)
    return found


def checkpoint_path(model: Model, path: str) -> str:
    """A module's path in the transformers model (``decoder.layers.0.mlp.fc1`` -> ``model.decoder.layers.0.fc1``),
    which is what PEFT names it; optkit's own path for a family without a checkpoint format."""
    from optkit.checkpoints import hf_key
    from optkit.formats import format_for_spec

    try:
        fmt = format_for_spec(model.spec, registry=model.registry)
    except CheckpointError:
        return path
    key = hf_key(fmt, f"{path}.weight", model.head.checkpoint_prefix, base_model=model.spec.head.name == "base")
    return key.removesuffix(".weight")


def target_names(model: Model) -> list[str]:
    """The names ``target_modules`` may use for this model, in layer order."""
    names: dict[str, None] = {}
    for path in layer_linears(model):
        names[checkpoint_path(model, path).rsplit(".", 1)[-1]] = None
    return list(names)


def resolve_targets(model: Model, target_modules: str | Sequence[str]) -> list[str]:
    """Module paths for ``target_modules`` (checkpoint names, or ``"all-linear"``); an unknown name is an
    InputError listing the valid ones."""
    linears = layer_linears(model)
    if target_modules is None:  # PEFT's default for OPT (and LLaMA) models
        target_modules = list(DEFAULT_TARGETS)
    if target_modules == ALL_LINEAR or list(target_modules) == [ALL_LINEAR]:  # a spec gives it as a list of one
        return list(linears)
    wanted = [target_modules] if isinstance(target_modules, str) else target_modules
    if not isinstance(wanted, Sequence) or not wanted or not all(isinstance(n, str) for n in wanted):
        raise InputError(f"target_modules must be a non-empty list of projection names, "
                         f"got {brief_repr(target_modules)}")
    valid = target_names(model)
    unknown = [name for name in wanted if name not in valid]
    if unknown:
        raise InputError(f"target_modules: unknown name(s) {brief_repr(unknown)}; the projections of this "
                         f"{model.spec.family} model are {', '.join(valid)} (or '{ALL_LINEAR}' for all of them)")
    return [path for path in linears if checkpoint_path(model, path).rsplit(".", 1)[-1] in wanted]


# -- what the model holds ------------------------------------------------------------------------
def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter the model holds, in the order they were added."""
    return held_adapters(model)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter forward runs (None: none, or the base alone)."""
    return next((module.active for module in lora_modules(model).values()), None)


def merged_adapter(model: nn.Module) -> str | None:
    return next((module.merged for module in lora_modules(model).values() if module.merged is not None), None)


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (one adapter's with ``name``): what an optimizer should get."""
    return {param_name: param for param_name, param in model.named_parameters()
            if _adapter_of(param_name) is not None and (name is None or _adapter_of(param_name) == name)}


def _adapter_of(param_name: str) -> str | None:
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-2]):
        if part in ("lora_A", "lora_B"):
            return parts[i + 1]
    return None


# -- changing the model --------------------------------------------------------------------------
def add_adapters(model: Model, *, r: int, alpha: float = DEFAULT_ALPHA, dropout: float = 0.0,
                 target_modules: str | Sequence[str] = DEFAULT_TARGETS, name: str = "default",
                 use_rslora: bool = False, dtype: torch.dtype | None = None) -> Model:
    """Wrap the named projections of every layer with a fresh LoRA adapter ``name`` and freeze everything else.

    Only adapter parameters require grad afterwards (this adapter's: yes; earlier ones keep their flag).
    The first adapter becomes active; later ones are added inactive (``set_adapter`` switches), as in PEFT.
    ``dtype``: the adapter's (default the model's; e.g. float32 adapters on a bfloat16 base).
    ``alpha`` defaults to PEFT's ``LoraConfig`` default (8), so ``r`` alone means what it means in PEFT.
    """
    settings = LoRASettings(r, alpha, dropout, use_rslora)
    check_adapter_name(name)
    paths = resolve_targets(model, target_modules)
    attach(model, paths, settings, name=name, dtype=dtype)
    return model


def attach(model: Model, paths: Sequence[str], settings: LoRASettings, *, name: str,
           dtype: torch.dtype | None = None, trainable: bool = True) -> dict[str, LoRALinear]:
    """Adapter ``name`` on the modules at ``paths`` (already resolved); the wrappers by path."""
    if name in adapter_names(model):
        raise InputError(f"the model already has an adapter named '{name}'; pass another name "
                         f"(adapters: {', '.join(adapter_names(model))})")
    if merged_adapter(model) is not None:
        raise InputError(f"adapter '{merged_adapter(model)}' is merged into the weights; call "
                         "unmerge_adapters(model) before adding another")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"adapter dtype must be a floating torch dtype (e.g. torch.float32, torch.bfloat16), "
                         f"got {brief_repr(dtype)}")
    active = active_adapter(model) if lora_modules(model) else name
    dtype = dtype or model.dtype
    wrappers = {}
    with rewiring(model):
        for param_name, param in model.named_parameters():
            if _adapter_of(param_name) is None:
                param.requires_grad_(False)
        for path in paths:
            module = model.get_submodule(path)
            device = _device_of(module, model)
            if isinstance(module, LoRALinear):
                module.add(name, settings, dtype=dtype, device=device)
            else:
                module = LoRALinear(module, settings.r, settings.alpha, settings.dropout, settings.use_rslora,
                                    name=name, dtype=dtype, device=device).train(module.training)
                parent, leaf = path.rsplit(".", 1)
                setattr(model.get_submodule(parent), leaf, module)
                module.active = active
            wrappers[path] = module
        for param in adapter_parameters(model, name).values():
            param.requires_grad_(trainable)
    return wrappers


def _device_of(module: nn.Module, model: Model) -> torch.device:
    """Where the base's tensors live (a dispatched model spreads layers over devices)."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return model.device if tensor is None or tensor.is_meta else tensor.device


def set_adapter(model: Model, name: str | None) -> None:
    """Run adapter ``name`` from now on (None: the base model alone); requires_grad flags are left as they are."""
    names = adapter_names(model)
    if name is not None and name not in names:
        raise InputError(f"no adapter named {brief_repr(name)} on this model (adapters: "
                         f"{', '.join(names) or 'none; add one with add_adapters or load_adapters'})")
    merged = merged_adapter(model)
    if merged is not None and merged != name:
        raise InputError(f"adapter '{merged}' is merged into the weights; call unmerge_adapters(model) before "
                         "switching adapters")
    for module in lora_modules(model).values():
        module.active = name
    _drop_kept_steps(model)


def merge_adapters(model: Model) -> None:
    """Fold the active adapter into every base weight it touches; refused as a whole (nothing changed) when
    any base cannot take it."""
    modules = lora_modules(model)
    name = active_adapter(model)
    if name is None:
        raise InputError("no adapter is active, so there is nothing to merge; call set_adapter(model, name) first")
    for path, module in modules.items():
        reason = merge_refusal(module.base) if name in module.settings else None
        if reason is None and name in module.settings and _weights_away(module):
            reason = WEIGHTS_AWAY
        if reason is not None:
            raise InputError(f"cannot merge adapter '{name}' into {path}: {reason}")
    for module in modules.values():
        if name in module.settings:
            module.merge()
    _drop_kept_steps(model)


WEIGHTS_AWAY = ("its weights are not in memory (a unit the device map streams from cpu or disk, or a model on "
                "meta), so the change would be lost; merge or unmerge before dispatching (load without device_map; "
                "to stream a merged model: merge_and_unload, save_pretrained, load that with the device_map)")


def _weights_away(module: LoRALinear) -> bool:
    """Whether the base's weights are placeholders (streamed by a device map): merging into them changes nothing."""
    return any(tensor.is_meta for tensor in module.base.parameters())


def unmerge_adapters(model: Model) -> None:
    """Take a merged adapter out of the base weights again (within one rounding per element)."""
    for path, module in lora_modules(model).items():
        if module.merged is not None and _weights_away(module):
            raise InputError(f"cannot unmerge adapter '{module.merged}' from {path}: {WEIGHTS_AWAY}")
    for module in lora_modules(model).values():
        module.unmerge()
    _drop_kept_steps(model)


def merge_and_unload(model: Model) -> Model:
    """The active adapter folded in and every wrapper replaced by its base: a plain model again, e.g. to
    ``save_pretrained`` it. Base parameters stay frozen (requires_grad False)."""
    merge_adapters(model)
    return unload_adapters(model)


def unload_adapters(model: Model) -> Model:
    """Every wrapper replaced by its base as it is now (a merged adapter stays in the weights, others are dropped)."""
    with rewiring(model):
        for path, module in lora_modules(model).items():
            parent, leaf = path.rsplit(".", 1)
            setattr(model.get_submodule(parent), leaf, module.base)
    return model


@contextmanager
def rewiring(model: Model) -> Iterator[None]:
    """Swap modules safely: kept decode steps (captured graphs, compiled steps) are dropped after.

    A prepared model needs nothing more: its attention blocks check that q/k/v are still the modules they
    stacked, fall back to the reference projections while one is wrapped or replaced, and stack again once
    the bases are back (``optkit.inference.attention``), so the adapters room never reaches into the
    inference room."""
    try:
        yield
    finally:
        _drop_kept_steps(model)


def _drop_kept_steps(model: Model) -> None:
    if model.inference_session is not None:
        model.inference_session.clear()


OPTION_NAMES = ("r", "alpha", "dropout", "target_modules", "use_rslora", "name")


def add_adapters_from_options(model: Model, options: dict[str, object]) -> Model:
    """``add_adapters`` from a mapping, as ``from_pretrained(..., adapters={...})`` and a YAML ``adapters:``
    block give it; an unknown key is an InputError listing the valid ones (never ignored). Only ``r`` is
    required; ``alpha`` defaults to PEFT's 8."""
    if not isinstance(options, dict):
        raise InputError(f"adapters must be a mapping like {{'r': 8, 'alpha': 16}}, got {brief_repr(options)}")
    unknown = [key for key in options if key not in OPTION_NAMES]
    missing = [key for key in ("r",) if key not in options]
    if unknown or missing:
        problems = ([f"unknown key(s) {brief_repr(unknown)}"] if unknown else []) + \
                   ([f"missing {', '.join(missing)}"] if missing else [])
        raise InputError(f"adapters: {'; '.join(problems)} (keys: {', '.join(OPTION_NAMES)}; r required, "
                         f"alpha defaults to PEFT's {DEFAULT_ALPHA})")
    return add_adapters(model, **options)  # type: ignore[arg-type]  # each value is checked there
