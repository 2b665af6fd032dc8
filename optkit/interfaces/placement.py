"""Where a component's weights may live: the declarations big-model placement (device_map) reads.

A placement planner fills accelerators, then CPU, then disk, in module order. It must never split a
module whose forward needs all of its weights on one device at once (OPT's decoder layer), must keep
tied weights together, and may stream an offloaded module's weights in just before its forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@dataclass
class Placement:
    """Where a dispatched model's units live (set on ``Model.placement`` by ``optkit.placement.dispatch``).

    ``device_map`` maps each placement unit's module name to its device (an accelerator index, "cpu" or
    "disk"); ``input_device`` is where inputs go; ``hooks`` are the handles that move weights and
    activations (removing them undoes nothing else).
    """

    device_map: dict[str, Any]
    input_device: torch.device
    hooks: list[Any] = field(default_factory=list)
    compute_devices: dict[str, torch.device] = field(default_factory=dict)  # unit -> where it computes

    @property
    def single_device(self) -> bool:
        """Every unit on one device, nothing streamed: the model runs as if it had not been dispatched."""
        return len({str(device) for device in self.device_map.values()}) == 1 and \
            str(next(iter(self.device_map.values()))) != "disk"


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
