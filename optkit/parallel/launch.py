"""Command-line tools under ``torchrun``: join the process group, share rank 0's inputs, print on rank 0 only.

``optkit run`` started by ``torchrun --nproc-per-node N -m optkit.cli run --model X`` (or with
``--no-python optkit run ...``) finds torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``), joins the group -- gloo on the CPU, NCCL with this rank's GPU on CUDA -- and loads the
model split over ``--tp-size`` ranks (default: all of them). Every rank computes; rank 0 reads the prompts
and draws the sampling seed, and shares both, so every rank generates the same tokens; only rank 0 prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from optkit.errors import InputError, OptkitError

T = TypeVar("T")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher using its environment) started this process."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def torchrun_command(tp_size: int, command: str = "run --model MODEL ...") -> str:
    return f"torchrun --standalone --nproc-per-node {tp_size} -m optkit.cli {command}"


@dataclass
class Launch:
    """This process's place in a tensor-parallel command: its rank, the split size, its device."""

    rank: int
    tp_size: int
    device: torch.device
    owns_group: bool  # this command started the group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shared(self, compute: Callable[[], T]) -> T:
        """Rank 0's ``compute()`` on every rank; an optkit error there is raised on every rank alike."""
        box: list[Any] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("value", compute())
            except OptkitError as exc:
                box[0] = ("error", exc)
            except Exception as exc:  # noqa: BLE001 - the other ranks must not wait for a value forever
                failure, box[0] = exc, ("error", RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if failure is not None:
            raise failure
        if kind == "error":
            raise value
        return value

    def shared_seed(self, seed: int | None) -> int:
        """The given seed, or one rank 0 draws: every rank samples from the same random stream."""
        return self.shared(lambda: random.SystemRandom().randrange(2**63) if seed is None else seed)

    @contextlib.contextmanager
    def printing(self) -> Iterator[None]:
        """stdout as it is on rank 0; swallowed on the other ranks (they compute the same text)."""
        if self.is_main:
            yield
            return
        with contextlib.redirect_stdout(io.StringIO()):
            yield

    def close(self, *, wait: bool = False) -> None:
        """Leave the group this command joined; ``wait`` (every rank succeeded) first waits for all ranks."""
        if self.owns_group:
            leave_process_group(wait=wait)


def leave_process_group(*, wait: bool) -> None:
    """Destroy every group (a mesh's sub-groups too) while the interpreter is whole, after a barrier when
    ``wait`` (every rank got here). Left to interpreter exit, or done while another rank is still finishing,
    gloo's teardown was seen to abort a rank ("terminate called without an active exception", exit -6)
    after its work was done. A failed rank does not wait: the others may never reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _rank_device(device: str | None) -> torch.device:
    """CPU unless CUDA is asked for; ``cuda`` means this rank's GPU (``LOCAL_RANK``)."""
    wanted = torch.device(device or "cpu")
    if wanted.type == "cuda" and wanted.index is None:
        wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return wanted


def launch(tp_size: int | None, device: str | None) -> Launch | None:
    """Join torchrun's process group for a tensor-parallel command (None: not under torchrun, no --tp-size).

    ``--tp-size`` outside torchrun is an error giving the command to use; under torchrun the size
    defaults to the world size.
    """
    if tp_size is not None and (isinstance(tp_size, bool) or tp_size < 1):
        raise InputError(f"--tp-size must be a positive number of ranks, got {tp_size}")
    started = dist.is_available() and dist.is_initialized()
    if not started and not under_torchrun():
        if tp_size is None:
            return None
        raise InputError(f"--tp-size {tp_size} splits the model over the processes torchrun starts: launch "
                         f"{torchrun_command(tp_size, f'run --tp-size {tp_size} ...')} (or torchrun "
                         f"--nproc-per-node {tp_size} --no-python optkit run ...)")
    rank_device = _rank_device(device)
    if not started:
        if rank_device.type == "cuda":
            torch.cuda.set_device(rank_device)
        dist.init_process_group("nccl" if rank_device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    return Launch(rank=dist.get_rank(), tp_size=tp_size or world, device=rank_device, owns_group=not started)
