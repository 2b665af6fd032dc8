"""The pieces a device map places, read from the module tree, and what each weighs.

A model is placed in *units*, in the order its forward runs them:

* the **input** units -- the decoder's children before ``layers`` (``decoder.embed_tokens``,
  ``decoder.project_in``, ``decoder.embed_positions``). They share one device: ``Decoder.forward`` adds the
  positional table to the embeddings itself (not through a module call), so they compute together;
* every **decoder layer** (``decoder.layers.{i}``): a :class:`~optkit.interfaces.PlacementUnit`, never split;
* the **output** units -- the decoder's children after ``layers`` (``decoder.final_layer_norm``,
  ``decoder.project_out``) and the model's other children (``head``).

Units that share a tensor (a tied LM head and the token embedding: one tensor) form one *group* and
always land on one device. Weight bytes count each tensor once, at the dtype the model will run in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from optkit.interfaces import DecoderBlock, Offloadable, PlacementUnit
from optkit.model import Model

Role = Literal["input", "layer", "output"]
INT8 = "int8"
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                                  INT8: torch.float16}  # int8: projections are int8, the rest computes in fp16
INT8_SCALE_BYTES = 4  # one fp32 absmax scale per output row of an int8 projection (LLM.int8, vector-wise)


@dataclass(frozen=True)
class Unit:
    """One module placed whole: its name (a ``state_dict`` prefix), its role, the module itself, and its
    position in forward order."""

    name: str
    role: Role
    module: nn.Module = field(repr=False, compare=False)
    position: int = 0


@dataclass(frozen=True)
class Group:
    """Units that must share a device, with their weight bytes (each tensor once) and KV-cache bytes."""

    units: tuple[Unit, ...]
    weight_bytes: int
    kv_cache_bytes: int

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def is_layer(self) -> bool:
        return any(u.role == "layer" for u in self.units)


def placement_units(model: Model) -> list[Unit]:
    """Every unit of ``model`` in forward order (see the module docstring)."""
    units: list[Unit] = []
    role: Role = "input"
    for name, child in model.decoder.named_children():
        if name == "layers":
            units += [Unit(f"decoder.layers.{i}", "layer", layer) for i, layer in enumerate(child)]
            role = "output"
        else:
            units.append(Unit(f"decoder.{name}", role, child))
    units += [Unit(name, "output", child) for name, child in model.named_children() if name != "decoder"]
    return [Unit(u.name, u.role, u.module, position) for position, u in enumerate(units)]


def unit_tensors(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """(owner, attribute, tensor) for every parameter and buffer in ``module``, shared ones once per owner."""
    found = []
    for owner in module.modules():
        found += [(owner, name, p) for name, p in owner._parameters.items() if p is not None]
        found += [(owner, name, b) for name, b in owner._buffers.items() if b is not None]
    return found


def tensor_bytes(module: nn.Module, tensor: Tensor, dtype: str) -> int:
    """Bytes of one tensor when the model runs in ``dtype`` (see :data:`DTYPES`)."""
    if not tensor.is_floating_point():
        return tensor.numel() * tensor.element_size()
    if dtype == INT8 and isinstance(module, nn.Linear) and tensor is module.weight:
        return tensor.numel() + module.out_features * INT8_SCALE_BYTES
    return tensor.numel() * DTYPES[dtype].itemsize


def streamable_problem(unit: Unit) -> str | None:
    """Why ``unit``'s weights cannot be streamed in per forward (a submodule declares it), or None."""
    for name, sub in unit.module.named_modules():
        if isinstance(sub, Offloadable) and not sub.offloadable:
            where = f"{unit.name}.{name}" if name else unit.name
            return f"'{where}' ({type(sub).__name__}) declares offloadable = False"
    return None


def is_unsplittable(module: nn.Module) -> bool:
    """Whether ``module`` declares that its forward needs all its weights on one device (``PlacementUnit``)."""
    return isinstance(module, PlacementUnit) and module.placement_unit


def kv_cache_bytes(model: Model, unit: Unit, *, batch: int, max_length: int, dtype: str) -> int:
    """Keys + values one layer holds for ``batch`` sequences of ``max_length`` tokens."""
    if unit.role != "layer":
        return 0
    d = model.spec.decoder
    heads = unit.module.kv_heads if isinstance(unit.module, DecoderBlock) else d.num_heads
    return 2 * batch * heads * max_length * d.head_dim * DTYPES[dtype].itemsize


def placement_groups(model: Model, *, dtype: str, batch: int, max_length: int) -> list[Group]:
    """Units joined where they must share a device (input units; tied tensors), in forward order.

    A group sits where its first unit sits in forward order: a tied head joins the input group.
    """
    units = placement_units(model)
    group_of: dict[str, int] = {}
    members: list[list[Unit]] = []
    owner_of_tensor: dict[int, int] = {}
    for unit in units:
        tied = {owner_of_tensor[id(t)] for _, _, t in unit_tensors(unit.module) if id(t) in owner_of_tensor}
        if unit.role == "input" and members and members[0][0].role == "input":
            tied.add(0)
        if tied:
            index = min(tied)
            members[index].append(unit)
        else:
            index = len(members)
            members.append([unit])
        group_of[unit.name] = index
        for _, _, t in unit_tensors(unit.module):
            owner_of_tensor.setdefault(id(t), index)
    groups = []
    for group_units in members:
        seen: set[int] = set()
        weight = 0
        for unit in group_units:
            for owner, _, t in unit_tensors(unit.module):
                if id(t) not in seen:
                    seen.add(id(t))
                    weight += tensor_bytes(owner, t, dtype)
        kv = sum(kv_cache_bytes(model, u, batch=batch, max_length=max_length, dtype=dtype) for u in group_units)
        groups.append(Group(tuple(group_units), weight, kv))
    return groups
