"""Sharded data-parallel training on torch.distributed: FSDP2 (``fully_shard``) and DCP checkpoints.

Why it exists: a model whose weights, gradients and AdamW moments do not fit one device trains on
several by sharding all three over the ranks (FSDP2). The engine is torch's own --
``torch.distributed.fsdp.fully_shard`` for the sharding, ``torch.distributed.checkpoint`` (DCP) for
checkpoints that any world size can read -- and optkit only decides where to cut (one unit per decoder
block, then the root) and how a run stays equal to one process:

* every rank takes its contiguous slice of the same global batch, so the global batch, and hence the
  loss, are those of single-process training (FSDP2 averages the gradients over the ranks, and every
  rank's slice holds the same number of tokens, so the average of the rank means is the global mean);
* gradients are clipped by the norm of the whole (sharded) gradient, as ``clip_grad_norm_`` does in one
  process;
* only rank 0 prints and writes ordinary files; DCP files are written by every rank.

With ``tp_size`` > 1 the ranks form a 2-D mesh ("dp", "tp") = (world / tp_size, tp_size), as torchtitan
does: the model is first split over ``mesh["tp"]`` by the plan its components declare (the code path of
``from_pretrained(tp_size=N)``), then ``fully_shard`` shards it over ``mesh["dp"]``. The batch is split
over the dp ranks only -- the ranks of a tp group compute on the same rows -- and the gradient norm counts
every element once whichever mesh it lives on. DCP checkpoints hold global tensors, so a 2-D checkpoint
resumes on a 1-D mesh (or any other) and exports to a plain one alike.

Checkpoint layout (``out_dir`` is the training directory)::

    out_dir/dcp/latest               name of the newest complete checkpoint (written last: the commit)
    out_dir/dcp/step-00000010/       DCP: .metadata + __<rank>_0.distcp (model + optimizer, sharded)
                         spec.json   the model spec (rebuilds the model for export)
                         trainer_state.pt  step, losses, evals, scheduler (plain numbers and tensors)

At the end of training rank 0 gathers the full weights and writes ``out_dir/config.json`` +
``model.safetensors`` with ``save_pretrained`` (transformers loads it); ``export_checkpoint`` (the
``optkit export`` command) does the same from a DCP directory in one process.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optkit.errors import CheckpointError, InputError

MixedPrecision = Literal["fp32", "bf16"]
SHARDED_DIR = "dcp"
LATEST = "latest"
SPEC_FILE = "spec.json"
STATE_FILE = "trainer_state.pt"
TORCHRUN_HINT = "torchrun --standalone --nproc-per-node 2 your_script.py ..."


# ---------------------------------------------------------------------------------- sharding
def mixed_precision_policy(mixed_precision: MixedPrecision) -> Any:
    """FSDP2's policy: ``fp32`` computes and reduces in the parameters' dtype (exact; the default),
    ``bf16`` gathers bf16 parameters for compute and reduces gradients in fp32 (the master weights and
    AdamW moments stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "fp32":
        return MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise InputError(f"mixed_precision={str(mixed_precision)[:50]!r} is not a precision policy; "
                     "use 'fp32' (exact, the default) or 'bf16' (bf16 parameters, fp32 gradient reduction)")


def require_process_group(what: str) -> None:
    """Raise the error that says how to start one when no default process group exists."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(f"{what} needs a torch.distributed process group, and none is initialized; launch with "
                         f"`{TORCHRUN_HINT}` and call torch.distributed.init_process_group() first")


def is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def valid_tp_sizes(world_size: int) -> list[int]:
    return [n for n in range(1, world_size + 1) if world_size % n == 0]


def check_tp_world(tp_size: object, world_size: int) -> None:
    """``tp_size`` must be a positive divisor of the world size (the dp dimension is world / tp)."""
    from optkit.parallel.plan import check_tp_size

    check_tp_size(tp_size)
    assert isinstance(tp_size, int)
    if world_size % tp_size:
        raise InputError(f"tp_size {tp_size} does not divide the world size {world_size}: the 2-D mesh is "
                         f"(world / tp_size) x tp_size ranks; valid tp_size for {world_size} ranks: "
                         f"{', '.join(map(str, valid_tp_sizes(world_size)))}")


def training_mesh(device_type: str, tp_size: int | None = None) -> Any:
    """Every rank of the default group as a mesh: 1-D ``("dp",)``, or 2-D ``("dp", "tp")`` of shape
    (world / tp_size, tp_size) when ``tp_size`` > 1 -- consecutive ranks form a tensor-parallel group (on one
    node, the GPUs that share the fastest links), and rank r is dp rank r // tp_size."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if tp_size is None or tp_size == 1:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    check_tp_world(tp_size, world)
    return init_device_mesh(device_type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))


