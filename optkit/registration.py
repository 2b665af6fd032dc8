"""The typed component registry: plugins fill it once, lookups are plain dict reads.

pluggy is used only for discovery (see `optkit.plugins`); a registration is a full
record (factory, params model, capabilities, provider) so listings, validation and
"why can't this run here" all read from one place.

This module is ``optkit.registration``; ``optkit.registry`` is the global `Registry` instance.
The component kinds (`KINDS`) and the kinds a spec may set to ``auto`` (`AUTO_KINDS`) are defined
here and nowhere else.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from optkit.errors import (
    BackendUnavailableError,
    CheckpointError,
    ComponentError,
    DuplicateComponentError,
    InputError,
    UnknownComponentError,
    brief_repr,
    shorten,
)
from optkit.formats.base import CheckpointFormat
from optkit.plugins import FIRST_PARTY, PluginRecord, Provider, describe, guarded, load_entry_points

log = logging.getLogger("optkit")

Kind = Literal[
    "token_embedding", "positional_embedding", "attention", "mlp", "norm", "linear", "kv_cache", "block", "head"
]
KINDS: tuple[str, ...] = Kind.__args__  # type: ignore[attr-defined]
AUTO = "auto"  # the name that asks optkit to pick the best usable component of a kind
AUTO_KINDS: tuple[str, ...] = ("attention", "linear", "kv_cache")  # the kinds that accept AUTO
ALL_DTYPES = frozenset({"float32", "float16", "bfloat16"})


FORMAT_KIND = "checkpoint_format"  # how `optkit plugins` lists a plugin's checkpoint formats


class NoParams(BaseModel):
    """Params model of components that take none."""

    model_config = ConfigDict(extra="forbid")


class Capabilities(BaseModel):
    """What a backend can do; the dispatcher explains every refusal from these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: frozenset[str] = frozenset({"cpu", "cuda", "mps", "xpu"})
    dtypes: frozenset[str] = ALL_DTYPES
    padding: bool = True
    kv_cache: bool = True
    dropout: bool = True
    attention_weights: bool = False
    backward: bool = True
    # No host synchronisation and no per-step Python values baked into kernels: a decode step through
    # this component can be captured once as a CUDA graph and replayed (optkit.decode_graph).
    cuda_graphs: bool = False

    @field_validator("devices")
    @classmethod
    def _device_types(cls, value: frozenset[str]) -> frozenset[str]:
        """A misspelt device ("gpu", "cuda:0") would make the component silently unusable everywhere."""
        for name in value:
            if _torch_name(name, torch.device, lambda d: d.type) != name:
                raise ValueError(f"{brief_repr(name, 40)} is not a torch device type (cpu, cuda, mps, xpu, ...)")
        return value

    @field_validator("dtypes")
    @classmethod
    def _dtype_names(cls, value: frozenset[str]) -> frozenset[str]:
        """Names as str(torch.float16) spells them without "torch." ("fp16", "half" would never match)."""
        for name in value:
            dtype = getattr(torch, name, None) if name.isidentifier() else None
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point and str(dtype) == f"torch.{name}"):
                raise ValueError(f"{brief_repr(name, 40)} is not a floating-point torch dtype name "
                                 "(float32, float16, bfloat16, ...)")
        return value


def _torch_name(name: str, parse: Callable[[str], Any], canonical: Callable[[Any], str]) -> str | None:
    """``name`` as torch spells it after parsing (None: torch does not know it)."""
    try:
        return canonical(parse(name))
    except (RuntimeError, TypeError, ValueError):
        return None


