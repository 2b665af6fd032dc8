"""The parallel styles behind the four declared names, on ``torch.distributed.tensor.parallel``.

* ``colwise`` / ``rowwise``: torch's :class:`ColwiseParallel` / :class:`RowwiseParallel` with local tensors
  in and out, so the component between them (attention's heads, the MLP's activation) computes on plain
  tensors of its own columns and a row-parallel projection all-reduces its partial sums.
* ``vocab``: :class:`VocabParallel` (below): the module's own ``weight`` is split by rows (vocabulary) and
  every other parameter it holds is replicated; inputs enter as replicated DTensors, so DTensor's embedding
  rule masks ids outside a rank's rows and all-reduces, and a head's logits (sharded by vocabulary) are
  all-gathered -- only for the positions the head returns. Outputs leave as plain tensors.
* ``replicate``: nothing to split; :func:`broadcast_replicated` makes every rank hold rank 0's values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from optkit.interfaces import ShardStyle


class SharedParameters:
    """Parameters already distributed, by the original object: a tied weight stays one tensor.

    The tied LM head holds the token embedding's very ``Parameter``; when the embedding's table becomes a
    DTensor, the head must receive that same DTensor, not a second copy of the vocabulary.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # keeps the original alive: ids stay unique

    def get(self, original: nn.Parameter) -> nn.Parameter | None:
        found = self._by_id.get(id(original))
        return found[1] if found is not None and found[0] is original else None

    def put(self, original: nn.Parameter, distributed: nn.Parameter) -> None:
        self._by_id[id(original)] = (original, distributed)


def _to_replicated_dtensor(value: Any, mesh: DeviceMesh) -> Any:
    """Plain tensors -- also the fields of a dataclass argument such as a head's HeadInputs (labels) -- as
    DTensors every rank holds whole, so they meet the split weight inside DTensor's rules."""
    if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        return DTensor.from_local(value, mesh, [Replicate()], run_check=False)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _to_replicated_dtensor(getattr(value, f.name), mesh)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def _to_local(value: Any) -> Any:
    """DTensor outputs (also inside a head's dict) gathered to every rank and handed out as plain tensors."""
    if isinstance(value, DTensor):
        return value.redistribute(placements=[Replicate()]).to_local()
    if isinstance(value, dict):
        return {key: _to_local(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_local(item) for item in value)
    return value


class VocabParallel(ParallelStyle):
    """Split a lookup table or an LM head by vocabulary rows (see the module docstring)."""

    def __init__(self, shared: SharedParameters) -> None:
        super().__init__()
        self.shared = shared

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:
            return  # sub-modules: distribute_module replicates their parameters
        original = module._parameters["weight"]
        sharded = self.shared.get(original)
        if sharded is None:
            sharded = nn.Parameter(distribute_tensor(original.detach(), mesh, [Shard(0)],
                                                     src_data_rank=self.src_data_rank),
                                   requires_grad=original.requires_grad)
            self.shared.put(original, sharded)
        module.register_parameter("weight", sharded)

    @staticmethod
    def _inputs(module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        return tuple(_to_replicated_dtensor(value, mesh) for value in inputs)

    @staticmethod
    def _outputs(module: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
        return _to_local(outputs)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._inputs, self._outputs)


def parallel_style(style: ShardStyle, shared: SharedParameters) -> ParallelStyle | None:
    """The torch style for a declared name (None for ``replicate``: nothing is split)."""
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    if style == "vocab":
        return VocabParallel(shared)
    return None


def broadcast_replicated(module: nn.Module, mesh: DeviceMesh) -> None:
    """Rank 0's values of a kept-whole module on every rank (split weights come from rank 0 as well)."""
    group, source = mesh.get_group(), dist.get_global_rank(mesh.get_group(), 0)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor.data, src=source, group=group)