def _split_mesh(mesh: Any) -> tuple[Any, Any]:
    """(the data-parallel mesh FSDP shards over, the tensor-parallel mesh or None) of a 1-D or 2-D mesh."""
    if mesh.ndim == 1:
        return mesh, None
    if mesh.ndim == 2 and tuple(mesh.mesh_dim_names or ()) == ("dp", "tp"):
        return mesh["dp"], mesh["tp"]
    raise InputError(f"a training mesh is 1-D (data parallel) or 2-D named ('dp', 'tp'), got {mesh.ndim}-D with "
                     f"names {mesh.mesh_dim_names}; build it with optkit.parallel.fsdp.training_mesh(device, tp_size) "
                     "or init_device_mesh(device, (world // tp, tp), mesh_dim_names=('dp', 'tp'))")


def shard_for_training(model: nn.Module, mesh: Any = None, mixed_precision: MixedPrecision = "fp32",
                       reshard_after_forward: bool = True, *, tp_size: int | None = None) -> nn.Module:
    """Shard ``model`` in place for training: ``fully_shard`` (FSDP2) on every decoder block, then the root;
    with tensor parallelism first on a 2-D mesh. Returns ``model``; build the optimizer after this call.

    The blocks are found by their interface (``optkit.interfaces.DecoderBlock``), so a plugin's block is
    a unit too; the root unit holds the rest (embeddings, the head -- a tied head shares the embedding
    unit --, final norm). ``mesh``: 1-D (default: every rank of the default group), or 2-D named
    ``("dp", "tp")``; ``tp_size`` > 1 builds that 2-D mesh (:func:`training_mesh`). On a 2-D mesh the model
    is first split over ``mesh["tp"]`` by the plan its components declare
    (:func:`optkit.parallel.parallelize`, the path ``from_pretrained(tp_size=N)`` takes), then FSDP2
    shards every parameter -- split or not -- on dim 0 over ``mesh["dp"]``.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from optkit.interfaces.components import DecoderBlock

    policy = mixed_precision_policy(mixed_precision)
    require_process_group("shard_for_training")
    if is_fully_sharded(model) or any(isinstance(p, DTensor) for p in model.parameters()):
        raise InputError(f"{type(model).__name__} is already sharded (FSDP or tensor parallel); shard a plain model "
                         "once (for TP x FSDP pass the plain model with tp_size=N or a ('dp', 'tp') mesh)")
    device_type = next(model.parameters()).device.type
    if mesh is None:
        mesh = training_mesh(device_type, tp_size)
    dp_mesh, tp_mesh = _split_mesh(mesh)
    if tp_size not in (None, 1 if tp_mesh is None else tp_mesh.size()):
        raise InputError(f"tp_size {tp_size} does not match the mesh's {1 if tp_mesh is None else tp_mesh.size()}-rank "
                         "'tp' dimension; pass one of the two, or both equal")
    if tp_mesh is not None:
        from optkit.parallel.tensor_parallel import parallelize

        parallelize(model, mesh=tp_mesh)  # type: ignore[arg-type]
    blocks = [m for m in model.modules() if isinstance(m, DecoderBlock)]
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def clip_grad_norm_(parameters: list[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded gradients: the norm is that of the whole gradient,
    returned as a plain tensor equal on every rank.

    On a 2-D mesh the gradients live on two meshes: split ones on ("dp", "tp"), the others (norms,
    kept-whole biases) on "dp" alone, where every tp rank holds the same values. Every rank adds the squares
    of its local shards, each divided by the number of ranks that hold that same shard, and one all-reduce
    over all ranks sums them: each element counts once, whatever mesh it lives on.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return torch.tensor(0.0)
    device = with_grad[0].grad.device
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for param in with_grad:
        local, holders = _local_shard(param.grad)
        squares += local.detach().float().pow(2).sum() / holders
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares)
    total = squares.sqrt()
    by_mesh: dict[Any, list[Tensor]] = {}
    for param in with_grad:  # one foreach call per mesh: DTensor refuses lists that mix meshes
        by_mesh.setdefault(getattr(param.grad, "device_mesh", None), []).append(param)
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _local_shard(tensor: Tensor) -> tuple[Tensor, int]:
    """(this rank's part of ``tensor``, how many ranks of the default group hold that same part)."""
    from torch.distributed.tensor import DTensor, Replicate

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not isinstance(tensor, DTensor):
        return tensor, world
    mesh = tensor.device_mesh
    replicated = 1
    for dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            replicated *= mesh.size(dim)
    return tensor.to_local(), world // mesh.size() * replicated


# ---------------------------------------------------------------------------------- the training run
class _Silent:
    """A text stream that drops everything: ranks other than 0 print nothing."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class ShardedTraining:
    """What ``optkit.training.train`` asks of a sharded run; one per rank."""

    rank: int
    world_size: int
    mixed_precision: MixedPrecision = "fp32"
    device: str = "cpu"  # where the sharded model and this rank's batches live: the rank's GPU under NCCL
    tp_size: int = 1  # > 1: tensor parallel over consecutive ranks, FSDP2 over the (world / tp_size) groups

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: groups of ``tp_size`` ranks that see the same rows of the batch."""
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size  # the row of this rank in the ("dp", "tp") mesh

    @functools.cached_property
    def mesh(self) -> Any:
        """The training mesh (1-D "dp" or 2-D ("dp", "tp")), built once on first use."""
        return training_mesh(torch.device(self.device).type, self.tp_size)

    def stream(self, stream: Any) -> Any:
        return stream if self.is_main else _Silent()

    def shard(self, model: nn.Module) -> nn.Module:
        from optkit.adapters.training import has_adapters

        if has_adapters(model):
            raise InputError("LoRA adapters cannot be trained sharded yet: FSDP2 checkpoints hold whole models, not "
                             "PEFT adapters; train the adapter in one process (without torchrun, or fsdp=False)")
        return shard_for_training(model.to(self.device), mesh=self.mesh, mixed_precision=self.mixed_precision)

    def local_batch(self, batch: Tensor, step_seed: int) -> Tensor:
        """This rank's contiguous rows of the global batch -- the same rows on every rank of one tensor-parallel
        group --; reseed so each data-parallel rank has its own dropout stream (dp rank 0 keeps the
        single-process seed, so a 1-rank run equals plain training exactly, and the ranks of a tensor-parallel
        group draw the same masks, as their replicated activations must stay equal)."""
        if batch.shape[0] % self.dp_size:
            over = (f"{self.world_size} ranks" if self.tp_size == 1 else
                    f"{self.dp_size} data-parallel groups ({self.world_size} ranks / tp_size {self.tp_size})")
            raise InputError(f"batch_size {batch.shape[0]} does not divide over {over}; use a multiple of "
                             f"{self.dp_size} (every data-parallel rank takes an equal slice of the global batch)")
        if self.dp_rank:
            torch.manual_seed((step_seed + 7919 * self.dp_rank) & 0x7FFF_FFFF_FFFF_FFFF)
        return batch.chunk(self.dp_size)[self.dp_rank].to(self.device)

    def mean(self, loss: Tensor) -> float:
        """The global batch's loss: the mean of the data-parallel ranks' losses (equal token counts); the
        ranks of a tensor-parallel group computed the same loss, so only the "dp" group is summed."""
        total = loss.detach().float().clone()
        dist.all_reduce(total, group=None if self.tp_size == 1 else self.mesh.get_group("dp"))
        return total.item() / self.dp_size

    clip_grad_norm_ = staticmethod(clip_grad_norm_)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
             out: Path) -> None:
        save_sharded_checkpoint(model, optimizer, scheduler, state, out)

    def initial_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, out: Path,
                      resume: bool, say: Any) -> dict[str, Any]:
        """A fresh trainer state, or the newest DCP checkpoint's (weights, optimizer, scheduler loaded)."""
        saved = load_sharded_checkpoint(model, optimizer, scheduler, out) if resume else None
        if saved is None:
            empty = torch.zeros(0, dtype=torch.float64)
            return {"step": 0, "losses": empty, "evals": empty.reshape(0, 2), "tokens_seen": 0}
        say(f"resuming from {latest_checkpoint(out)} at step {saved['step']} on {self.world_size} rank(s)")
        return saved

    def export(self, model: nn.Module, out: Path) -> None:
        """Gather the full weights and write a plain checkpoint into ``out`` (rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            _save_plain(model.spec, full, out, registry=getattr(model, "registry", None))
        dist.barrier()


def sharded_training(fsdp: bool | None, mixed_precision: MixedPrecision = "fp32",
                     resume_from: Path | None = None, tp_size: int | None = None) -> ShardedTraining | None:
    """The sharded run ``train(fsdp=..., tp_size=...)`` asks for, or None for plain training.

    ``None`` (the default): shard when a process group with more than one rank exists (torchrun), or
    when ``resume_from`` holds a sharded checkpoint and a group exists (a 1-process torchrun resumes it);
    ``True``: shard even on one rank, and fail without a process group; ``False``: never. A plain run
    that would silently start over beside ``resume_from``'s sharded checkpoint is refused.
    ``tp_size`` > 1: a TP x FSDP run on the 2-D mesh (world / tp_size, tp_size); it needs a process group
    whose size it divides (``None`` or 1: no tensor parallelism).
    """
    from optkit.parallel.plan import check_tp_size

    mixed_precision_policy(mixed_precision)  # a bad name fails before anything runs
    if tp_size is not None:
        check_tp_size(tp_size)
    grouped = dist.is_available() and dist.is_initialized()
    if tp_size is not None and tp_size > 1:
        _check_tensor_parallel_run(fsdp, tp_size, grouped)
    has_sharded = resume_from is not None and (Path(resume_from) / SHARDED_DIR / LATEST).is_file()
    if fsdp is False or (fsdp is None and not grouped):
        if has_sharded:
            raise InputError(f"{str(resume_from)[:200]} holds a sharded (DCP) checkpoint that plain training cannot "
                             f"resume; resume it under torchrun (any --nproc-per-node, e.g. `{TORCHRUN_HINT}`), "
                             "turn it into a plain checkpoint with `optkit export`, or pass resume=False "
                             "(--no-resume) to start over")
        return None
    if fsdp is None and dist.get_world_size() == 1 and not has_sharded and (tp_size or 1) == 1:
        return None
    require_process_group("train(fsdp=True)")
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return ShardedTraining(dist.get_rank(), dist.get_world_size(), mixed_precision, device, tp_size or 1)


def _check_tensor_parallel_run(fsdp: bool | None, tp_size: int, grouped: bool) -> None:
    """A TP x FSDP run needs FSDP, a process group, and a world size that ``tp_size`` divides."""
    if fsdp is False:
        raise InputError(f"tp_size={tp_size} trains on a TP x FSDP 2-D mesh, which fsdp=False turns off; drop "
                         "fsdp=False, or drop tp_size for plain training")
    if not grouped:
        raise InputError(f"tp_size={tp_size} splits the model over the ranks torchrun starts, and no process group "
                         f"is initialized; launch `torchrun --standalone --nproc-per-node {2 * tp_size} -m optkit.cli "
                         f"train --tp-size {tp_size} ...` (any multiple of {tp_size} processes; the data-parallel "
                         f"size is their number / {tp_size})")
    check_tp_world(tp_size, dist.get_world_size())


def join_torchrun_group() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` in the environment), once; True on the
    rank that prints (rank 0, or no torchrun). Used by ``optkit train``; NCCL when CUDA is there, else gloo."""
    import atexit

    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        return not dist.is_initialized() or dist.get_rank() == 0
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank() == 0


