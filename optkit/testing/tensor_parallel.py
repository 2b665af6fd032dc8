"""The tensor-parallel check of the conformance kit: a plugin's model split over 2 gloo processes on the CPU.

    from optkit.testing import check_tensor_parallel
    import my_plugin
    check_tensor_parallel({"extends": "opt-tiny", "decoder": {"attention": {"name": "mine"}}}, plugins=[my_plugin])

The model is built with the same seed in this process (TP=1) and in ``tp_size`` spawned processes, which
split it with :func:`optkit.parallel.parallelize`; every rank's logits (fp32, a left-padded batch) must equal
this process's within a relative ``tolerance``, and greedy generation must give the same tokens. A model
that cannot be split says so here, before any process starts (the components' plans are checked first).
Each process has a deadline and tears its group down, so a failing plugin never hangs the test run.
"""

from __future__ import annotations

import importlib.util
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence, Union

import torch

from optkit.errors import InputError

ModelSource = Union[str, dict, Any, Callable[[], Any]]  # a spec (name, mapping, ModelSpec) or a model factory
NEW_TOKENS = 4


class TensorParallelConformanceError(AssertionError):
    """The split model's outputs differ from one process's (or a rank failed); the message says how."""


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of two."""
    return torch.tensor([[5, 9, 17, 33, 2, 8], [11, 3, 4, 6, 7, 12]]), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])


def _plugins(paths: Sequence[tuple[str, str]]) -> Any:
    """A registry with optkit's components and the plugin modules re-imported from their files."""
    from optkit.testing.registries import fresh_registry

    modules = []
    for name, file in paths:
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise InputError(f"plugin module {name!r} cannot be imported from {file}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return fresh_registry(plugins=tuple(modules)) if modules else None


def _build(source: ModelSource, registry: Any, seed: int) -> Any:
    import optkit

    torch.manual_seed(seed)
    if callable(source) and not isinstance(source, (str, dict)):
        model = source()
    else:
        model = optkit.build(source, dtype=torch.float32, registry=registry)
    return model.float().eval()


def _outputs(model: Any) -> dict[str, torch.Tensor]:
    ids, mask = _prompt()
    ids = ids % model.spec.decoder.vocab_size
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    result = {"logits": next(getattr(out, k) for k in ("logits", "last_hidden_state", "start_logits")
                             if getattr(out, k, None) is not None)}
    if model.spec.head.name == "causal_lm":
        result["greedy"] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    return result


def _rank_main(rank: int, world: int, port: int, source: ModelSource, plugins: Sequence[tuple[str, str]],
               seed: int, out_dir: str) -> None:
    import torch.distributed as dist

    from optkit.parallel import parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model = parallelize(_build(source, _plugins(plugins), seed))
        torch.save(_outputs(model), Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now: the rendezvous of a test's gloo group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, source: ModelSource, plugins: Sequence[tuple[str, str]], seed: int, out_dir: Path,
               timeout: float) -> list[dict[str, torch.Tensor]]:
    import torch.multiprocessing as mp

    context = mp.start_processes(_rank_main, args=(world, free_port(), source, plugins, seed, str(out_dir)),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                raise TensorParallelConformanceError(f"the {world} ranks did not finish within {timeout:g} s")
    except mp.ProcessRaisedException:
        failed = sorted(out_dir.glob("rank*.err"))
        detail = failed[0].read_text()[-1500:] if failed else "(no traceback written)"
        raise TensorParallelConformanceError(f"a rank failed while running the split model:\n{detail}") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(10)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


def check_tensor_parallel(model: ModelSource, tp_size: int = 2, *, plugins: Sequence[ModuleType] = (),
                          tolerance: float = 1e-5, seed: int = 0, timeout: float = 150) -> None:
    """Split ``model`` over ``tp_size`` gloo processes and check it computes what one process computes.

    ``model``: a spec (preset name, mapping, ModelSpec) or a picklable zero-argument function returning a
    model (a module-level function: the ranks are spawned). ``plugins``: plugin modules the spec needs (each
    rank re-imports them from their files). Raises :class:`TensorParallelConformanceError` naming what differs,
    and the planner's ``InputError`` (naming the component and what to declare) when it cannot be split.
    """
    from optkit.parallel import tensor_parallel_plan

    paths = [(module.__name__, str(module.__file__)) for module in plugins]
    reference = _build(model, _plugins(paths), seed)
    tensor_parallel_plan(reference, tp_size)  # a model without a plan fails here, with what to declare
    want = _outputs(reference)
    with tempfile.TemporaryDirectory(prefix="optkit-tp-check-") as out_dir:
        ranks = _run_ranks(tp_size, model, paths, seed, Path(out_dir), timeout)
    problems = []
    scale = want["logits"].abs().max().clamp_min(1e-30)
    for rank, got in enumerate(ranks):
        error = float((got["logits"] - want["logits"]).abs().max() / scale)
        if not error <= tolerance:
            problems.append(f"rank {rank}: outputs differ from one process by {error:.2e} (relative; allowed "
                            f"{tolerance:.0e})")
        if "greedy" in want and not torch.equal(got["greedy"], want["greedy"]):
            problems.append(f"rank {rank}: greedy tokens {got['greedy'].tolist()} != one process's "
                            f"{want['greedy'].tolist()}")
    if problems:
        raise TensorParallelConformanceError(f"split over {tp_size} ranks, the model does not compute what one "
                                             "process computes:\n  - " + "\n  - ".join(problems))


__all__ = ["TensorParallelConformanceError", "check_tensor_parallel"]
