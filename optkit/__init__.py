"""optkit: assemble, load and run OPT-family language models from typed, pluggable components.

Plugins load on first use of `optkit.registry`, never at import; `import optkit` does not even import
torch (the registry, and everything that needs torch, is made on first use), so a command-line tool
answers Ctrl-C cleanly from its first instant.
"""

from __future__ import annotations

import threading
from typing import Any

from optkit._lazy import lazy_exports
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

__version__ = "0.1.0"

_LAZY = {
    "Capabilities": "optkit.registration",
    "Registry": "optkit.registration",
    "ModelSpec": "optkit.spec",
    "load_spec": "optkit.spec",
    "build": "optkit.builder",
    "set_backend": "optkit.builder",
    "from_pretrained": "optkit.loading",
    "default_model_dir": "optkit.bundled",
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
_lazy_getattr = lazy_exports(__name__, _LAZY)


_REGISTRY_LOCK = threading.Lock()


def _global_registry() -> Any:
    """The registry every build uses unless given another: made once, on first use."""
    with _REGISTRY_LOCK:
        if "registry" not in globals():
            from optkit.registration import Registry

            globals()["registry"] = Registry(autoload=True)
        return globals()["registry"]


def __getattr__(name: str) -> Any:
    if name == "registry":
        return _global_registry()
    return _lazy_getattr(name)


__all__ = [
    "AttentionMask", "BackendUnavailableError", "Capabilities", "CheckpointError", "CheckpointNotFoundError",
    "ComponentError", "DuplicateComponentError", "GenerationConfig", "InputError", "Model", "ModelOutput", "ModelSpec", "OptkitError",
    "PluginLoadError", "PluginLoadWarning", "Registry", "SpecValidationError", "UnknownComponentError",
    "build", "default_model_dir", "from_pretrained", "from_transformers", "hookimpl", "load_spec", "plan", "registry", "save_pretrained",
    "set_backend",
]
