"""optkit.testing: the conformance kit and test helpers for plugin authors.

    from optkit.testing import check_attention_backend
    check_attention_backend("mine")                  # raises ConformanceError naming each failed property
    check_component("mlp", "geglu")                  # the kits of the other kinds (mlp, norm, positional_embedding,
                                                     # token_embedding, linear, kv_cache): optkit.testing.component_kits

    from optkit.testing import AttentionBackendSuite
    class TestMine(AttentionBackendSuite):           # one pytest test per property
        backend = "mine"

Importing this package imports hypothesis (the kit's case generator); the pytest-based
names (``AttentionBackendSuite``, the fixtures) import pytest only when first used.
``import optkit`` itself never imports either.
"""

from __future__ import annotations

from typing import Any

from optkit.testing.cases import AttentionCase, attention_cases, empty_row_cases
from optkit.testing.component_kits import (
    COMPONENT_KINDS,
    COMPONENT_PROPERTIES,
    ComponentConformanceError,
    ComponentReport,
    check_component,
    check_kv_cache,
    check_linear,
    check_mlp,
    check_norm,
    check_positional_embedding,
    check_token_embedding,
)
from optkit.testing.conformance import (
    DEFAULT_EXAMPLES,
    GRADIENT_TOLERANCE,
    LOGITS_TOLERANCE,
    PROPERTIES,
    TOLERANCES,
    ConformanceError,
    ConformanceReport,
    PropertyResult,
    Tolerance,
    check_attention_backend,
)
from optkit.testing.registries import add_plugin, fresh_registry, temporary_component, temporary_plugin
from optkit.testing.tensor_parallel import TensorParallelConformanceError, check_tensor_parallel  # noqa: F401

_LAZY = {
    "AttentionBackendSuite": "optkit.testing.suite",
    "ComponentSuite": "optkit.testing.component_suite",
    "isolated_registry": "optkit.testing.fixtures",
    "register_component": "optkit.testing.fixtures",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optkit.testing' has no attribute '{name}'")


__all__ = [
    "AttentionBackendSuite", "AttentionCase", "COMPONENT_KINDS", "COMPONENT_PROPERTIES", "ComponentConformanceError",
    "ComponentReport", "ComponentSuite", "check_component", "check_kv_cache", "check_linear", "check_mlp", "check_norm",
    "check_positional_embedding", "check_token_embedding", "ConformanceError", "ConformanceReport", "DEFAULT_EXAMPLES",
    "GRADIENT_TOLERANCE", "LOGITS_TOLERANCE", "PROPERTIES", "PropertyResult", "TOLERANCES", "Tolerance",
    "add_plugin", "attention_cases", "check_attention_backend", "empty_row_cases", "fresh_registry",
    "isolated_registry", "register_component", "temporary_component", "temporary_plugin",
]
