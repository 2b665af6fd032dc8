"""Slice-wise loading: each rank reads only its own slice of every split tensor, from meta to local shard.

``optkit.from_pretrained(path, tp_size=N)`` builds the model on "meta", asks the components for the plan
(:func:`optkit.parallel.tensor_parallel_plan`), and then, one decoder layer at a time, reads from the
safetensors files (``safe_open(...).get_slice``) only this rank's rows or columns of every split tensor,
and the replicated tensors whole. Each slice lands in its final device and dtype and becomes the local
shard of a DTensor; the split styles then find their weights already distributed and keep them. A rank
so never holds more than its share, the replicated tensors and the slices of one layer being read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from optkit.checkpoint_files import StoredTensor, _unreadable
from optkit.model import Model
from optkit.parallel.plan import split_dims
from optkit.parallel.tensor_parallel import apply_plan, split_target

Source = Union[Tensor, StoredTensor]
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def rank_slice(shape: torch.Size, dim: int, rank: int, parts: int) -> tuple[slice, ...]:
    """The index of ``rank``'s equal part of a tensor of ``shape`` along ``dim`` (the plan checked it divides)."""
    size = shape[dim] // parts
    return tuple(slice(rank * size, (rank + 1) * size) if d == dim else slice(None) for d in range(len(shape)))


def _land(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A tensor of its own (never a view of a file mapping) on ``device``, floating point ones in ``dtype``."""
    wanted = dtype if tensor.is_floating_point() else tensor.dtype
    return torch.empty(tensor.shape, dtype=wanted, device=device).copy_(tensor)


def read_local(group: Mapping[str, Source], dims: Mapping[str, int | None], *, rank: int, parts: int,
               device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """This rank's part of every tensor of ``group``: a slice of the split ones, the others whole.

    Stored tensors are read with ``safe_open(...).get_slice(key)[index]``: a view of the file mapping, of
    which only the slice's bytes are copied into the rank's own tensor (and only their pages read); each
    file is opened once per group and closed before the next, so no mapping outlives a layer.
    """
    from safetensors import safe_open

    def index(key: str, shape: torch.Size) -> tuple[slice, ...]:
        dim = dims.get(key)
        return rank_slice(shape, dim, rank, parts) if dim is not None else tuple(slice(None) for _ in shape)

    local: dict[str, Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key, source in group.items():
        if isinstance(source, StoredTensor):
            by_file.setdefault(source.file, []).append(key)
        else:  # already in memory (a .bin checkpoint): slice it, then copy only the slice
            local[key] = _land(source[index(key, source.shape)], device, dtype)
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in keys:
                    stored = group[key]
                    assert isinstance(stored, StoredTensor)
                    part = handle.get_slice(stored.key)
                    piece = part[index(key, stored.shape)] if len(stored.shape) else handle.get_tensor(stored.key)
                    local[key] = _land(piece, device, dtype)  # the slice's bytes only, off the mapping
                    del part, piece
        except Exception as exc:  # noqa: BLE001 - the file changed or broke since its header was read
            raise _unreadable(file, exc) from None
    return local


def _by_layer(state: Mapping[str, Source]) -> list[dict[str, Source]]:
    groups: dict[str, dict[str, Source]] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        groups.setdefault(match[1] if match else "", {})[key] = tensor
    return list(groups.values())


def _assign(model: Model, key: str, value: Tensor) -> None:
    """Put ``value`` where ``key`` names a parameter or buffer of the (meta) model."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=old is None or old.requires_grad))
    else:
        module._buffers[leaf] = value


def load_split(model: Model, state: Mapping[str, Source], tp_size: int, *, device: torch.device,
               mesh: DeviceMesh | None = None) -> Model:
    """Fill ``model`` (built on "meta", checked against ``state``) with this rank's slices and split it.

    ``state``: optkit key -> checkpoint tensor, as ``optkit.loading`` checked it. Errors (no process group,
    a size the model cannot be split by) come before anything is read.
    """
    mesh, plan = split_target(model, tp_size, mesh, device.type)
    dims = split_dims(model, plan)
    rank, parts = mesh.get_local_rank(), mesh.size()
    for group in _by_layer(state):
        for key, tensor in read_local(group, dims, rank=rank, parts=parts, device=device,
                                      dtype=model.dtype).items():
            dim = dims.get(key)
            _assign(model, key, tensor if dim is None else DTensor.from_local(tensor, mesh, [Shard(dim)],
                                                                             run_check=False))
    model.tie_weights()
    apply_plan(model, plan, mesh)  # the split weights are DTensors already: the styles keep them as they are
    return model
