"""Lazy package exports: a name is imported from its module on first use, not when the package is.

``optkit``, ``optkit.inference`` and ``optkit.parallel`` each export names whose modules are slow to import
(torch, FSDP, DCP) or would import each other in a cycle; each gets its module ``__getattr__`` from here.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_exports(module_name: str, mapping: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` (PEP 562) of ``module_name`` for ``{name: module it is defined in}``.

    A name is looked up once: the value is cached in the package's globals, so later lookups never reach
    ``__getattr__`` again. Any other name raises AttributeError as a plain module would.
    """

    def __getattr__(name: str) -> Any:
        if name not in mapping:
            raise AttributeError(f"module '{module_name}' has no attribute '{name}'")
        value = getattr(importlib.import_module(mapping[name]), name)
        sys.modules[module_name].__dict__[name] = value
        return value

    return __getattr__