Check = Callable[[torch.device, torch.dtype], list[str]]


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: type[BaseModel]
    capabilities: Capabilities
    provider: Provider
    check: Check | None = None
    description: str = ""
    auto_priority: int | None = None  # rank under `auto` when registry.yaml does not catalogue the name
    # Why `auto` should pass over it although it can run (e.g. another component runs the same kernels
    # better); asked only by `select_auto`, so naming the component still builds it.
    auto_check: Check | None = None

    def unavailable_reasons(self, device: torch.device | str, dtype: torch.dtype) -> list[str]:
        """Why this component cannot run on ``device`` in ``dtype`` (empty: it can)."""
        device = torch.device(device)
        reasons = []
        if device.type not in self.capabilities.devices:
            reasons.append(f"device {device.type} (supported: {', '.join(sorted(self.capabilities.devices))})")
        dtype_name = str(dtype).removeprefix("torch.")
        if dtype_name not in self.capabilities.dtypes:
            reasons.append(f"dtype {dtype_name} (supported: {', '.join(sorted(self.capabilities.dtypes))})")
        if self.check is not None:
            reasons.extend(self._checked_reasons(device, dtype))
        return reasons

    def auto_reasons(self, device: torch.device | str, dtype: torch.dtype) -> list[str]:
        """Why ``auto`` passes over this usable component (``auto_check``; empty: it may be picked)."""
        if self.auto_check is None:
            return []
        return self._checked_reasons(torch.device(device), dtype, self.auto_check)

    def _checked_reasons(self, device: torch.device, dtype: torch.dtype, check: Check | None = None) -> list[str]:
        """The plugin's own ``check``; one that crashes makes its component unavailable, never optkit."""
        check = check or self.check
        try:
            with guarded():
                reasons = check(device, dtype) if check is not None else []
        except Exception as exc:  # noqa: BLE001 - a plugin bug is a reason, reported with the plugin's name
            return [f"its availability check ({self.provider}) raised {describe(exc)}"]
        if not (isinstance(reasons, (list, tuple)) and all(isinstance(r, str) for r in reasons)):
            return [f"its availability check ({self.provider}) returned {brief_repr(reasons)}, not a list of reasons"]
        return [shorten(reason) for reason in reasons]

    def lacking(self, needs: Mapping[str, str]) -> list[str]:
        """The needed capabilities (``{"dropout": "why it is needed"}``) this component does not declare."""
        return [f"it does not support {feature}, which {why}" for feature, why in needs.items()
                if not getattr(self.capabilities, feature)]


