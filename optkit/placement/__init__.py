"""Big models on the hardware a user has: plan where each unit goes, then dispatch the model there.

* :func:`plan` -- per device the units placed, weight / KV-cache bytes and whether they fit, and the
  ``device_map`` (``{unit: device}``); built on the meta device, so it costs no memory.
* :func:`dispatch` -- put a built or loaded model's units on their devices; ``"disk"`` units are written
  to safetensors files and streamed in per forward, like ``"cpu"`` units when an accelerator computes.

Devices are accelerator indices, ``"cpu"`` and ``"disk"``; see docs/big-models.md.
"""

from optkit.placement.devices import format_size, parse_device, parse_max_memory, parse_size
from optkit.placement.dispatcher import dispatch, is_dispatched
from optkit.placement.planner import DevicePlan, Plan, plan
from optkit.placement.units import Group, Unit, placement_groups, placement_units

__all__ = ["DevicePlan", "Group", "Plan", "Unit", "dispatch", "format_size", "is_dispatched", "parse_device",
           "parse_max_memory", "parse_size", "placement_groups", "placement_units", "plan"]
