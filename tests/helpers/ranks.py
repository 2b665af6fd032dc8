"""Spawn a distributed test's ranks and collect their results, never hanging: the gloo test modules share it.

A test module declares ``PHASES = {name: (world size, body)}``; each spawned rank joins a gloo group, runs
``body(work)`` and writes ``{phase}.rank{r}.json`` (``.pt`` with ``tensors=True``, for results that hold
tensors) -- or ``{phase}.rank{r}.err`` with its traceback -- into ``work``.
"""

from __future__ import annotations

import importlib
import json
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optkit.testing.tensor_parallel import free_port


def result_path(work: Path, phase: str, rank: int, tensors: bool) -> Path:
    return work / f"{phase}.rank{rank}.{'pt' if tensors else 'json'}"


def run_rank(rank: int, module: str, phase: str, port: int, work: str, tensors: bool = False) -> None:
    """One rank (in a spawned process): ``module.PHASES[phase]``'s body in a gloo group, its result to a file."""
    torch.set_num_threads(1)
    world, body = importlib.import_module(module).PHASES[phase]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        result = body(Path(work))
        path = result_path(Path(work), phase, rank, tensors)
        if tensors:
            torch.save(result, path)
        else:
            path.write_text(json.dumps(result))
    except BaseException:
        (Path(work) / f"{phase}.rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn_ranks(module: str, phase: str, work: Path, *, deadline_s: float, label: str,
                tensors: bool = False) -> list[dict[str, Any]]:
    """Start the ranks of ``module.PHASES[phase]``, wait at most ``deadline_s``, end any still running, and
    return each rank's result; a failed rank fails the test with every rank's traceback.

    ``tensors=True`` passes the results through torch.save / torch.load instead of JSON, for bodies that
    return tensors to compare."""
    world = importlib.import_module(module).PHASES[phase][0]
    context = mp.start_processes(run_rank, args=(module, phase, free_port(), str(work), tensors), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                pytest.fail(f"{label} phase {phase} did not finish within {deadline_s} s")
    except mp.ProcessRaisedException:
        errors = "\n".join(p.read_text() for p in work.glob(f"{phase}.rank*.err"))
        pytest.fail(f"{label} phase {phase} failed:\n{errors}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(10)
    paths = [result_path(work, phase, rank, tensors) for rank in range(world)]
    if tensors:
        return [torch.load(path, weights_only=True) for path in paths]
    return [json.loads(path.read_text()) for path in paths]