class Registry:
    """All registered components, by kind and name.

    The global instance (`optkit.registry`) loads plugins on first use, never at
    ``import optkit``. Tests build their own with ``Registry(autoload=False)``.
    """

    def __init__(self, *, autoload: bool = True) -> None:
        self._items: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self._formats: dict[str, tuple[CheckpointFormat, Provider]] = {}  # model_type -> checkpoint format
        self._autoload = autoload
        self._loaded = not autoload
        self._lock = threading.RLock()
        self._provider: Provider | None = None
        self.plugins: list[PluginRecord] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> "Registry":
        """A registry is a shared service, not model state: a copied model keeps using the same one."""
        return self

    # -- loading ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            try:
                load_entry_points(self)
            except BaseException:  # leave no half-loaded state behind for the next attempt
                self._items = {kind: {} for kind in KINDS}
                self._formats = {}
                self.plugins = []
                self._loaded = False
                raise

    @contextlib.contextmanager
    def providing(self, provider: Provider) -> Iterator[None]:
        """Attribute registrations made inside the block to ``provider``."""
        previous, self._provider = self._provider, provider
        try:
            yield
        finally:
            self._provider = previous

    @contextlib.contextmanager
    def all_or_nothing(self) -> Iterator[None]:
        """Keep what the block registers only if it finishes: additions and overrides alike are undone
        when it raises (how a failing plugin hook leaves no trace)."""
        saved = {kind: dict(items) for kind, items in self._items.items()}
        saved_formats = dict(self._formats)
        try:
            yield
        except BaseException:
            self._items, self._formats = saved, saved_formats
            raise

    # -- registration ----------------------------------------------------------------------
    def register(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        *,
        params: type[BaseModel] = NoParams,
        capabilities: Capabilities | None = None,
        check: Check | None = None,
        description: str = "",
        override: bool = False,
        auto_priority: int | None = None,
        auto_check: Check | None = None,
    ) -> Registration:
        """Add a component. ``factory(params, ctx)`` builds it; see docs/hooks.md.

        ``auto_priority`` ranks it when a spec says ``auto`` (higher first; a name that registry.yaml
        catalogues keeps the catalogue's priority). ``auto_check(device, dtype)`` lists why ``auto`` should
        pass over it even where it can run; a spec that names it still gets it."""
        self._kind(kind)
        _check_registration(kind, name, factory, params, capabilities, check, auto_priority, auto_check)
        if type(override) is not bool or not isinstance(description, str):  # override="no" must not override
            raise ComponentError(f"{kind} {brief_repr(name)}: override must be True or False and description a "
                                 f"string, got override={brief_repr(override, 60)}, "
                                 f"description={brief_repr(description, 60)}")
        provider = self._provider or Provider("<direct>", "?", "?")
        entry = Registration(kind, name, factory, params, capabilities or Capabilities(), provider, check,
                             description, auto_priority, auto_check)
        existing = self._items[kind].get(name)
        if existing is not None and not override and existing.factory is not factory:
            raise DuplicateComponentError(
                f"{kind} '{name}' is registered twice: by {existing.provider} and by {provider}. "
                f"Uninstall or block one of them (OPTKIT_BLOCK_PLUGINS), or register with override=True."
            )
        if existing is not None and existing.factory is not factory:
            _warn_override(f"{kind} '{name}'", existing.provider, provider)
        self._items[kind][name] = entry
        for record in self.plugins:
            if record.name == provider.plugin:
                record.components.append((kind, name))
        return entry

    def unregister(self, kind: str, name: str) -> None:
        self._items.get(kind, {}).pop(name, None)

    # -- checkpoint formats ------------------------------------------------------------------
    def register_format(self, fmt: CheckpointFormat, *, override: bool = False) -> CheckpointFormat:
        """Add a checkpoint format (a family's config.json and key layout; see optkit.formats.base).

        Like components: a second plugin registering the same ``model_type`` is a DuplicateComponentError
        naming both, unless it passes ``override=True``.
        """
        if not isinstance(fmt, CheckpointFormat):
            raise ComponentError(f"register_format expects an optkit.formats.base.CheckpointFormat, got "
                                 f"{brief_repr(fmt)}")
        provider = self._provider or Provider("<direct>", "?", "?")
        existing = self._formats.get(fmt.model_type)
        if existing is not None and not override and existing[0] is not fmt:
            raise DuplicateComponentError(
                f"checkpoint format '{fmt.model_type}' is registered twice: by {existing[1]} and by {provider}. "
                f"Uninstall or block one of them (OPTKIT_BLOCK_PLUGINS), or register with override=True.")
        if existing is not None and existing[0] is not fmt:
            _warn_override(f"checkpoint format '{fmt.model_type}'", existing[1], provider)
        self._formats[fmt.model_type] = (fmt, provider)
        for record in self.plugins:
            if record.name == provider.plugin:
                record.components.append((FORMAT_KIND, fmt.model_type))
        return fmt

    def reasons_unavailable(self, kind: str, name: str, device: torch.device | str, dtype: torch.dtype) -> list[str]:
        """Why a plugin's registration (a component, or a checkpoint format: always usable) cannot run here."""
        return [] if kind == FORMAT_KIND else self.get(kind, name).unavailable_reasons(device, dtype)

    def formats(self) -> list[CheckpointFormat]:
        self.ensure_loaded()
        return [self._formats[name][0] for name in sorted(self._formats)]

    def format_for_model_type(self, model_type: Any, source: str | None = None) -> CheckpointFormat:
        """The format of a config.json's ``model_type``, or a CheckpointError naming the ones installed."""
        self.ensure_loaded()
        if isinstance(model_type, str) and model_type in self._formats:
            return self._formats[model_type][0]
        raise CheckpointError(f"{source or 'config.json'}: model_type is {brief_repr(model_type)}; optkit loads "
                              + (", ".join(repr(m) for m in sorted(self._formats)) or "no") + " checkpoints"
                              + " (a plugin may register more formats)")

    def format_for_family(self, family: str) -> CheckpointFormat:
        """The format that saves a spec's family, or a CheckpointError naming the families that have one."""
        self.ensure_loaded()
        for fmt, _ in self._formats.values():
            if fmt.family == family:
                return fmt
        raise CheckpointError(f"family: no checkpoint format for '{family}' "
                              f"(formats: {', '.join(f.family for f, _ in self._formats.values()) or 'none'})")

    # -- lookup ----------------------------------------------------------------------------
    def provider_of(self, kind: str, name: str) -> Provider | None:
        """Who provides ``(kind, name)`` now (after any ``override=True``; a checkpoint format too); None: nobody."""
        if kind == FORMAT_KIND:
            found = self._formats.get(name)
            return found[1] if found else None
        entry = self._items.get(kind, {}).get(name)
        return entry.provider if entry else None

    def names(self, kind: str) -> list[str]:
        self.ensure_loaded()
        return sorted(self._kind(kind))

    def registrations(self, kind: str | None = None) -> list[Registration]:
        self.ensure_loaded()
        if kind is not None:
            self._kind(kind)
        kinds = [kind] if kind else list(KINDS)
        return [self._items[k][n] for k in kinds for n in sorted(self._items[k])]

    def _kind(self, kind: Any) -> dict[str, Registration]:
        """The registrations of ``kind``, or an UnknownComponentError naming the kinds (never a bare KeyError)."""
        if not isinstance(kind, str) or kind not in self._items:
            raise UnknownComponentError(f"unknown component kind {brief_repr(kind)} (kinds: {', '.join(KINDS)})")
        return self._items[kind]

    def __contains__(self, key: tuple[str, str]) -> bool:
        self.ensure_loaded()
        kind, name = key
        return isinstance(kind, str) and isinstance(name, str) and name in self._items.get(kind, {})

    def get(self, kind: str, name: str) -> Registration:
        self.ensure_loaded()
        self._kind(kind)
        if isinstance(name, str) and name in self._items[kind]:
            return self._items[kind][name]
        raise UnknownComponentError(self.unknown_message(kind, name))

    def unknown_message(self, kind: str, name: str) -> str:
        available = sorted(self._items[kind])
        if not isinstance(name, str):
            return (f"{kind}: a component name must be a string, got {brief_repr(name)} "
                    f"(available: {', '.join(available) or 'none'})")
        from optkit.plugin_hints import unloaded_message  # installed but not loaded: say so, no did-you-mean

        unloaded = unloaded_message(self.plugins, kind, name)
        if unloaded is not None:
            return unloaded
        message = f"unknown {kind} '{shorten(name, 80)}' (available: {', '.join(available) or 'none'})"
        from optkit.presets import catalogue_entry, registry_file

        hint = catalogue_entry(kind, name)
        if hint is not None and hint.install:
            message += f"; '{name}' is provided by {hint.package}: install it with `{hint.install}`"
        else:
            catalogued = [n for n in registry_file().catalogue.get(kind, {}) if n not in available]
            close = difflib.get_close_matches(name, available + catalogued, n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
                hint = catalogue_entry(kind, close[0])
                if close[0] not in available and hint is not None and hint.install:
                    message += f" '{close[0]}' is provided by {hint.package}: install it with `{hint.install}`"
        broken = [p for p in self.plugins if p.status == "broken"]
        if broken:
            message += "; broken plugins: " + ", ".join(f"{p.name} ({p.reason})" for p in broken)
        idle = [p for p in self.plugins if p.status in ("blocked", "disabled")]
        if idle:  # one of them may provide it: which does is only known by loading it
            message += ("; plugins not loaded, one may provide it: " + ", ".join(
                f"{shorten(p.name, 40)} ({p.reason})" for p in idle[:5]) + (" ..." if len(idle) > 5 else "")
                + " (`optkit plugins` lists them)")
        return message

    def require_usable(self, kind: str, name: str, device: torch.device | str, dtype: torch.dtype) -> Registration:
        """The registration, or an error listing every reason it cannot run here."""
        entry = self.get(kind, name)
        reasons = entry.unavailable_reasons(device, dtype)
        if reasons:
            raise BackendUnavailableError(
                f"{kind} '{name}' cannot run on {torch.device(device).type} with "
                f"{str(dtype).removeprefix('torch.')}: " + "; ".join(reasons)
            )
        return entry

    def require_capabilities(self, kind: str, name: str, needs: Mapping[str, str]) -> Registration:
        """The registration, or a BackendUnavailableError naming each needed capability it does not declare
        (``needs``: capability -> why this use needs it) and the components of ``kind`` that do."""
        entry = self.get(kind, name)
        missing = entry.lacking(needs)
        if missing:
            able = [r.name for r in self.registrations(kind) if not r.lacking(needs)]
            raise BackendUnavailableError(
                f"{kind} '{name}' ({entry.provider}) cannot be used here: " + "; ".join(missing)
                + f". Components of this kind that can: {', '.join(able) or 'none'}")
        return entry

    def auto_priority(self, entry: Registration) -> int:
        """Rank under ``auto``: registry.yaml's catalogue for the names it lists (first-party decisions win),
        else the priority the component registered with, else 0."""
        from optkit.presets import catalogue_entry

        catalogued = catalogue_entry(entry.kind, entry.name)
        if catalogued is not None:
            return catalogued.priority
        return entry.auto_priority if entry.auto_priority is not None else 0

    def select_auto(self, kind: str, device: torch.device | str, dtype: torch.dtype) -> Registration:
        """The highest-priority usable component of ``kind`` (see `auto_priority`)."""
        candidates = sorted(self.registrations(kind), key=lambda r: -self.auto_priority(r))
        refusals = []
        for entry in candidates:
            reasons = entry.unavailable_reasons(device, dtype) or entry.auto_reasons(device, dtype)
            if not reasons:
                return entry
            refusals.append(f"{entry.name}: {'; '.join(reasons)}")
        raise BackendUnavailableError(f"no usable {kind} for {torch.device(device).type}/"
                                      f"{str(dtype).removeprefix('torch.')}: " + " | ".join(refusals))


def _warn_override(what: str, existing: Provider, provider: Provider) -> None:
    """Log that a plugin replaces one of optkit's own components (override=True): models change behaviour
    with no edit of theirs, so the user must be able to see it (``optkit plugins`` shows it too)."""
    if existing.distribution == FIRST_PARTY and provider.distribution != FIRST_PARTY:
        log.warning("optkit: %s of %s is overridden by %s (override=True); models using %s now run that plugin's "
                    "code. `optkit plugins` shows the override; OPTKIT_BLOCK_PLUGINS=%s restores optkit's own",
                    what, existing, provider, what, provider.plugin)


def _check_registration(kind: str, name: str, factory: Callable[..., Any], params: Any, capabilities: Any,
                        check: Any, auto_priority: Any, auto_check: Any = None) -> None:
    """Refuse a malformed registration when it is made, naming the component, instead of at its first build."""
    what = f"{kind} {brief_repr(name)}"
    if not isinstance(name, str) or not name.strip() or name == AUTO:
        raise ComponentError(f"{what}: a component name must be a non-empty string other than '{AUTO}'")
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise ComponentError(f"{what}: params must be a pydantic BaseModel subclass, got {brief_repr(params)}")
    if params.model_config.get("extra") != "forbid":
        raise ComponentError(f"{what}: params model {params.__name__} must set extra='forbid'")
    if capabilities is not None and not isinstance(capabilities, Capabilities):
        raise ComponentError(f"{what}: capabilities must be a Capabilities(...), got {brief_repr(capabilities)}")
    for label, function in (("check", check), ("auto_check", auto_check)):
        if function is not None and not callable(function):
            raise ComponentError(f"{what}: {label} must be a function (device, dtype) -> list[str], got "
                                 f"{brief_repr(function)}")
    if auto_priority is not None and (kind not in AUTO_KINDS or type(auto_priority) is not int):
        raise ComponentError(f"{what}: auto_priority must be an int, and only for the kinds that accept "
                             f"'{AUTO}' ({', '.join(AUTO_KINDS)}); got {brief_repr(auto_priority)}")
    problem = _factory_signature_problem(factory)
    if problem:
        raise ComponentError(f"{what}: {problem}")


def _factory_signature_problem(factory: Any) -> str | None:
    """Why ``factory(params, ctx)`` cannot be called, if its signature already says so."""
    if not callable(factory):
        return f"factory must be callable as factory(params, ctx), got {brief_repr(factory)}"
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: the call itself will tell
        return None
    try:
        signature.bind(None, None)
    except TypeError as exc:
        label = getattr(factory, "__name__", type(factory).__name__)
        return f"factory {label}{signature} cannot be called as factory(params, ctx): {exc}"
    return None


# -- where and in what a model is built ----------------------------------------------------------
def checked_dtype(value: Any, *, argument: str = "dtype") -> torch.dtype:
    """``value`` if it is a floating-point torch dtype (None: float32), else an InputError naming it."""
    if value is None:
        return torch.float32
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InputError(f"{argument} must be a floating-point torch.dtype such as torch.float16, "
                         f"got {brief_repr(value, 80)} ({type(value).__name__})")
    return value


def checked_device(value: Any, *, argument: str = "device") -> torch.device:
    """``value`` as a torch.device this machine has (None: cpu): an InputError when it names no device,
    a BackendUnavailableError when this machine lacks it -- never torch's AssertionError mid-build."""
    if value is None:
        return torch.device("cpu")
    try:
        device = value if isinstance(value, torch.device) else torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"{argument}={brief_repr(value, 80)} is not a device: {shorten(str(exc), 200)}") from None
    problem = _missing_device(device)
    if problem:
        raise BackendUnavailableError(f"{argument}={str(device)!r} is not available: {problem}; "
                                      "use device='cpu' (or 'meta' to build without memory)")
    return device


def _missing_device(device: torch.device) -> str | None:
    """Why this machine has no ``device`` (None: it has, or torch alone can tell)."""
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return f"this torch ({torch.__version__}) was built without CUDA"
        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES hides them)"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS (Apple GPU) is not available on this machine"
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "torch sees no Intel XPU"
    return None
