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


def shard_for_training(model: nn.Module, mesh: Any = None, mixed_precision: MixedPrecision = "fp32",
                       reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2 for training: ``fully_shard`` on every decoder block, then the root.

    The blocks are found by their interface (``optkit.interfaces.DecoderBlock``), so a plugin's block is
    a unit too; the root unit holds the rest (embeddings, the head -- a tied head shares the embedding
    unit --, final norm). Parameters become DTensors sharded on dim 0 over ``mesh`` (default: every rank
    of the default group). Build the optimizer after this call. Returns ``model``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from optkit.interfaces.components import DecoderBlock

    policy = mixed_precision_policy(mixed_precision)
    require_process_group("shard_for_training")
    if is_fully_sharded(model) or any(isinstance(p, DTensor) for p in model.parameters()):
        raise InputError(f"{type(model).__name__} is already sharded (FSDP or tensor parallel); shard a plain model "
                         "once (combining FSDP with tensor parallelism on a 2-D mesh is not supported yet)")
    if mesh is None:
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    blocks = [m for m in model.modules() if isinstance(m, DecoderBlock)]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def clip_grad_norm_(parameters: list[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded gradients: the norm is that of the whole gradient
    (summed over the ranks' shards), returned as a plain tensor equal on every rank."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def stream(self, stream: Any) -> Any:
        return stream if self.is_main else _Silent()

    def shard(self, model: nn.Module) -> nn.Module:
        from optkit.adapters.training import has_adapters

        if has_adapters(model):
            raise InputError("LoRA adapters cannot be trained sharded yet: FSDP2 checkpoints hold whole models, not "
                             "PEFT adapters; train the adapter in one process (without torchrun, or fsdp=False)")
        return shard_for_training(model.to(self.device), mixed_precision=self.mixed_precision)

    def local_batch(self, batch: Tensor, step_seed: int) -> Tensor:
        """This rank's contiguous rows of the global batch; reseed so each rank has its own dropout stream
        (rank 0 keeps the single-process seed, so a 1-rank run equals plain training exactly)."""
        if batch.shape[0] % self.world_size:
            raise InputError(f"batch_size {batch.shape[0]} does not divide over {self.world_size} ranks; use a "
                             f"multiple of {self.world_size} (every rank takes an equal slice of the global batch)")
        if self.rank:
            torch.manual_seed((step_seed + 7919 * self.rank) & 0x7FFF_FFFF_FFFF_FFFF)
        return batch.chunk(self.world_size)[self.rank].to(self.device)

    def mean(self, loss: Tensor) -> float:
        """The global batch's loss: the mean of the ranks' losses (equal token counts)."""
        total = loss.detach().float().clone()
        dist.all_reduce(total)
        return total.item() / self.world_size

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
                     resume_from: Path | None = None) -> ShardedTraining | None:
    """The sharded run ``train(fsdp=...)`` asks for, or None for plain training.

    ``None`` (the default): shard when a process group with more than one rank exists (torchrun), or
    when ``resume_from`` holds a sharded checkpoint and a group exists (a 1-process torchrun resumes it);
    ``True``: shard even on one rank, and fail without a process group; ``False``: never. A plain run
    that would silently start over beside ``resume_from``'s sharded checkpoint is refused.
    """
    mixed_precision_policy(mixed_precision)  # a bad name fails before anything runs
    grouped = dist.is_available() and dist.is_initialized()
    has_sharded = resume_from is not None and (Path(resume_from) / SHARDED_DIR / LATEST).is_file()
    if fsdp is False or (fsdp is None and not grouped):
        if has_sharded:
            raise InputError(f"{str(resume_from)[:200]} holds a sharded (DCP) checkpoint that plain training cannot "
                             f"resume; resume it under torchrun (any --nproc-per-node, e.g. `{TORCHRUN_HINT}`), "
                             "turn it into a plain checkpoint with `optkit export`, or pass resume=False "
                             "(--no-resume) to start over")
        return None
    if fsdp is None and dist.get_world_size() == 1 and not has_sharded:
        return None
    require_process_group("train(fsdp=True)")
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return ShardedTraining(dist.get_rank(), dist.get_world_size(), mixed_precision, device)


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
