"""pytest fixtures for plugin authors; enable them in a ``conftest.py`` with

    pytest_plugins = ["optkit.testing.fixtures"]

``isolated_registry``: a fresh ``Registry`` with optkit's own components only.
``register_component``: ``register_component(kind, name, factory, **register_kwargs)``
registers into the global registry (or ``registry=``) until the test ends.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import pytest

from optkit.registration import Registration, Registry
from optkit.testing.registries import fresh_registry, temporary_component


@pytest.fixture
def isolated_registry() -> Registry:
    return fresh_registry()


@pytest.fixture
def register_component() -> Iterator[Callable[..., Registration]]:
    with contextlib.ExitStack() as stack:

        def register(kind: str, name: str, factory: Callable[..., Any], **kwargs: Any) -> Registration:
            return stack.enter_context(temporary_component(kind, name, factory, **kwargs))

        yield register
