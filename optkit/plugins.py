"""Plugin discovery on pluggy: entry-point group ``optkit``, one hook.

Each entry point is loaded in isolation: a plugin that fails to import or whose hook
raises is recorded as broken with a warning, and everyone else keeps working.

Environment switches:
  OPTKIT_STRICT_PLUGINS=1            a broken plugin is a fatal PluginLoadError
  OPTKIT_DISABLE_PLUGIN_AUTOLOAD=1   load only optkit's own first-party plugins
  OPTKIT_LOAD_PLUGINS=a,b            allow-list of third-party plugin names
  OPTKIT_BLOCK_PLUGINS=a,b           block-list of plugin names
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Iterable

import pluggy

from optkit.errors import PluginLoadError, PluginLoadWarning

if TYPE_CHECKING:
    from optkit.registry import Registry

PLUGIN_API = 1  # major version of the hook + registration API; plugins declare `OPTKIT_PLUGIN_API = 1`
PROJECT = "optkit"
ENTRY_POINT_GROUP = "optkit"
FIRST_PARTY = "optkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    @hookspec
    def optkit_register(self, registry: "Registry") -> None:
        """Register components with ``registry.register(kind, name, factory, ...)``."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _distribution(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version or "?"


def _skip_reason(name: str, dist_name: str) -> tuple[str, str] | None:
    blocked = _env_list("OPTKIT_BLOCK_PLUGINS") or set()
    if name in blocked:
        return "blocked", "listed in OPTKIT_BLOCK_PLUGINS"
    if dist_name == FIRST_PARTY:
        return None
    if _env_flag("OPTKIT_DISABLE_PLUGIN_AUTOLOAD"):
        return "disabled", "OPTKIT_DISABLE_PLUGIN_AUTOLOAD is set"
    allowed = _env_list("OPTKIT_LOAD_PLUGINS")
    if allowed is not None and name not in allowed:
        return "disabled", "not listed in OPTKIT_LOAD_PLUGINS"
    return None


def _fail(registry: "Registry", record, message: str, exc: BaseException) -> None:
    record.status, record.reason = "broken", f"{type(exc).__name__}: {exc}"
    if _env_flag("OPTKIT_STRICT_PLUGINS"):
        raise PluginLoadError(f"{message} (OPTKIT_STRICT_PLUGINS is set)") from exc
    warnings.warn(f"{message}; the other plugins keep working. Set OPTKIT_STRICT_PLUGINS=1 to make this fatal.",
                  PluginLoadWarning, stacklevel=4)


def load_entry_points(registry: "Registry", eps: Iterable[EntryPoint] | None = None) -> None:
    """Import every ``optkit`` entry point and call its hook with ``registry``."""
    from optkit.errors import DuplicateComponentError
    from optkit.registry import PluginRecord, Provider

    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(HookSpecs)
    eps = list(entry_points(group=ENTRY_POINT_GROUP) if eps is None else eps)
    seen: dict[str, str] = {}
    for ep in sorted(eps, key=lambda e: (_distribution(e)[0] != FIRST_PARTY, e.name)):
        dist_name, version = _distribution(ep)
        record = PluginRecord(ep.name, dist_name, version)
        registry.plugins.append(record)
        if ep.name in seen and seen[ep.name] != dist_name:
            _fail(registry, record, f"plugin name '{ep.name}' of {dist_name} clashes with {seen[ep.name]}",
                  ValueError("duplicate entry-point name"))
            continue
        seen[ep.name] = dist_name
        skip = _skip_reason(ep.name, dist_name)
        if skip is not None:
            record.status, record.reason = skip
            continue
        try:
            module = ep.load()
            manager.register(module, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - isolate every plugin
            _fail(registry, record, f'error importing optkit plugin "{ep.name}" ({dist_name})', exc)
            continue
        declared = getattr(module, "OPTKIT_PLUGIN_API", PLUGIN_API)
        if declared != PLUGIN_API:
            _fail(registry, record, f'optkit plugin "{ep.name}" ({dist_name}) is refused',
                  RuntimeError(f"it was built for optkit plugin API {declared}; this optkit provides API {PLUGIN_API}: "
                               "install a plugin release made for this optkit, or an optkit that matches the plugin"))
            manager.unregister(name=ep.name)
            continue
        try:
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            manager.unregister(name=ep.name)
            _fail(registry, record, f'optkit plugin "{ep.name}" ({dist_name}) defines an unknown hook', exc)
            continue
        _call_hook(registry, manager, module, record, Provider(ep.name, dist_name, version),
                   DuplicateComponentError)


def _call_hook(registry, manager, module, record, provider, duplicate_error) -> None:
    impls = [impl for impl in manager.hook.optkit_register.get_hookimpls() if impl.plugin is module]
    with registry.providing(provider):
        for impl in impls:
            before = {(r.kind, r.name): r for r in registry.registrations()}
            try:
                impl.function(registry=registry)
            except duplicate_error:
                raise
            except Exception as exc:  # noqa: BLE001 - roll back additions and overrides alike
                for entry in registry.registrations():
                    key = (entry.kind, entry.name)
                    if key not in before:
                        registry.unregister(*key)
                    elif before[key] is not entry:
                        registry._items[entry.kind][entry.name] = before[key]
                record.components.clear()
                _fail(registry, record, f'the optkit_register hook of plugin "{record.name}" raised', exc)
