"""Split a loaded model over the ranks of a process group (Megatron-style tensor parallelism).

Each rank runs the whole forward pass on its own slice of every split weight: q/k/v by whole heads and
fc1 (gate/up) by columns with no communication, out_proj and fc2 (down) by rows with one all-reduce each,
the vocabulary split in the token embedding and the LM head. Every rank gets the same full outputs, so
``generate`` runs unchanged on every rank and all ranks produce the same tokens.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from optkit.errors import InputError, brief_repr
from optkit.inference.transform import is_prepared, restore
from optkit.interfaces import TensorParallel
from optkit.model import Model
from optkit.parallel.plan import TensorParallelPlan, check_tp_size, tensor_parallel_plan
from optkit.parallel.styles import SharedParameters, broadcast_replicated, parallel_style


def torchrun_hint(tp_size: int | None) -> str:
    n = tp_size or 2
    return (f"torchrun --standalone --nproc-per-node {n} your_script.py (call "
            f"torch.distributed.init_process_group() first: backend 'gloo' on CPU, 'nccl' on CUDA)")


def _mesh_for(device_type: str, tp_size: int | None, mesh: DeviceMesh | None) -> DeviceMesh:
    """The 1-D tensor-parallel mesh: the one given, or every rank of the default process group."""
    if mesh is not None:
        if mesh.ndim != 1:
            raise InputError(f"mesh has {mesh.ndim} dimensions; pass its tensor-parallel dimension, "
                             "e.g. mesh['tp'] of init_device_mesh(..., mesh_dim_names=('dp', 'tp'))")
        if tp_size is not None and mesh.size() != tp_size:
            raise InputError(f"tp_size {tp_size} does not match the mesh of {mesh.size()} ranks; "
                             "pass one of the two, or both equal")
        if mesh.device_type != device_type:
            raise InputError(f"the mesh is on '{mesh.device_type}' but the model is on '{device_type}'; "
                             f"move the model to this rank's device first (model.to(...))")
        return mesh
    world = dist.get_world_size()
    if tp_size is not None and tp_size != world:
        raise InputError(f"tp_size {tp_size} but the process group has {world} ranks: launch "
                         f"{torchrun_hint(tp_size)}, or pass mesh= with a {tp_size}-rank dimension")
    return init_device_mesh(device_type, (world,))


def _check_model(model: Model) -> None:
    if not isinstance(model, Model):
        raise InputError(f"parallelize takes an optkit.Model, got {type(model).__name__}")
    if model.placement is not None:
        raise InputError("this model was spread over devices with device_map (optkit.placement.dispatch); "
                         "tensor parallelism needs the whole model on this rank's device: load it without device_map")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise InputError("this model is already split (it holds DTensor parameters); parallelize it once")


def parallelize(model: Model, tp_size: int | None = None, mesh: DeviceMesh | None = None) -> Model:
    """Split ``model`` in place over a tensor-parallel group and return it.

    Call inside an initialised process group (``torchrun``), after the model is on this rank's device.
    ``tp_size``: ranks to split over (default: the mesh's size, or the whole group); ``mesh``: a 1-D
    DeviceMesh to split over (default: every rank of the default group). The plan comes from the
    components (:class:`optkit.interfaces.TensorParallel`); rank 0's weights are the ones kept.
    A prepared model (``optkit.inference.prepare``, as ``from_pretrained`` returns it) is restored to the
    plain blocks first: stacked q/k/v cannot be split as three projections.
    """
    mesh, plan = split_target(model, tp_size, mesh, model.device.type)
    if is_prepared(model):
        restore(model)
    apply_plan(model, plan, mesh)
    return model


def split_target(model: Model, tp_size: int | None, mesh: DeviceMesh | None,
                 device_type: str) -> tuple[DeviceMesh, TensorParallelPlan]:
    """The mesh and the checked plan to split ``model`` over (its weights may still be on "meta"); every
    error -- a model that cannot be split, no process group, a size that is not the group's -- comes
    before anything is read or changed."""
    _check_model(model)
    if tp_size is not None:
        check_tp_size(tp_size)
    if not (dist.is_available() and dist.is_initialized()):
        if tp_size is not None:
            tensor_parallel_plan(model, tp_size)  # a model that cannot be split says so before the launch hint
        raise InputError(f"tensor parallelism (tp_size={brief_repr(tp_size)}) needs a process group: launch "
                         f"with {torchrun_hint(tp_size)}")
    mesh = _mesh_for(device_type, tp_size, mesh)
    return mesh, tensor_parallel_plan(model, mesh.size())


def apply_plan(model: Model, plan: TensorParallelPlan, mesh: DeviceMesh) -> None:
    """Distribute every planned module, then let each component adopt its local sizes."""
    shared = SharedParameters()
    for path, style in plan.styles.items():
        module = model.get_submodule(path)
        torch_style = parallel_style(style, shared)
        if torch_style is None:
            broadcast_replicated(module, mesh)
        else:
            parallelize_module(module, mesh, torch_style)
    for path in plan.components:
        component = model.get_submodule(path)
        assert isinstance(component, TensorParallel)
        component.shard_local(plan.tp_size)


def local_parameter_bytes(model: Model) -> int:
    """Bytes of parameter storage this rank holds (each storage once: tied and stacked weights count once).

    A DTensor's ``numel()`` is the global size; its local shard is what this rank keeps in memory.
    """
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
