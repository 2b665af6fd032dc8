"""``optkit run --device-map ...``: the placement options of the command line, and what ``-v`` prints.

Kept here so that ``optkit.cli_run`` only adds the options and asks for a placed model: loading with a
device map, checking the options against each other and describing the map are placement's business.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch

from optkit.errors import InputError
from optkit.placement.devices import format_size, max_memory_from_text
from optkit.placement.planner import STRATEGIES, _ranges, plan

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device-map``, ``--max-memory``, ``--offload-folder`` and ``-v`` on ``optkit run``."""
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread the model over accelerators, cpu and disk: auto, balanced, sequential, or a "
                             "JSON object {module_prefix: device} (see docs/big-models.md)")
    parser.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                        help="with --device-map: budget per device, e.g. 0=80GiB,cpu=8GiB,disk=1TB "
                             "(default: free memory minus 10%%)")
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="with --device-map: where units mapped to 'disk' are written (safetensors files)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the chosen device map (unit -> device, bytes per device) on stderr")


@dataclass(frozen=True)
class Placed:
    """A model loaded with a device map, and where its tokenizer files are."""

    model: Any
    tokenizer: str


def _device_map(text: str) -> str | dict[str, Any]:
    if text in STRATEGIES:
        return text
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"--device-map: {text[:200]!r} is not valid JSON ({error.msg} at column {error.colno}); "
                             'write e.g. \'{"": "cpu", "decoder.layers.1": "disk"}\'') from None
        if isinstance(value, dict):
            return value
    raise InputError(f"--device-map: {text[:200]!r} is not one of {', '.join(STRATEGIES)} nor a JSON object "
                     '{module_prefix: device}, e.g. \'{"": "cpu", "decoder.layers.1": "disk"}\'')


def _dtype(name: str | None) -> torch.dtype | str | None:
    if name is None or name == "auto":
        return name
    if name.removeprefix("torch.") not in DTYPE_NAMES:
        raise InputError(f"--dtype {name[:50]!r} is not a dtype; use float32, float16, bfloat16 or auto")
    return getattr(torch, name.removeprefix("torch."))


def load_placed(args: argparse.Namespace) -> Placed | None:
    """With ``--device-map``: the model loaded onto its devices (its map on stderr with ``-v``); else None.

    ``--max-memory`` / ``--offload-folder`` without ``--device-map``, or ``--device`` with it, are refused:
    the map decides the devices.
    """
    if args.device_map is None:
        if args.max_memory is not None or args.offload_folder is not None:
            given = "--max-memory" if args.max_memory is not None else "--offload-folder"
            raise InputError(f"{given} places a model only with --device-map; add --device-map auto (or a map)")
        return None
    if args.device is not None:
        raise InputError(f"--device {args.device[:50]!r} and --device-map both say where the model goes; "
                         "pass one (with --device-map, inputs go where the first unit computes)")
    from optkit.bundled import BUNDLED_MODEL
    from optkit.loading import from_pretrained

    source = args.model or BUNDLED_MODEL
    max_memory = max_memory_from_text(args.max_memory) if args.max_memory else None
    model = from_pretrained(source, dtype=_dtype(args.dtype), attention=args.attention, linear=args.linear,
                            device_map=_device_map(args.device_map), max_memory=max_memory,
                            offload_folder=args.offload_folder)
    if args.verbose:
        print(describe(model), file=sys.stderr, flush=True)
    return Placed(model, source)


def describe(model: Any) -> str:
    """The dispatched ``model``'s map: each unit and its device, then weight bytes per device."""
    device_map = model.device_map
    if device_map is None:
        return f"device map: none (every unit on {model.device})"
    result = plan(model, device_map=device_map, max_memory={device: 0 for device in set(device_map.values())})
    width = max(len(unit) for unit in device_map)
    lines = [f"device map ({len(device_map)} units, compute on {result.compute_device!r}):"]
    lines += [f"  {unit:<{width}}  {device!r}" for unit, device in device_map.items()]
    lines.append("bytes per device:")
    for d in result.devices:
        lines.append(f"  {d.device!r:>6}  weights {format_size(d.weight_bytes):>10}  "
                     f"({len(d.modules)} units: {_ranges(d.modules)})")
    return "\n".join(lines)