# ---------------------------------------------------------------------------------- DCP checkpoints
def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete DCP checkpoint under ``out/dcp``, or None."""
    pointer = Path(out) / SHARDED_DIR / LATEST
    if not pointer.is_file():
        return None
    directory = pointer.parent / pointer.read_text().strip()
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{pointer} names {directory.name}, which holds no complete DCP checkpoint; restore "
                              f"that directory or delete {pointer.parent} to start over")
    return directory


def save_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                            state: dict[str, Any], out: Path) -> Path:
    """Every rank writes its shards of the weights and the optimizer; rank 0 then writes the trainer state
    and the spec, and commits by pointing ``latest`` at the new directory (older ones are removed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(out) / SHARDED_DIR
    directory = root / f"step-{int(state['step']):08d}"
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory)
    if dist.get_rank() == 0:
        torch.save({**state, "scheduler": scheduler.state_dict()}, directory / STATE_FILE)
        (directory / SPEC_FILE).write_text(json.dumps(model.spec.model_dump(mode="json"), indent=2) + "\n")
        temp = root / f".{LATEST}.tmp"
        temp.write_text(directory.name + "\n")
        os.replace(temp, root / LATEST)
        for old in root.glob("step-*"):
            if old.is_dir() and old.name != directory.name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return directory


