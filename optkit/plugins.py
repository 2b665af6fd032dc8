"""Plugin discovery on pluggy: entry-point group ``optkit``, one hook.

Each entry point is loaded in isolation: a plugin that fails to import, whose hook raises
(SystemExit and other BaseExceptions included), that registers a name another plugin already
registered, or that has no ``@optkit.hookimpl`` hook is recorded as broken with a warning naming
the error, and everyone else keeps working. Only a real Ctrl-C interrupts loading.

Environment switches:
  OPTKIT_STRICT_PLUGINS=1            a broken plugin is a fatal PluginLoadError
  OPTKIT_DISABLE_PLUGIN_AUTOLOAD=1   load only optkit's own first-party plugins
  OPTKIT_LOAD_PLUGINS=a,b            allow-list of third-party plugin names
  OPTKIT_BLOCK_PLUGINS=a,b           block-list of plugin names
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal

import pluggy

from optkit.errors import DuplicateComponentError, PluginLoadError, PluginLoadWarning, shorten

if TYPE_CHECKING:
    from optkit.registration import Registry

PLUGIN_API = 1  # major version of the hook + registration API; plugins declare `OPTKIT_PLUGIN_API = 1`
PROJECT = "optkit"
ENTRY_POINT_GROUP = "optkit"
FIRST_PARTY = "optkit"
HOOK = "optkit_register"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    @hookspec
    def optkit_register(self, registry: "Registry") -> None:
        """Register components with ``registry.register(kind, name, factory, ...)``."""


@dataclass(frozen=True)
class Provider:
    """Which plugin (and distribution) registered a component."""

    plugin: str
    distribution: str = "?"
    version: str = "?"

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution} {self.version})"


@dataclass
class PluginRecord:
    """One entry point as `optkit plugins` shows it."""

    name: str
    distribution: str
    version: str
    status: Literal["ok", "broken", "disabled", "blocked"] = "ok"
    reason: str = ""
    components: list[tuple[str, str]] = field(default_factory=list)


# -- running plugin code -----------------------------------------------------------------------
class PluginEscape(Exception):
    """A BaseException that plugin code raised itself (``sys.exit(3)``, a KeyboardInterrupt that was no
    Ctrl-C, ...), carried as an ordinary Exception so that the plugin is isolated like any failing one."""

    def __init__(self, original: BaseException):
        super().__init__(f"{type(original).__name__}: {original}")
        self.original = original


class _SigintWatch:
    """Tells a real Ctrl-C from a KeyboardInterrupt that plugin code raised: while it is active, a SIGINT
    passes through a handler that notes it before the previous handler raises as usual."""

    def __init__(self) -> None:
        self.seen = False
        self.certain = True  # False: no handler could be installed, so every KeyboardInterrupt counts as real
        self._previous: Any = None

    def __enter__(self) -> "_SigintWatch":
        if threading.current_thread() is not threading.main_thread():
            return self  # Ctrl-C reaches the main thread only: here any KeyboardInterrupt is the plugin's
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, signal.SIG_DFL):
            return self  # Ctrl-C raises no KeyboardInterrupt (ignored, or kills the process outright)
        if previous is None:  # a handler installed outside Python: leave it alone
            self.certain = False
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True
        self._previous(signum, frame)

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def is_users(self, exc: BaseException) -> bool:
        return isinstance(exc, KeyboardInterrupt) and (self.seen or not self.certain)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Run plugin code: a BaseException it raises comes out as `PluginEscape` (an Exception), so callers
    isolate it like any error; the user's own Ctrl-C still interrupts."""
    with _SigintWatch() as watch:
        try:
            yield
        except Exception:
            raise
        except BaseException as exc:
            if watch.is_users(exc):
                raise
            raise PluginEscape(exc) from exc


def original(exc: BaseException) -> BaseException:
    """What the plugin raised, unwrapped from `PluginEscape`."""
    return exc.original if isinstance(exc, PluginEscape) else exc


def describe(exc: BaseException) -> str:
    """``Type: message`` of what plugin code raised, capped for messages."""
    original_ = original(exc)
    return shorten(f"{type(original_).__name__}: {original_}".rstrip(": ").rstrip("."), 500)


