"""The typed component registry: plugins fill it once, lookups are plain dict reads.

pluggy is used only for discovery (see `optkit.plugins`); a registration is a full
record (factory, params model, capabilities, provider) so listings, validation and
"why can't this run here" all read from one place.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict

from optkit.errors import (
    BackendUnavailableError,
    DuplicateComponentError,
    UnknownComponentError,
)

Kind = Literal[
    "token_embedding", "positional_embedding", "attention", "mlp", "norm", "linear", "kv_cache", "block", "head"
]
KINDS: tuple[str, ...] = Kind.__args__  # type: ignore[attr-defined]
ALL_DTYPES = frozenset({"float32", "float16", "bfloat16"})


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


@dataclass(frozen=True)
class Provider:
    """Which plugin (and distribution) registered a component."""

    plugin: str
    distribution: str = "?"
    version: str = "?"

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution} {self.version})"


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
            reasons.extend(self.check(device, dtype))
        return reasons


@dataclass
class PluginRecord:
    """One entry point as `optkit plugins` shows it."""

    name: str
    distribution: str
    version: str
    status: Literal["ok", "broken", "disabled", "blocked"] = "ok"
    reason: str = ""
    components: list[tuple[str, str]] = field(default_factory=list)


class Registry:
    """All registered components, by kind and name.

    The global instance (`optkit.registry`) loads plugins on first use, never at
    ``import optkit``. Tests build their own with ``Registry(autoload=False)``.
    """

    def __init__(self, *, autoload: bool = True) -> None:
        self._items: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
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
            from optkit.plugins import load_entry_points

            try:
                load_entry_points(self)
            except BaseException:  # leave no half-loaded state behind for the next attempt
                self._items = {kind: {} for kind in KINDS}
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
    ) -> Registration:
        """Add a component. ``factory(params, ctx)`` builds it; see docs/hooks.md."""
        if kind not in self._items:
            raise UnknownComponentError(f"unknown component kind '{kind}' (kinds: {', '.join(KINDS)})")
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise TypeError(f"{kind} '{name}': params must be a pydantic BaseModel subclass")
        if params.model_config.get("extra") != "forbid":
            raise TypeError(f"{kind} '{name}': params model {params.__name__} must set extra='forbid'")
        provider = self._provider or Provider("<direct>", "?", "?")
        entry = Registration(kind, name, factory, params, capabilities or Capabilities(), provider, check,
                             description)
        existing = self._items[kind].get(name)
        if existing is not None and not override and existing.factory is not factory:
            raise DuplicateComponentError(
                f"{kind} '{name}' is registered twice: by {existing.provider} and by {provider}. "
                f"Uninstall or block one of them (OPTKIT_BLOCK_PLUGINS), or register with override=True."
            )
        self._items[kind][name] = entry
        for record in self.plugins:
            if record.name == provider.plugin:
                record.components.append((kind, name))
        return entry

    def unregister(self, kind: str, name: str) -> None:
        self._items[kind].pop(name, None)

    # -- lookup ----------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        self.ensure_loaded()
        return sorted(self._items[kind])

    def registrations(self, kind: str | None = None) -> list[Registration]:
        self.ensure_loaded()
        kinds = [kind] if kind else list(KINDS)
        return [self._items[k][n] for k in kinds for n in sorted(self._items[k])]

    def __contains__(self, key: tuple[str, str]) -> bool:
        self.ensure_loaded()
        kind, name = key
        return name in self._items.get(kind, {})

    def get(self, kind: str, name: str) -> Registration:
        self.ensure_loaded()
        if kind not in self._items:
            raise UnknownComponentError(f"unknown component kind '{kind}' (kinds: {', '.join(KINDS)})")
        try:
            return self._items[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        available = sorted(self._items[kind])
        message = f"unknown {kind} '{name}' (available: {', '.join(available) or 'none'})"
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

    def select_auto(self, kind: str, device: torch.device | str, dtype: torch.dtype) -> Registration:
        """The highest-priority usable component of ``kind`` (priorities from registry.yaml)."""
        from optkit.presets import catalogue_priority

        candidates = sorted(self.registrations(kind), key=lambda r: -catalogue_priority(kind, r.name))
        refusals = []
        for entry in candidates:
            reasons = entry.unavailable_reasons(device, dtype)
            if not reasons:
                return entry
            refusals.append(f"{entry.name}: {'; '.join(reasons)}")
        raise BackendUnavailableError(f"no usable {kind} for {torch.device(device).type}/"
                                      f"{str(dtype).removeprefix('torch.')}: " + " | ".join(refusals))