def load_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                            out: Path) -> dict[str, Any] | None:
    """Load the newest DCP checkpoint into a sharded model and its optimizer (any world size: DCP reshards);
    returns the trainer state (scheduler loaded), or None when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = latest_checkpoint(out)
    if directory is None:
        return None
    model_state, optim_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optim_state}
    dcp.load(loaded, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    _load_scheduler_position(scheduler, state.pop("scheduler"))
    return state


def _load_scheduler_position(scheduler: Any, saved: dict[str, Any]) -> None:
    """The saved position (step, last lr) under this run's schedule: LambdaLR would also overwrite the
    schedule object's settings with the saved ones, so a changed ``steps`` would not take effect."""
    settings = [dict(vars(fn)) if hasattr(fn, "__dict__") else None for fn in scheduler.lr_lambdas]
    scheduler.load_state_dict(saved)
    for fn, kept in zip(scheduler.lr_lambdas, settings):
        if kept is not None:
            vars(fn).update(kept)


# ---------------------------------------------------------------------------------- export
def _save_plain(spec: Any, state: dict[str, Tensor], out: Path, registry: Any = None) -> Path:
    """Build the plain model of ``spec``, load the full ``state`` and ``save_pretrained`` it into ``out``."""
    from optkit.builder import build

    dtype = next(iter(state.values())).dtype
    model = build(spec, dtype=dtype, **({"registry": registry} if registry is not None else {}))
    model.load_state_dict(state)
    model.save_pretrained(out)
    return Path(out)


