"""Every error optkit raises on purpose.

Each one carries a single message that names the thing at fault and how to fix it,
so users never see a bare KeyError from deep inside the kit.
"""

from __future__ import annotations

import reprlib

QUOTE_LIMIT = 200  # characters of user data (a value, a name, a plugin's exception) a message quotes at most


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out: messages stay readable
    (and small) whatever the user or a plugin passed in."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def brief_repr(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A bounded ``repr`` for messages: nested containers, long strings and huge (YAML-bomb) documents are
    abbreviated before they are rendered, never rendered in full and then cut."""
    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, limit, limit, 60
    short.maxtuple = short.maxlist = short.maxarray = short.maxdict = short.maxset = short.maxfrozenset = 6
    short.maxdeque = 6
    return shorten(short.repr(value), limit)


class OptkitError(Exception):
    """Base class: catch this to catch every deliberate optkit error."""


class UnknownComponentError(OptkitError, KeyError):
    """A component name that no installed plugin registers."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(OptkitError):
    """Two plugins registered the same (kind, name)."""


class PluginLoadError(OptkitError):
    """A plugin failed to import or its hook raised (fatal only in strict mode)."""


class PluginLoadWarning(UserWarning):
    """A plugin failed to load; the others keep working."""


class ComponentError(OptkitError):
    """A plugin's component is broken: a malformed registration, or a factory that raised or built something
    that does not meet its kind's interface (caught at registration or build time, never at the first forward)."""


class BackendUnavailableError(OptkitError):
    """An explicitly chosen component cannot run on this machine / dtype / device."""


class SpecValidationError(OptkitError, ValueError):
    """A model spec has problems; all of them are listed, each with its YAML path."""

    SHOWN = 50  # the message lists this many problems (``problems`` keeps them all)

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems[:self.SHOWN])
        if len(self.problems) > self.SHOWN:
            lines += f"\n  ... and {len(self.problems) - self.SHOWN} more"
        super().__init__(f"{len(self.problems)} problem(s) in model spec{where}:\n{lines}")


class CheckpointError(OptkitError, ValueError):
    """A checkpoint cannot be turned into this model (missing/unexpected/mis-shaped tensors...)."""


class CheckpointNotFoundError(OptkitError, OSError):
    """A path or hub id that resolves to no checkpoint."""


class InputError(OptkitError, ValueError):
    """Bad model inputs: ids out of range, sequences too long, inconsistent shapes."""
