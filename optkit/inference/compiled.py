"""The decode step compiled by inductor, with one-row products as fused reductions.

``generate(compile=True)`` hands :meth:`DecodeStep._step` to ``torch.compile`` with the backend
below before the CUDA-graph capture: inductor fuses the small kernels between the matrix products
(norms, residual adds, bias, activation, cache writes) and, with one row, computes each product as
its own reduction kernel (coordinate-descent tuned on CUDA) instead of the BLAS GEMV, which stays far
from the bandwidth limit at M=1 (cuBLAS on an H200, MKL/oneDNN on a CPU).

Every torch internal used here goes through :mod:`optkit.torch_internals`; without one, the step
still compiles with the public path (or runs eagerly), computing the same tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optkit import torch_internals
from optkit.inference.compile_cache import CachedStep, compiler_version
from optkit.inference.decode_graph import DecodeStep

# torch.compile keeps its compilations per code object and gives up after a few (8 by default):
# every model and shape (batch sizes x length buckets x dtypes) that compiles the step counts.
RECOMPILE_LIMIT = 64


def compile_step() -> Callable[[DecodeStep], Tensor]:
    """A compiled :meth:`DecodeStep._step` (compiles lazily, on the first call per shape).

    The session that asks keeps it, so dropping the session drops the compiled function.
    """
    options = {"recompile_limit": RECOMPILE_LIMIT} \
        if "recompile_limit" in inspect.signature(torch.compile).parameters else {}
    compiled = torch.compile(DecodeStep._step, dynamic=False, backend=inductor_with_gemv, **options)
    return CachedStep(compiled)  # loads / saves the compilation under the user cache directory


def inductor_with_gemv(graph: torch.fx.GraphModule, example_inputs):
    """Inductor, with one-row matrix products computed by its own (tuned) reduction kernels.

    With ``coordinate_descent_tuning`` (gpt-fast's setting) inductor turns a one-row ``mm`` into a
    reduction tuned to the bandwidth limit, where cuBLAS's GEMV stays far below it;
    :func:`_addmm_one_row` does the same for the biased projections, which it leaves alone.
    """
    patches = {"coordinate_descent_tuning": True}
    if not torch_internals.available("inductor_decompositions"):  # inductor's own table only: plain products
        return torch_internals.inductor_compile(graph, example_inputs, decompositions=None, config_patches=patches)
    return torch_internals.inductor_compile(graph, example_inputs, decompositions=gemv_decompositions(),
                                            config_patches=patches)


def gemv_decompositions() -> KeyedDecompositions:
    """Inductor's decompositions with the one-row products below; keyed so inductor's cache stays on."""
    table = KeyedDecompositions(torch_internals.inductor_decompositions())
    table[torch.ops.aten.addmm.default] = _addmm_one_row(table.get(torch.ops.aten.addmm.default))
    table[torch.ops.aten.mm.default] = _mm_one_row(table.get(torch.ops.aten.mm.default))
    table[torch.ops.aten.bmm.default] = _bmm_one_row(table.get(torch.ops.aten.bmm.default))
    return table


def _once(rows: Tensor) -> Tensor:
    """``rows`` in fp32, stored once on CPU instead of recomputed for every output.

    Inductor would otherwise inline whatever produced the row (a layer norm, a cast) into the
    reduction's inner loop and redo it for each of the N outputs, which makes bf16 GEMVs compute-bound.
    Not applied on CUDA, where it was not measured.
    """
    rows = rows.float()
    if rows.device.type == "cpu":
        rows = torch_internals.force_stride_order(rows)
    return rows


def _row_product(rows: Tensor, weight_t: Tensor) -> Tensor:
    """(1, K) @ (K, N) as an fp32 multiply-and-sum: inductor emits it as one reduction kernel."""
    return (_once(rows).unsqueeze(2) * weight_t.float().unsqueeze(0)).sum(dim=1)


def _mm_one_row(fallback):
    """x @ w for one row (the LM head) as a reduction in fp32, rounded once."""

    def mm(rows: Tensor, weight_t: Tensor) -> Tensor:
        if rows.shape[0] == 1 and rows.dtype == weight_t.dtype and rows.is_floating_point():
            return _row_product(rows, weight_t).to(rows.dtype)
        return NotImplemented if fallback is None else fallback(rows, weight_t)

    return mm


def _bmm_one_row(fallback):
    """Batched one-row products (a decode step's q k^T and p v in eager attention), likewise."""

    def bmm(rows: Tensor, other: Tensor) -> Tensor:
        if rows.shape[1] == 1 and rows.dtype == other.dtype and rows.is_floating_point():
            return (rows.float().unsqueeze(-1) * other.float().unsqueeze(1)).sum(dim=2).to(rows.dtype)
        return NotImplemented if fallback is None else fallback(rows, other)

    return bmm


def _addmm_one_row(fallback):
    """bias + x @ w for one row as a reduction in fp32, rounded once (as cuBLAS's epilogue does)."""

    def addmm(bias: Tensor, rows: Tensor, weight_t: Tensor, *, beta=1, alpha=1) -> Tensor:
        if rows.shape[0] == 1 and beta == 1 and alpha == 1 and rows.dtype == weight_t.dtype == bias.dtype:
            return (_row_product(rows, weight_t) + bias.float()).to(rows.dtype)
        return NotImplemented if fallback is None else fallback(bias, rows, weight_t, beta=beta, alpha=alpha)

    return addmm


# -- making optkit's backend cacheable ----------------------------------------------------------------
class KeyedDecompositions(dict):
    """A decomposition table inductor can put in its cache key.

    Inductor pickles the table to key its FX-graph cache; optkit's closures and some of inductor's own
    entries do not pickle, so the cache was bypassed on every compile. This table pickles (for the key
    only) as the hash of the module that builds it: the key changes when that code changes.
    """

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[str]]:
        return _decompositions_by_version, (compiler_version(),)

    def __copy__(self) -> KeyedDecompositions:
        return KeyedDecompositions(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> KeyedDecompositions:
        return KeyedDecompositions(self)  # the functions themselves are shared, as copy.deepcopy does


def _decompositions_by_version(version: str) -> dict[Any, Any]:
    """The table again, when inductor unpickles a cached graph built with this version of it."""
    if version != compiler_version():  # inductor counts a failed load as a miss and compiles afresh
        raise RuntimeError(f"optkit's compile backend changed ({version} -> {compiler_version()})")
    return gemv_decompositions()
