"""registry.yaml: model presets (with aliases) and the backend catalogue."""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from optkit.errors import SpecValidationError, shorten


class CatalogueEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package: str
    priority: int = 0
    install: str | None = None


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    aliases: list[str] = Field(default_factory=list)
    abstract: bool = False
    spec: dict[str, Any]


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_version: int
    presets: dict[str, Preset]
    catalogue: dict[str, dict[str, CatalogueEntry]] = Field(default_factory=dict)


PACKAGED = "registry.yaml"  # inside the optkit package: a real copy of the top-level registry.yaml, never a link


@lru_cache(maxsize=1)
def registry_file() -> RegistryFile:
    """The packaged catalogue (tests/test_registry.py also reads it with the strict spec reader: no duplicate
    keys); a missing or broken file is one error saying so, not a traceback from deep inside a lookup."""
    source = f"optkit/{PACKAGED}"
    try:
        text = files("optkit").joinpath(PACKAGED).read_text(encoding="utf-8")
        return RegistryFile.model_validate(yaml.safe_load(text))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError) as exc:
        raise SpecValidationError([f"optkit's preset catalogue cannot be read: {type(exc).__name__}: "
                                   f"{shorten(str(exc), 500)}; reinstall optkit"], source=source) from None


def preset_names(*, include_abstract: bool = False) -> list[str]:
    return [name for name, p in registry_file().presets.items() if include_abstract or not p.abstract]


def canonical_preset_name(name: str) -> str | None:
    """The preset a name or alias refers to (``facebook/opt-125m`` -> ``opt-125m``)."""
    presets = registry_file().presets
    if name in presets:
        return name
    for canonical, preset in presets.items():
        if name in preset.aliases:
            return canonical
    return None


def preset_spec(name: str) -> dict[str, Any]:
    """The raw (unresolved) spec mapping of a preset; KeyError when unknown."""
    canonical = canonical_preset_name(name)
    if canonical is None:
        raise KeyError(name)
    return dict(registry_file().presets[canonical].spec)


def catalogue_entry(kind: str, name: str) -> CatalogueEntry | None:
    return registry_file().catalogue.get(kind, {}).get(name)


def catalogue_priority(kind: str, name: str) -> int:
    entry = catalogue_entry(kind, name)
    return entry.priority if entry is not None else 0
