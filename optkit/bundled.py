"""The small model bundled in the package, and its public handle ``"optkit-default"``.

Why a handle: library examples and tests must work offline, where no Hub id resolves. Wherever a checkpoint
or tokenizer name is accepted, ``"optkit-default"`` means this directory (a real local directory of that name
still wins, as a local path always does over a Hub id).
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

BUNDLED_MODEL = "optkit-default"


def default_model_dir() -> Path:
    """Where the bundled default model (weights, tokenizer files, generation defaults) lives."""
    return Path(str(importlib.resources.files("optkit") / "default_model"))


def bundled_directory(path_or_id: str | os.PathLike[str]) -> Path | None:
    """The bundled model's directory if ``path_or_id`` is its handle and no local directory has that name."""
    if str(path_or_id) == BUNDLED_MODEL and not Path(BUNDLED_MODEL).is_dir():
        return default_model_dir()
    return None
