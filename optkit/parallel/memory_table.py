"""The per-rank parameter memory table of docs/distributed.md, computed from the plan (never typed in).

    python -m optkit.parallel.memory_table      # prints the Markdown table

Every preset but the tiny test ones, at tp_size 1/2/4/8, in float16 and int8, from
:func:`optkit.parallel.planned_parameter_bytes`. Decoder layers are identical, so each preset is built on
"meta" with one layer and its layer's bytes counted ``num_layers`` times: the whole table takes seconds.
tests/test_parallel.py checks that the docs hold exactly this table.
"""

from __future__ import annotations

import functools

import optkit
from optkit.errors import InputError
from optkit.parallel.plan import planned_parameter_bytes
from optkit.presets import preset_names
from optkit.spec import load_spec

TP_SIZES = (1, 2, 4, 8)
DTYPES = ("float16", "int8")


def table_presets() -> list[str]:
    return [name for name in preset_names() if "tiny" not in name]


@functools.lru_cache(maxsize=None)
def _short_models(preset: str) -> tuple[int, optkit.Model, optkit.Model]:
    """(num_layers, the preset with one layer, with two) on "meta"."""
    layers = load_spec(preset, registry=optkit.registry).decoder.num_layers
    one, two = (optkit.build({"extends": preset, "decoder": {"num_layers": n}}, device="meta") for n in (1, 2))
    return layers, one, two


def rank_bytes(preset: str, tp_size: int, dtype: str) -> int:
    """Parameter bytes one of ``tp_size`` ranks holds for ``preset`` counted in ``dtype`` (InputError when
    ``tp_size`` does not split it)."""
    layers, one, two = _short_models(preset)
    first, second = planned_parameter_bytes(one, tp_size, dtype), planned_parameter_bytes(two, tp_size, dtype)
    return first + (layers - 1) * (second - first)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _cell(preset: str, tp_size: int, dtype: str) -> str:
    try:
        return _size(rank_bytes(preset, tp_size, dtype))
    except InputError:
        return "--"


def markdown_table() -> str:
    header = "| preset | " + " | ".join(f"{'fp16' if d == 'float16' else d} TP={n}" for d in DTYPES for n in TP_SIZES)
    lines = [header + " |", "|---|" + "---|" * (len(DTYPES) * len(TP_SIZES))]
    for preset in table_presets():
        lines.append(f"| {preset} | " + " | ".join(_cell(preset, n, d) for d in DTYPES for n in TP_SIZES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
