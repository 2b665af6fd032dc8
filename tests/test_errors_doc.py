"""docs/errors.md is executable: every example there is re-run and must print exactly what the page shows.

Each example is a ``### `id` `` heading, a ```python block (run with ``optkit``, ``torch``, ``Path`` and a
fresh directory ``tmp`` in scope) and a ```text block with the message of the error it raises.
Paths under ``tmp`` are written as ``<tmp>`` on the page.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest
import torch

import optkit

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "errors.md"
EXAMPLE = re.compile(r"^### `(?P<id>[a-z0-9-]+)`.*?\n```python\n(?P<code>.*?)```\n+```text\n(?P<message>.*?)```",
                     re.S | re.M)
TYPES = re.compile(r"^\| `(?P<name>\w+)`", re.M)


def examples() -> list[tuple[str, str, str]]:
    return [(m["id"], m["code"], m["message"].rstrip("\n")) for m in EXAMPLE.finditer(PAGE.read_text())]


def test_the_page_has_examples_and_every_error_type_is_listed():
    assert len(examples()) >= 10
    listed = set(TYPES.findall(PAGE.read_text()))
    public = {name for name in optkit.__all__ if name.endswith(("Error", "Warning"))}
    assert public <= listed, f"docs/errors.md does not list {sorted(public - listed)}"
    for name in public:
        cls = getattr(optkit, name)
        assert issubclass(cls, optkit.OptkitError) or issubclass(cls, Warning), name


@pytest.mark.parametrize("example_id, code, message", examples(), ids=[e[0] for e in examples()])
def test_each_documented_example_prints_what_the_page_shows(example_id, code, message, tmp_path):
    namespace = {"optkit": optkit, "torch": torch, "Path": pathlib.Path, "tmp": tmp_path}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exec(compile(code, f"docs/errors.md#{example_id}", "exec"), namespace)
        except optkit.OptkitError as exc:
            printed = str(exc)
        else:
            documented = [w for w in caught if issubclass(w.category, optkit.PluginLoadWarning)]
            assert documented, f"example {example_id} raised no optkit error and warned nothing"
            printed = str(documented[0].message)
    printed = printed.replace(str(tmp_path), "<tmp>")
    assert printed == message
