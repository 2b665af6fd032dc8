"""Checkpoint formats: how one model family's ``config.json`` and key names map to optkit.

The format type lives in :mod:`optkit.formats.base`; the formats themselves (``optkit.formats.opt``,
``optkit.formats.open_llama``, a plugin's own) are registered through the plugin hook like components
(``registry.register_format``), and these two lookups ask a registry for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optkit.formats.base import (BOOL, INT, NUMBER, STR, TRANSFORMERS_HEAD_PREFIXES, CheckpointFormat,  # noqa: F401
                                 check_config_types, with_head_and_dtype)

if TYPE_CHECKING:
    from optkit.registration import Registry
    from optkit.spec import ModelSpec


def _registry(registry: Registry | None) -> Registry:
    if registry is not None:
        return registry
    from optkit import registry as global_registry

    return global_registry


def format_for_config(config: dict[str, Any], source: str | None = None, *,
                      registry: Registry | None = None) -> CheckpointFormat:
    """The format a ``config.json`` declares (its ``model_type``)."""
    return _registry(registry).format_for_model_type(config.get("model_type"), source)


def format_for_spec(spec: ModelSpec, *, registry: Registry | None = None) -> CheckpointFormat:
    """The format that saves a spec's family."""
    return _registry(registry).format_for_family(spec.family)
