"""Fixtures and hooks every test module shares; shared functions and constants live in ``tests.helpers``."""

import os

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time: a red run is reproducible, never a coin toss.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Tests compile afresh and write nothing under ~/.cache; tests/test_compile_cache.py turns the cache on itself.
os.environ.setdefault("OPTKIT_COMPILE_CACHE", "0")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run faster on one thread, and a loaded machine stops thrashing."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
