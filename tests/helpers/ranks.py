"""Spawn a distributed test's ranks and collect their results, never hanging: the gloo test modules share it.

Each rank runs ``rank_main(rank, phase, port, work)`` (``torch.multiprocessing`` passes the rank first) and
writes ``{phase}.rank{r}.json`` -- or ``{phase}.rank{r}.err`` with its traceback -- into ``work``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch.multiprocessing as mp

from optkit.testing.tensor_parallel import free_port


def spawn_ranks(rank_main: Callable[..., None], phase: str, world: int, work: Path, *, deadline_s: float,
                label: str) -> list[dict[str, Any]]:
    """Start ``world`` ranks of ``phase``, wait at most ``deadline_s``, end any still running, and return each
    rank's result; a failed rank fails the test with every rank's traceback."""
    context = mp.start_processes(rank_main, args=(phase, free_port(), str(work)), nprocs=world, join=False,
                                 start_method="spawn")
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
    return [json.loads((work / f"{phase}.rank{rank}.json").read_text()) for rank in range(world)]
