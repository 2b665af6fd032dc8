"""Adapters: small trainable deltas on a frozen model, in PEFT's file format (see docs/adapters.md).

``add_adapters`` wraps projections with :class:`LoRALinear`; ``set_adapter`` switches between named
adapters; ``merge_adapters`` / ``unmerge_adapters`` / ``merge_and_unload`` fold them into the weights;
``save_adapters`` / ``load_adapters`` read and write PEFT's ``adapter_config.json`` +
``adapter_model.safetensors``.
"""

from __future__ import annotations

from optkit.adapters.attach import (ALL_LINEAR, active_adapter, adapter_names, adapter_parameters, add_adapters,
                                    add_adapters_from_options,
                                    merge_adapters, merge_and_unload, set_adapter, target_names, unload_adapters,
                                    unmerge_adapters)
from optkit.adapters.lora import LoRALinear, LoRASettings
from optkit.adapters.peft_format import AdapterConfigWarning, load_adapters, save_adapters

__all__ = [
    "ALL_LINEAR", "AdapterConfigWarning", "LoRALinear", "LoRASettings", "active_adapter", "adapter_names",
    "adapter_parameters", "add_adapters", "add_adapters_from_options", "load_adapters", "merge_adapters", "merge_and_unload", "save_adapters",
    "set_adapter", "target_names", "unload_adapters", "unmerge_adapters",
]
