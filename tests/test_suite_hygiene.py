"""The test suite's own rules, checked so they stay true.

* A test module never imports another test module: what several modules share lives in
  ``tests/helpers`` (functions, constants) or ``tests/conftest.py`` (fixtures).
* Nothing in the suite edits the import path (``sys.path``, ``site.addsitedir``, ``PYTHONPATH``):
  ``tests`` is a package and the plugins are installed, so every import works as it would for a user.
  Shared code is imported as ``tests.helpers``, never by a bare name that only resolves when the
  ``tests`` directory itself is on the path.
* ``slow`` tests still run by default: the pytest configuration deselects nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CHECKED = sorted([*TESTS.glob("test_*.py"), TESTS / "conftest.py", *(TESTS / "helpers").glob("*.py")])
# top-level names that resolve only when tests/ itself is on sys.path (hf_oracle, helpers, test_x, ...)
LOCAL_NAMES = {p.stem for p in TESTS.glob("*.py")} | {p.name for p in TESTS.iterdir() if p.is_dir()}
PATH_EDITS = {("sys", "path"), ("site", "addsitedir")}
ENV_SETTERS = {"setenv", "setdefault", "putenv", "update"}


def _is_test_module(dotted: str) -> bool:
    return any(part.startswith("test_") for part in dotted.split("."))


def _sets_pythonpath(node: ast.AST) -> bool:
    """``dict(PYTHONPATH=...)``, ``{"PYTHONPATH": ...}``, ``env["PYTHONPATH"] = ...``, ``setenv("PYTHONPATH", ...)``."""
    if isinstance(node, ast.keyword):
        return node.arg == "PYTHONPATH"
    if isinstance(node, ast.Dict):
        keys = node.keys
    elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
        keys = [node.slice]
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ENV_SETTERS:
        keys = node.args[:1]
    else:
        return False
    return any(isinstance(key, ast.Constant) and key.value == "PYTHONPATH" for key in keys)


def problems(source: str, filename: str = "<test>") -> list[str]:
    """Every import of a test module, bare import of a tests/ module, and import-path edit in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        modules, absolute = [], True
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base, absolute = node.module or "", node.level == 0
            modules = [base] + [f"{base}.{alias.name}".lstrip(".") for alias in node.names]
            if node.module == "sys" and any(alias.name == "path" for alias in node.names):
                found.append(f"{where}: imports sys.path; the suite never edits the import path")
        test_modules = [module for module in modules if _is_test_module(module)]
        if test_modules:
            found.append(f"{where}: imports test module {test_modules[0]!r}; move what it shares into tests/helpers")
        elif absolute and any(module.split(".")[0] in LOCAL_NAMES for module in modules):
            found.append(f"{where}: imports {modules[0]!r} by a bare name that needs tests/ on sys.path; "
                         f"import it as tests.{modules[0]}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and (node.value.id, node.attr) in PATH_EDITS:
            found.append(f"{where}: uses {node.value.id}.{node.attr}; the suite never edits the import path")
        if _sets_pythonpath(node):
            found.append(f"{where}: sets PYTHONPATH; the suite never edits the import path")
    return found


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(TESTS)))
def test_no_test_module_imports_another_or_edits_the_import_path(path: Path):
    assert problems(path.read_text(encoding="utf-8"), path.name) == []


@pytest.mark.parametrize("source", [
    "from test_pipeline import make_text_model_dir",
    "import test_open_llama",
    "from tests.test_pipeline import make_text_model_dir",
    "from tests import test_pipeline",
    "from . import test_pipeline",
    "from .test_pipeline import make_text_model_dir",
    "from helpers import batch",
    "import conftest",
    "import sys\nsys.path.insert(0, 'plugins')",
    "import sys\nsys.path.append('x')",
    "from sys import path",
    "import site\nsite.addsitedir('x')",
    "import os\nenv = dict(os.environ, PYTHONPATH='plugins')",
    "env = {'PYTHONPATH': 'plugins'}",
    "import os\nos.environ['PYTHONPATH'] = 'plugins'",
    "def test_x(monkeypatch):\n    monkeypatch.setenv('PYTHONPATH', 'plugins')",
    "def f():\n    from test_open_llama import tiny_model",
])
def test_each_forbidden_pattern_is_caught(source: str):
    assert problems(source) != []


@pytest.mark.parametrize("source", [
    "from tests.helpers import batch, saved_pair",
    "import tests.helpers",
    "import optkit\nfrom optkit.testing import fresh_registry",
    "SCRIPT = 'import sys; print(sys.path)'",  # data for a subprocess, not an edit
    "out = {'sys_path': 1}",
    "import os\nassert 'PYTHONPATH' not in os.environ",
    "import pytest\n@pytest.fixture\ndef tests_dir(): ...",
])
def test_allowed_patterns_pass(source: str):
    assert problems(source) == []


def test_pytest_configuration_deselects_nothing(pytestconfig: pytest.Config):
    """``slow`` is for a quick local ``-m "not slow"``; CI and a plain ``pytest`` run every test."""
    addopts = pytestconfig.getini("addopts")
    assert not [o for o in addopts if o in ("-m", "-k") or o.startswith(("-m", "-k", "--deselect"))], addopts
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
