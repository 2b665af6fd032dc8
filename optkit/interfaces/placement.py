"""Where a component's weights may live: the declarations big-model placement (device_map) reads.

A placement planner fills accelerators, then CPU, then disk, in module order. It must never split a
module whose forward needs all of its weights on one device at once (OPT's decoder layer), must keep
tied weights together, and may stream an offloaded module's weights in just before its forward.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable


@runtime_checkable
class PlacementUnit(Protocol):
    """A module placed as a whole: all its parameters and buffers on one device (or offloaded together)."""

    placement_unit: ClassVar[bool]


@runtime_checkable
class Offloadable(Protocol):
    """A module whose weights may stay on CPU or disk and be brought to the compute device per forward.

    ``False`` for modules whose weights change form on their device (e.g. quantized when they land):
    such a module can be placed on any single device, but not streamed.
    """

    offloadable: ClassVar[bool]