# -- one plugin module -------------------------------------------------------------------------
class PluginFailure(Exception):
    """Why one plugin module cannot be used: ``message`` names the plugin, ``cause`` is the error."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(f"{message}: {describe(cause)}")
        self.message, self.cause = message, cause


def register_plugin(registry: "Registry", module: Any, provider: Provider) -> list[tuple[str, str]]:
    """What the loader does with one imported plugin module, also used by `optkit.testing.add_plugin`:
    check its declared API and its ``@optkit.hookimpl`` hook, then call the hook inside
    ``registry.providing(provider)``. If anything fails, every registration it made (additions and
    overrides) is undone and `PluginFailure` says why. Returns the (kind, name) pairs it added."""
    label = f'optkit plugin "{provider.plugin}" ({provider.distribution})'
    declared = getattr(module, "OPTKIT_PLUGIN_API", PLUGIN_API)
    if declared != PLUGIN_API:
        raise PluginFailure(f"{label} is refused", RuntimeError(
            f"it was built for optkit plugin API {shorten(repr(declared), 40)}; this optkit provides API "
            f"{PLUGIN_API}: install a plugin release made for this optkit, or an optkit that matches the plugin"))
    hooks = _marked_hooks(module, provider.plugin, label)
    before = {(r.kind, r.name) for r in registry.registrations()}
    try:
        with registry.all_or_nothing(), registry.providing(provider), guarded():
            for hook in hooks:
                hook(registry=registry)
    except Exception as exc:  # noqa: BLE001 - isolate every plugin
        if isinstance(exc, DuplicateComponentError):
            raise PluginFailure(f"{label} is disabled", exc) from exc
        raise PluginFailure(f'the {HOOK} hook of plugin "{provider.plugin}" raised', exc) from exc
    return sorted({(r.kind, r.name) for r in registry.registrations()} - before)


def _marked_hooks(module: Any, name: str, label: str) -> list[Callable[..., Any]]:
    """The module's ``@optkit.hookimpl`` functions, validated by pluggy against this API's hooks."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(HookSpecs)
    try:
        with guarded():
            manager.register(module, name=name)
    except Exception as exc:  # noqa: BLE001 - e.g. a hook whose arguments are not (registry)
        raise PluginFailure(f"{label} has a hook pluggy refuses", exc) from exc
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginFailure(f"{label} defines an unknown hook", exc) from exc
    hooks = [impl.function for impl in manager.hook.optkit_register.get_hookimpls() if impl.plugin is module]
    if not hooks:
        unmarked = callable(getattr(module, HOOK, None))
        raise PluginFailure(f"{label} registers nothing", TypeError(
            f"its {HOOK} function is not marked @optkit.hookimpl" if unmarked else
            f"it defines no @optkit.hookimpl {HOOK}(registry) function"))
    return hooks


# -- the loader --------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def _distribution(ep: EntryPoint) -> tuple[str, str]:
    try:
        dist = getattr(ep, "dist", None)
        if dist is None:
            return "?", "?"
        return dist.metadata["Name"] or "?", dist.version or "?"
    except Exception:  # noqa: BLE001 - unreadable metadata must not stop the other plugins
        return "?", "?"


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


def _fail(record: PluginRecord, failure: PluginFailure) -> None:
    record.status, record.reason, record.components = "broken", describe(failure.cause), []
    if _env_flag("OPTKIT_STRICT_PLUGINS"):
        raise PluginLoadError(f"{failure} (OPTKIT_STRICT_PLUGINS is set)") from original(failure.cause)
    warnings.warn(f"{failure}; the other plugins keep working. Set OPTKIT_STRICT_PLUGINS=1 to make this fatal.",
                  PluginLoadWarning, stacklevel=5)


def load_entry_points(registry: "Registry", eps: Iterable[EntryPoint] | None = None) -> None:
    """Import every ``optkit`` entry point and call its hook with ``registry``.

    First-party plugins load first, so a third-party plugin that registers one of optkit's own
    names is the one disabled."""
    eps = list(entry_points(group=ENTRY_POINT_GROUP) if eps is None else eps)
    seen: dict[str, str] = {}
    for ep in sorted(eps, key=lambda e: (_distribution(e)[0] != FIRST_PARTY, e.name)):
        dist_name, version = _distribution(ep)
        record = PluginRecord(ep.name, dist_name, version)
        registry.plugins.append(record)
        if ep.name in seen and seen[ep.name] != dist_name:
            _fail(record, PluginFailure(f"plugin name '{ep.name}' of {dist_name} clashes with {seen[ep.name]}",
                                        ValueError("duplicate entry-point name")))
            continue
        seen[ep.name] = dist_name
        skip = _skip_reason(ep.name, dist_name)
        if skip is not None:
            record.status, record.reason = skip
            continue
        try:
            try:
                with guarded():
                    module = ep.load()
            except Exception as exc:  # noqa: BLE001 - isolate every plugin
                raise PluginFailure(f'error importing optkit plugin "{ep.name}" ({dist_name})', exc) from exc
            register_plugin(registry, module, Provider(ep.name, dist_name, version))
        except PluginFailure as failure:
            _fail(record, failure)
