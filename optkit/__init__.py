"""optkit: assemble, load and run OPT-family language models from typed, pluggable components.

Plugins load on first use of `optkit.registry`, never at import.
"""

from __future__ import annotations

from typing import Any

from optkit.errors import (
    BackendUnavailableError,
    CheckpointError,
    CheckpointNotFoundError,
    ComponentError,
    DuplicateComponentError,
    InputError,
    OptkitError,
    PluginLoadError,
    PluginLoadWarning,
    SpecValidationError,
    UnknownComponentError,
)
from optkit.plugins import hookimpl
from optkit.registration import Capabilities, Registry

__version__ = "0.1.0"

registry = Registry(autoload=True)

_LAZY = {
    "ModelSpec": "optkit.spec",
    "load_spec": "optkit.spec",
    "build": "optkit.builder",
    "set_backend": "optkit.builder",
    "from_pretrained": "optkit.loading",
    "from_transformers": "optkit.loading",
    "save_pretrained": "optkit.checkpoints",
    "Model": "optkit.model",
    "ModelOutput": "optkit.outputs",
    "AttentionMask": "optkit.interfaces",
    "Tokenizer": "optkit.tokenizer",
    "generate": "optkit.generation",
    "GenerationConfig": "optkit.generation_config",
    "pipeline": "optkit.pipelines",
    "plan": "optkit.placement",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optkit' has no attribute '{name}'")


__all__ = [
    "AttentionMask", "BackendUnavailableError", "Capabilities", "CheckpointError", "CheckpointNotFoundError",
    "ComponentError", "DuplicateComponentError", "GenerationConfig", "InputError", "Model", "ModelOutput", "ModelSpec", "OptkitError",
    "PluginLoadError", "PluginLoadWarning", "Registry", "SpecValidationError", "UnknownComponentError",
    "build", "from_pretrained", "from_transformers", "hookimpl", "load_spec", "plan", "registry", "save_pretrained",
    "set_backend",
]
