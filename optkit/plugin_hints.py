"""Why a component name is unknown when the plugin that provides it is installed but not loaded.

A blocked (OPTKIT_BLOCK_PLUGINS), disabled (OPTKIT_LOAD_PLUGINS, OPTKIT_DISABLE_PLUGIN_AUTOLOAD) or
broken plugin never ran its hook, so its components are not in the registry; without this, asking
for one gets a did-you-mean to a *different* component. Which components a plugin provides is only
known by running it, which a blocked plugin must not be; so a plugin is taken to provide a name when
its entry point is named like the component (``chunked`` -> attention ``chunked``) or when optkit's
catalogue (registry.yaml) says the name comes from the plugin's distribution.
"""

from __future__ import annotations

from typing import Iterable

from optkit.errors import shorten
from optkit.plugins import PluginRecord

NOT_LOADED = ("blocked", "disabled", "broken")
FIXES = {
    "listed in OPTKIT_BLOCK_PLUGINS": "remove it from OPTKIT_BLOCK_PLUGINS to use it",
    "not listed in OPTKIT_LOAD_PLUGINS": "add it to OPTKIT_LOAD_PLUGINS to use it",
    "OPTKIT_DISABLE_PLUGIN_AUTOLOAD is set": "unset OPTKIT_DISABLE_PLUGIN_AUTOLOAD (or load it explicitly) to use it",
}


def _state(record: PluginRecord) -> str:
    if record.status == "broken":
        return f"which is broken ({shorten(record.reason, 200)})"
    word = "blocked" if record.status == "blocked" else "not loaded"
    return f"which is {word} ({record.reason})" if record.reason else f"which is {word}"


def unloaded_provider(records: Iterable[PluginRecord], kind: str, name: str) -> PluginRecord | None:
    """The installed plugin that was not loaded and provides ``kind`` ``name``, when that can be told."""
    from optkit.presets import catalogue_entry

    idle = [r for r in records if r.status in NOT_LOADED]
    named = [r for r in idle if r.name == name]
    if len(named) == 1:
        return named[0]
    entry = catalogue_entry(kind, name)
    if entry is None:
        return None
    package = entry.package.split("[")[0].strip().lower().replace("_", "-")
    same = [r for r in idle if r.distribution.lower().replace("_", "-") == package]
    return same[0] if len(same) == 1 else None


def unloaded_message(records: Iterable[PluginRecord], kind: str, name: str) -> str | None:
    """``unknown attention 'chunked': it is provided by plugin 'chunked' (dist 0.1.0), which is blocked
    (listed in OPTKIT_BLOCK_PLUGINS); remove it from ...``, or None when no unloaded plugin is known to."""
    record = unloaded_provider(records, kind, name)
    if record is None:
        return None
    fix = FIXES.get(record.reason, "fix the plugin (see `optkit plugins`) to use it" if record.status == "broken"
                    else "load the plugin to use it")
    return (f"unknown {kind} '{shorten(name, 80)}': it is provided by plugin '{record.name}' ({record.distribution} "
            f"{record.version}), {_state(record)}; {fix}")
