"""Registries for tests: a fresh isolated one, and temporary registrations in any one.

Tests that register into the global ``optkit.registry`` must leave it as they found it,
or one test's component leaks into every later test; these helpers undo on exit.
"""

from __future__ import annotations

import contextlib
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, Callable, Iterator

from optkit.errors import PluginLoadError
from optkit.plugins import ENTRY_POINT_GROUP, FIRST_PARTY, PluginFailure, load_entry_points, original, register_plugin
from optkit.registration import Provider, Registration, Registry


def fresh_registry(*, first_party: bool = True, plugins: tuple[ModuleType, ...] = ()) -> Registry:
    """A new ``Registry`` that never autoloads: optkit's own components (unless
    ``first_party=False``) plus the given plugin modules, nothing installed elsewhere."""
    registry = Registry(autoload=False)
    if first_party:
        _load_first_party(registry)
    for module in plugins:
        add_plugin(module, registry)
    return registry


def _load_first_party(registry: Registry) -> None:
    """Through optkit's own entry points, exactly as the global registry loads them."""
    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP)
           if getattr(ep, "dist", None) is not None and ep.dist.metadata["Name"] == FIRST_PARTY]
    if not eps:
        raise PluginLoadError("optkit's own entry points are not installed, so neither this registry nor the global "
                           "one can find its components: install optkit with pip (pip install -e .)")
    load_entry_points(registry, eps=eps)


def add_plugin(module: ModuleType, registry: Registry, *, provider: Provider | None = None
               ) -> list[tuple[str, str]]:
    """Register a plugin module into ``registry`` exactly as the loader does (its declared API, its
    ``@optkit.hookimpl`` marker, rollback of additions and overrides when the hook fails); returns
    the ``(kind, name)`` pairs it added. Where the loader would mark the plugin broken, this raises
    the `PluginLoadError` the loader raises under OPTKIT_STRICT_PLUGINS=1."""
    try:
        return register_plugin(registry, module, provider or Provider(module.__name__, "<temporary>", "?"))
    except PluginFailure as failure:
        raise PluginLoadError(str(failure)) from original(failure.cause)


def _target(registry: Registry | None) -> Registry:
    """The given registry, or the global one, loaded first: registering into an unloaded
    global registry would clash with the installed plugins when they load later."""
    if registry is None:
        from optkit import registry as global_registry

        registry = global_registry
    registry.ensure_loaded()
    return registry


@contextlib.contextmanager
def temporary_component(kind: str, name: str, factory: Callable[..., Any], *, registry: Registry | None = None,
                        **register_kwargs: Any) -> Iterator[Registration]:
    """Register ``(kind, name)`` for the duration of the block (global registry by default).

    ``register_kwargs`` go to ``Registry.register`` (params, capabilities, check,
    description, override, auto_priority). A component it overrode comes back afterwards.
    """
    target = _target(registry)
    previous = target.get(kind, name) if (kind, name) in target else None
    entry = target.register(kind, name, factory, **register_kwargs)
    try:
        yield entry
    finally:
        target.unregister(kind, name)
        if previous is not None:
            _restore(target, previous)


@contextlib.contextmanager
def temporary_plugin(module: ModuleType, *, registry: Registry | None = None) -> Iterator[list[tuple[str, str]]]:
    """Run a plugin module's hook for the duration of the block (no install needed); yields the
    ``(kind, name)`` pairs it added, and afterwards removes them and restores what it overrode."""
    target = _target(registry)
    before = {(r.kind, r.name): r for r in target.registrations()}
    added = add_plugin(module, target)
    replaced = [entry for entry in before.values() if target.get(entry.kind, entry.name) is not entry]
    try:
        yield added
    finally:
        for kind, name in added:
            target.unregister(kind, name)
        for entry in replaced:
            _restore(target, entry)


def _restore(registry: Registry, entry: Registration) -> None:
    """Put back a registration an override replaced, under its original provider."""
    with registry.providing(entry.provider):
        registry.register(entry.kind, entry.name, entry.factory, params=entry.params,
                          capabilities=entry.capabilities, check=entry.check, description=entry.description,
                          override=True, auto_priority=entry.auto_priority)
    for record in registry.plugins:  # register() listed it again under its plugin: once is enough
        if record.name == entry.provider.plugin and record.components.count((entry.kind, entry.name)) > 1:
            record.components.reverse()
            record.components.remove((entry.kind, entry.name))
            record.components.reverse()
