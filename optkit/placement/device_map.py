"""Explicit device maps: ``{module_prefix: device}`` checked against the model, resolved per unit.

A key may name a unit (``"decoder.layers.3"``) or any module above units (``""`` the whole model,
``"decoder"``, ``"decoder.layers"``); the longest key that covers a unit wins. A key inside a unit
is refused (a unit is placed whole), as is a key that is no module, a unit left without a device, and
units that must share a device (input units, tied weights) on different ones.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping

from optkit.errors import InputError
from optkit.model import Model
from optkit.placement.devices import Device, parse_device
from optkit.placement.units import Group, is_unsplittable

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 120


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _transformers_hint(key: object, modules: Mapping[str, object]) -> str:
    """Transformers' names for OPT modules (``lm_head``, ``model.decoder...``) -> optkit's, when that is one."""
    if not isinstance(key, str):
        return ""
    name = "head" + key.removeprefix("lm_head") if key.split(".")[0] == "lm_head" else key.removeprefix("model.")
    if name != key and name in modules:
        return f" (transformers' name; optkit calls it '{name}')"
    return ""


def resolve_device_map(model: Model, device_map: Mapping[str, object], groups: list[Group]) -> dict[str, Device]:
    """``{unit name: device}`` for every unit, in forward order, or one InputError naming what is wrong."""
    if not isinstance(device_map, Mapping) or not device_map:
        raise InputError(f"device_map must be 'auto', 'balanced', 'sequential' or a non-empty dict "
                         f"{{module_prefix: device}}, got {_short.repr(device_map)}")
    unit_names = [u.name for u in sorted((u for g in groups for u in g.units), key=lambda u: u.position)]
    modules = dict(model.named_modules())
    parsed: dict[str, Device] = {}
    for key, value in device_map.items():
        if not isinstance(key, str) or key not in modules:
            raise InputError(f"device_map names {_short.repr(key)}, which is not a module of this model"
                             f"{_transformers_hint(key, modules)}; its placement units are {_listing(unit_names)}")
        inside = next((u for u in unit_names if key.startswith(u + ".")), None)
        if inside is not None:
            what = ("a decoder layer is never split" if is_unsplittable(modules[inside])
                    else "units are placed whole")
            raise InputError(f"device_map names '{key}', which is inside placement unit '{inside}' ({what}); "
                             f"map '{inside}' as a whole")
        parsed[key] = parse_device(value, what=f"device_map['{key}']")
    resolved: dict[str, Device] = {}
    unplaced = []
    for name in unit_names:
        covering = [k for k in parsed if k == "" or k == name or name.startswith(k + ".")]
        if not covering:
            unplaced.append(name)
            continue
        resolved[name] = parsed[max(covering, key=len)]
    if unplaced:
        raise InputError(f"device_map leaves {_listing(unplaced)} unplaced; give each a device, "
                         f"e.g. {{'{unplaced[0]}': 'cpu'}} (or a prefix that covers it)")
    for group in groups:
        devices = {resolved[name] for name in group.names}
        if len(devices) > 1:
            placed = ", ".join(f"{name} -> {resolved[name]!r}" for name in group.names)
            raise InputError(f"device_map splits units that must share one device ({placed}): the input units "
                             "compute together and tied weights are one tensor; put them on the same device")
    return resolved
