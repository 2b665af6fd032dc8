"""Devices and memory sizes as users write them: ``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``; ``"70GiB"``.

Units are explicit because "GB" and "GiB" differ by 7%: ``GiB``/``MiB``/``KiB``/``TiB`` are powers of
two (GiB = 2**30 bytes), ``GB``/``MB``/``KB``/``TB`` powers of ten (GB = 10**9 bytes), a bare number is bytes.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from typing import Union

import torch

from optkit.errors import InputError
from optkit.host import meminfo_bytes

Device = Union[int, str]  # an accelerator index, "cpu" or "disk"
HOST_DEVICES = ("cpu", "disk")
# What the planner leaves unused of the memory it measures (when max_memory is not given).
SAFETY_MARGIN = 0.10

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 200


def _quote(value: object) -> str:
    return _repr.repr(value)


def parse_size(value: int | float | str, *, what: str = "max_memory") -> int:
    """Bytes from ``70GiB`` / ``80 GB`` / ``512MiB`` / an int (bytes)."""
    if isinstance(value, bool):
        raise InputError(f"{what}: {value!r} is not a size; write e.g. '70GiB' (GiB = 2**30 bytes) or '80GB'")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{what}: {value!r} is not a size; sizes are a finite number of bytes, e.g. '70GiB'")
        if value < 0:
            raise InputError(f"{what}: {value!r} is negative; sizes are bytes >= 0")
        return int(value)
    match = _SIZE.match(value) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(f"{what}: {_quote(value)} is not a size; write a number with one of the units "
                         "GiB, MiB, KiB, TiB (powers of 2) or GB, MB, KB, TB (powers of 10), e.g. '70GiB'")
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number):
        raise InputError(f"{what}: {_quote(value)} is not a size that fits in memory; write e.g. '70GiB'")
    return int(number)


def format_size(num_bytes: int, *, round_up: bool = False) -> str:
    """``1.50 GiB``: binary units, as max_memory accepts them back (``round_up`` for a size that must suffice)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            value = math.ceil(num_bytes / scale * 100) / 100 if round_up else num_bytes / scale
            return f"{value:.2f}{unit}"
    return f"{num_bytes}B"


def _is_index(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²', which ``int`` then refuses with a bare ValueError."""
    return text.isascii() and text.isdigit()


def parse_device(value: object, *, what: str = "device") -> Device:
    """``0`` / ``"0"`` / ``"cuda:0"`` -> 0; ``"cpu"``, ``"disk"`` as they are; anything else is an error."""
    if isinstance(value, torch.device):
        value = "cpu" if value.type == "cpu" else f"{value.type}:{value.index or 0}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in HOST_DEVICES:
            return text
        if _is_index(text):
            return int(text)
        kind, colon, index = text.partition(":")
        if (kind == accelerator_type() or kind in ("cuda", "xpu", "mps")) and (_is_index(index) or not colon):
            return int(index) if index else 0  # "cuda" alone is accelerator 0; "cuda:x" / "cuda:-1" are errors
    raise InputError(f"{what}: {_quote(value)} is not a device; use an accelerator index (0, 1, ... or 'cuda:1'), "
                     "'cpu' or 'disk'")


def device_order(device: Device) -> tuple[int, int]:
    """Accelerators by index, then cpu, then disk: the order the planner fills them in."""
    if isinstance(device, int):
        return (0, device)
    return (1, 0) if device == "cpu" else (2, 0)


def accelerator_type() -> str | None:
    """``"cuda"`` (or another torch accelerator) on this machine, None on a CPU-only one."""
    current = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return None if current is None else current.type


def accelerator_count() -> int:
    return torch.accelerator.device_count() if torch.accelerator.is_available() else 0


def torch_device(device: Device) -> torch.device:
    """Where a module on ``device`` keeps its weights (an accelerator index -> that accelerator)."""
    if isinstance(device, int):
        return torch.device(accelerator_type() or "cuda", device)
    return torch.device("cpu")


def check_present(device: Device, *, what: str) -> None:
    """An accelerator index this machine does not have is an error naming it and what there is."""
    if isinstance(device, int) and device >= accelerator_count():
        count = accelerator_count()
        have = f"accelerators 0..{count - 1}" if count else "no accelerator"
        raise InputError(f"{what} names device {device}, which this machine does not have ({have}); "
                         "use an index that exists, 'cpu' or 'disk'")


def available_memory() -> dict[Device, int]:
    """Free memory per device minus the safety margin: every accelerator, then cpu (disk is unbounded)."""
    budget: dict[Device, int] = {}
    for index in range(accelerator_count()):
        free, _ = torch.cuda.mem_get_info(index) if accelerator_type() == "cuda" else (0, 0)
        budget[index] = int(free * (1 - SAFETY_MARGIN))
    budget["cpu"] = int(_host_available() * (1 - SAFETY_MARGIN))
    return budget


def _host_available() -> int:
    available = meminfo_bytes("MemAvailable")
    return available if available is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_max_memory(max_memory: dict[object, int | float | str] | None) -> dict[Device, int | None]:
    """Budget per device, in fill order; None = unbounded (disk when not limited). Default: measured."""
    if max_memory is None:
        budget: dict[Device, int | None] = dict(available_memory())
        budget["disk"] = None
        return budget
    if not isinstance(max_memory, dict) or not max_memory:
        raise InputError(f"max_memory must be a non-empty dict like {{0: '70GiB', 'cpu': '100GiB'}}, "
                         f"got {_quote(max_memory)}")
    budget = {}
    for key, size in max_memory.items():
        device = parse_device(key, what=f"max_memory key {_quote(key)}")
        if device in budget:  # 0 and "cuda:0": a later size silently winning would plan with the wrong budget
            raise InputError(f"max_memory names device {device!r} twice (key {_quote(key)} is the same device as an "
                             "earlier key); give each device one size")
        budget[device] = parse_size(size, what=f"max_memory[{_quote(key)}]")
    return dict(sorted(budget.items(), key=lambda item: device_order(item[0])))


def max_memory_from_text(text: str, *, what: str = "--max-memory") -> dict[str, str]:
    """``"0=80GiB,cpu=8GiB"`` (the command line's form) -> ``{"0": "80GiB", "cpu": "8GiB"}``, sizes checked later."""
    max_memory: dict[str, str] = {}
    for pair in text.split(","):
        device, sep, size = pair.partition("=")
        if not sep or not device.strip():
            raise InputError(f"{what}: {_quote(pair)} is not DEVICE=SIZE (e.g. 0=80GiB,cpu=200GiB,disk=2TB)")
        if device.strip() in max_memory:  # a later value silently winning would plan with the wrong budget
            raise InputError(f"{what}: device {_quote(device.strip())} is given twice; give each device one size")
        max_memory[device.strip()] = size.strip()
    return max_memory
