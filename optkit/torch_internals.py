"""Every private torch internal optkit uses, behind one guard each, with the public path as fallback.

Fast paths lean on a few torch internals (inductor's decomposition table, a prims op, oneDNN's
packed linear, cuBLASLt's fused bias+ReLU, a tensor's version counter). They are not API: any torch
release may rename or drop them. Each is reached only through this module, which checks that it
exists, and every caller has a public fallback that computes the same values, only slower. The tests
switch each internal off with :func:`disabled` and check that generated tokens do not change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

# name -> how to tell whether this torch has it
_PROBES: dict[str, Callable[[], bool]] = {
    "inductor_compile_fx": lambda: _importable("torch._inductor.compile_fx", "compile_fx"),
    "inductor_decompositions": lambda: _importable("torch._inductor.decomposition", "select_decomp_table"),
    "prims_force_stride_order": lambda: hasattr(torch.ops.prims, "inductor_force_stride_order"),
    "addmm_activation": lambda: hasattr(torch, "_addmm_activation"),
    "tensor_version": lambda: hasattr(torch.empty(0), "_version"),
    "mkldnn_linear": lambda: torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"),
    "mkldnn_nbytes": lambda: torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_nbytes"),
}
NAMES = tuple(_PROBES)
_off: set[str] = set()
_off_lock = threading.Lock()
_cache: dict[str, bool] = {}


def _importable(module: str, attribute: str) -> bool:
    try:
        return hasattr(__import__(module, fromlist=[attribute]), attribute)
    except Exception:  # noqa: BLE001 -- a broken private module is just "not there"
        return False


def available(name: str) -> bool:
    """Whether this torch has internal ``name`` (and no test switched it off)."""
    if name in _off:
        return False
    if name not in _cache:
        _cache[name] = bool(_PROBES[name]())
    return _cache[name]


@contextlib.contextmanager
def disabled(*names: str) -> Iterator[None]:
    """Pretend these internals are missing (tests of the public fallbacks)."""
    unknown = [n for n in names if n not in _PROBES]
    if unknown:
        raise ValueError(f"unknown torch internal(s) {unknown}; known: {', '.join(NAMES)}")
    with _off_lock:
        before = set(_off)
        _off.update(names)
    try:
        yield
    finally:
        with _off_lock:
            _off.intersection_update(before)


# -- inductor --------------------------------------------------------------------------------------
def inductor_decompositions() -> dict[Any, Any]:
    """Inductor's own decomposition table (empty when this torch does not expose it)."""
    if not available("inductor_decompositions"):
        return {}
    from torch._inductor.decomposition import select_decomp_table

    return dict(select_decomp_table())


def inductor_compile(graph: torch.fx.GraphModule, example_inputs: Any, *, decompositions: dict[Any, Any] | None,
                     config_patches: dict[str, Any]) -> Callable[..., Any]:
    """Inductor with a whole decomposition table of our own (None: inductor's default); without ``compile_fx``,
    the graph as it is (eager)."""
    if not available("inductor_compile_fx"):
        return graph.forward
    from torch._inductor.compile_fx import compile_fx

    if decompositions is None:
        return compile_fx(graph, example_inputs, config_patches=config_patches)
    return compile_fx(graph, example_inputs, decompositions=decompositions, config_patches=config_patches)


def force_stride_order(tensor: Tensor) -> Tensor:
    """Ask inductor to materialise ``tensor`` once (identity when the prims op is missing)."""
    if not available("prims_force_stride_order"):
        return tensor
    return torch.ops.prims.inductor_force_stride_order(tensor, tensor.stride())


# -- eager kernels ---------------------------------------------------------------------------------
def relu_addmm(bias: Tensor, rows: Tensor, weight_t: Tensor) -> Tensor:
    """relu(bias + rows @ weight_t), in one cuBLASLt call when torch has it."""
    if available("addmm_activation"):
        return torch._addmm_activation(bias, rows, weight_t)
    return torch.relu(torch.addmm(bias, rows, weight_t))


def tensor_version(tensor: Tensor) -> int | None:
    """The in-place modification counter, or None when unknown (callers then assume it changed)."""
    return tensor._version if available("tensor_version") else None


def mkldnn_pack(weight: Tensor) -> Tensor:
    """``weight`` reordered into oneDNN's blocked layout for one-row products."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=1)


def mkldnn_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def mkldnn_nbytes(packed: Tensor) -> int | None:
    """Bytes a oneDNN-layout tensor holds (padding included), or None when this torch cannot tell."""
    if not available("mkldnn_nbytes"):
        return None
    return int(torch.ops.mkldnn._nbytes(packed))


_plain_layout: dict[torch.dtype, bool] = {}


def mkldnn_weight_layout_is_plain(dtype: torch.dtype) -> bool:
    """Whether oneDNN keeps a one-row linear's ``dtype`` weight in the plain row-major layout.

    Then packing is a byte-for-byte copy (oneDNN's reorder is a ``direct_copy`` ``ab -> ab``) and
    :func:`mkldnn_linear` may be handed the dense weight itself. Probe: pack a weight whose dimensions
    are multiples of no block size (97 x 131); every blocked layout pads it, the plain one does not.
    False when unsure (no oneDNN, no ``_nbytes``): callers then pack, which is correct everywhere.
    A permuted plain layout (``ba``) would also read as plain; that costs speed, never values, since
    oneDNN computes correctly from a dense weight in any case.
    """
    if not (available("mkldnn_linear") and available("mkldnn_nbytes")):
        return False
    if dtype not in _plain_layout:
        probe = torch.zeros(97, 131, dtype=dtype)
        _plain_layout[dtype] = mkldnn_nbytes(mkldnn_pack(probe)) == probe.nelement() * probe.element_size()
    return _plain_layout[dtype]
