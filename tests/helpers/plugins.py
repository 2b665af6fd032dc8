"""Stand-ins for the entry points and distributions optkit's plugin loader reads."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# Every environment switch of the loader; tests that load plugins clear them first.
PLUGIN_ENV = ("OPTKIT_STRICT_PLUGINS", "OPTKIT_DISABLE_PLUGIN_AUTOLOAD", "OPTKIT_LOAD_PLUGINS", "OPTKIT_BLOCK_PLUGINS")


@dataclass
class FakeDist:
    name: str
    version: str = "1.0"

    @property
    def metadata(self) -> dict[str, str]:
        return {"Name": self.name}


@dataclass
class FakeEntryPoint:
    """What load_entry_points reads from an EntryPoint, with a settable ``dist``."""

    name: str
    value: str
    dist: FakeDist | None = None
    group: str = "optkit"

    def load(self):
        return importlib.import_module(self.value)
