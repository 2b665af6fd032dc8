"""docs/backends.md's capability matrix says what the registry declares, so the two cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest

import optkit

DOC = Path(__file__).resolve().parents[1] / "docs" / "backends.md"
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DEVICE_ORDER = ["cpu", "cuda", "mps", "xpu"]


def matrix() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith("`") and len(cells) == 8:
            rows[cells[0].strip("`").split("`")[0]] = cells
    return rows


@pytest.mark.parametrize("name", optkit.registry.names("attention"))
def test_attention_rows_match_declared_capabilities(name):
    rows = matrix()
    assert name in rows, f"docs/backends.md has no capability row for attention '{name}'"
    _, devices, dtypes, _, _, dropout, weights, backward = rows[name]
    caps = optkit.registry.get("attention", name).capabilities
    declared_devices = ", ".join(d for d in DEVICE_ORDER if d in caps.devices)
    assert devices.startswith(declared_devices)
    assert {d.strip() for d in dtypes.split(",")} == {SHORT[d] for d in caps.dtypes}
    assert weights.strip("*").startswith("yes" if caps.attention_weights else "no")
    assert backward.startswith("yes" if caps.backward else "no")
    if name != "flash":  # flash: dropout depends on the installed generation (FA2 yes, FA4 no), said in the cell
        assert dropout.startswith("yes" if caps.dropout else "no")
