"""``compile="auto"``: which decode step a ``generate`` call runs, decided before it starts.

The compiled step (``optkit.inference.compiled``) decodes a small model on a CPU at about twice the
speed of the eager step, but its first compilation in a process costs tens of seconds; a warm entry of
the compile cache (``optkit.inference.compile_cache``) brings that down to dynamo's trace (seconds).
:func:`choose_decode_step` weighs the two with stated figures: it compiles when a warm entry exists,
or when the decode time it expects to save exceeds the cold compile cost. It never compiles a model
under :data:`TINY_MODEL_BYTES` (the bundled model: its steps cost Python overhead, not bytes). On CUDA
the captured graph already removes the per-kernel launch cost that bounds decoding, so compilation is
chosen there only from a warm cache.

:func:`choose_for` gathers the inputs from a model; :func:`choose_decode_step` is the pure decision
the tests pin down.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

Step = Literal["eager", "graph", "compiled"]

TINY_MODEL_BYTES = 64 * 2**20  # below this a step is Python overhead: never compiled by "auto"
COLD_COMPILE_SECONDS = 30.0  # first compile of the step on 2 CPU cores (opt-125m: 10-30 s measured)
CPU_EAGER_BYTES_PER_SECOND = 11e9  # what MKL's GEMV reads per second in the eager step (performance.md)
COMPILED_SPEEDUP = {1: 2.3}  # compiled / eager decode speed by batch size on CPU (performance.md)
BATCHED_SPEEDUP = 1.15  # batch > 1: the products are GEMMs that the compiled step leaves to MKL


@dataclass(frozen=True)
class DecodeChoice:
    """The step to run and why (``optkit bench`` and the tests print the reason)."""

    step: Step
    reason: str


def expected_saving_seconds(batch_size: int, new_tokens: int, weight_bytes: int) -> float:
    """Decode time the compiled step saves over the eager one on a CPU: each step reads every weight once."""
    eager = new_tokens * weight_bytes / CPU_EAGER_BYTES_PER_SECOND
    speedup = COMPILED_SPEEDUP.get(batch_size, BATCHED_SPEEDUP)
    return eager * (1 - 1 / speedup)


def choose_decode_step(*, device_type: str, batch_size: int, new_tokens: int, weight_bytes: int,
                       warm_cache: bool, compiler_available: bool, graph_unsupported: str | None = None) -> DecodeChoice:
    """The decode step for one call (pure: every input is an argument).

    ``graph_unsupported`` is why the model's step cannot run as a device-side step at all
    (``optkit.inference.unsupported_reason``; beam search); ``warm_cache`` whether the compile cache
    holds this model and shape (or this process compiled it already).
    """
    if graph_unsupported:
        return DecodeChoice("eager", f"plain loop: {graph_unsupported}")
    fallback: Step = "graph" if device_type == "cuda" else "eager"
    if not compiler_available:
        return DecodeChoice(fallback, "torch.compile (inductor and a C++ compiler) is not available here")
    if weight_bytes < TINY_MODEL_BYTES:
        return DecodeChoice(fallback, f"a model under {TINY_MODEL_BYTES // 2**20} MiB is never compiled")
    if warm_cache:
        return DecodeChoice("compiled", "the compile cache holds this model and shape")
    if device_type == "cuda":
        return DecodeChoice("graph", "CUDA graphs already remove the launch overhead; no warm compile cache")
    if device_type != "cpu":
        return DecodeChoice("eager", f"no compiled step is measured on {device_type}")
    saving = expected_saving_seconds(batch_size, new_tokens, weight_bytes)
    if saving > COLD_COMPILE_SECONDS:
        return DecodeChoice("compiled", f"expected saving {saving:.0f} s > compile cost {COLD_COMPILE_SECONDS:.0f} s")
    return DecodeChoice("eager", f"expected saving {saving:.1f} s < compile cost {COLD_COMPILE_SECONDS:.0f} s "
                                 "(no warm compile cache)")


def compiler_available(device_type: str) -> bool:
    """inductor is importable and, on a CPU, a C++ compiler is on PATH."""
    from optkit import torch_internals

    if not torch_internals.available("inductor_compile_fx"):
        return False
    return device_type != "cpu" or any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def choose_for(model: Any, batch_size: int, new_tokens: int, max_length: int, *, cache_kind: str | None = "static",
               num_beams: int = 1) -> DecodeChoice:
    """:func:`choose_decode_step` with the inputs read from ``model`` (a loaded optkit model)."""
    from optkit.inference import compile_cache
    from optkit.inference.decode_graph import unsupported_reason

    device_type = model.device.type
    why_not = "beam search reorders the cache between steps" if num_beams > 1 else unsupported_reason(model, cache_kind)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the cache lookup fingerprints the model: only where its answer can matter (not for tiny models)
    warm = why_not is None and weight_bytes >= TINY_MODEL_BYTES and compile_cache.has_entry(model, batch_size,
                                                                                            max_length)
    choice = partial(choose_decode_step, device_type=device_type, batch_size=batch_size, new_tokens=new_tokens,
                     weight_bytes=weight_bytes, warm_cache=warm, graph_unsupported=why_not)
    # Asking whether inductor is there imports it (~2 s, paid by a process's first generate): only asked
    # when the answer matters -- without a compiler every other choice is the same step.
    optimistic = choice(compiler_available=True)
    if optimistic.step != "compiled":
        return optimistic
    return choice(compiler_available=compiler_available(device_type))
