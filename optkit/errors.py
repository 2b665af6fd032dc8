"""Every error optkit raises on purpose.

Each one carries a single message that names the thing at fault and how to fix it,
so users never see a bare KeyError from deep inside the kit.
"""

from __future__ import annotations


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


class BackendUnavailableError(OptkitError):
    """An explicitly chosen component cannot run on this machine / dtype / device."""


class SpecValidationError(OptkitError, ValueError):
    """A model spec has problems; all of them are listed, each with its YAML path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in model spec{where}:\n{lines}")


class CheckpointError(OptkitError, ValueError):
    """A checkpoint cannot be turned into this model (missing/unexpected/mis-shaped tensors...)."""


class CheckpointNotFoundError(OptkitError, OSError):
    """A path or hub id that resolves to no checkpoint."""


class InputError(OptkitError, ValueError):
    """Bad model inputs: ids out of range, sequences too long, inconsistent shapes."""