def _checkpoint_dir(path: Path) -> Path:
    """A DCP checkpoint directory itself, or a training ``out_dir`` / its ``dcp`` folder (-> the latest)."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    for root in (path, path.parent if path.name == SHARDED_DIR else None):
        if root is not None and (found := latest_checkpoint(root)) is not None:
            return found
    raise CheckpointError(f"{str(path)[:200]} holds no DCP checkpoint (no .metadata, no {SHARDED_DIR}/{LATEST}); "
                          f"pass a training out_dir, its {SHARDED_DIR}/ folder or one {SHARDED_DIR}/step-* directory")


def export_checkpoint(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Turn a DCP training checkpoint into a plain checkpoint (config.json + safetensors) in one process.

    ``checkpoint``: a training ``out_dir``, its ``dcp/`` folder or one ``dcp/step-*`` directory. The model
    is rebuilt from the stored spec and only its weights are read (the optimizer state is skipped).
    """
    import torch.distributed.checkpoint as dcp

    from optkit.spec import load_spec

    directory = _checkpoint_dir(Path(checkpoint))
    spec_file = directory / SPEC_FILE
    if not spec_file.is_file():
        raise CheckpointError(f"{directory} has no {SPEC_FILE}, so the model cannot be rebuilt; it was not written by "
                              "optkit.training (export checkpoints that optkit's sharded training saved)")
    from optkit.builder import build

    stored = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    dtype = next(item.properties.dtype for key, item in stored.items()
                 if key.startswith("model.") and hasattr(item, "properties"))
    model = build(load_spec(json.loads(spec_file.read_text())), dtype=dtype)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # one process on purpose: DCP's "assuming a single process" is noise here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=directory, no_dist=True)
    return _save_plain(model.spec, state["model"], Path(out_dir))
