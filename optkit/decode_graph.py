"""One decode step with all its per-token state on the device, captured once as a CUDA graph.

The reference loop (``generation._forward_last``) hands each step its cache offset and mask as
Python values; a CUDA graph would freeze those at capture. Here the new token, its position, the
cache slot it is written to and the keys it may see live in tensors that the step itself advances,
so replaying the captured step is the whole per-token cost: one launch instead of hundreds of
kernel launches from Python. That launch overhead, not memory bandwidth, is what bounds small
models on a GPU.

On the CPU the same step runs eagerly (no graphs there); the tests use that to prove it computes
exactly what the reference loop computes, and on CUDA they compare the replayed graph with it.

``compiled=True`` hands the step to ``torch.compile`` (inductor) before the capture: it fuses the
small kernels between the matrix products (norms, residual adds, bias, activation, cache writes)
and, with one row, computes each product as its own reduction kernel (coordinate-descent tuned on
CUDA) instead of the BLAS GEMV, which stays far from the bandwidth limit at M=1 (cuBLAS on an H200,
MKL/oneDNN on the CI machine's CPU). The compiled step is still captured into our graph, so its
device-side state works unchanged.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from optkit.interfaces import AttentionMask, HeadInputs, KVCache
from optkit.spec import DECODER_COMPONENTS

if TYPE_CHECKING:
    from optkit.model import Model


def unsupported_reason(model: Model, cache_kind: str | None) -> str | None:
    """Why this model's decode step cannot be captured (None: it can).

    Every component the step runs through must declare ``cuda_graphs``: a host synchronisation
    breaks the capture, and a Python value read per step would silently be frozen by it.
    """
    from optkit import registry

    decoder = model.spec.decoder
    names = {kind: getattr(decoder, kind).name for kind in DECODER_COMPONENTS}
    names["kv_cache"] = cache_kind or names["kv_cache"]
    names["head"] = model.spec.head.name
    for kind, name in names.items():
        if name == "auto":
            name = registry.select_auto(kind, model.device, model.dtype).name
        if (kind, name) not in registry:
            return f"{kind} '{name}' is not registered"
        if not registry.get(kind, name).capabilities.cuda_graphs:
            return f"{kind} '{name}' does not declare cuda_graphs (it may synchronise with the host)"
    if model.training:
        return "the model is in training mode (dropout draws new masks per step); call model.eval()"
    return None


class DecodeStep:
    """Feeds one token per row through the model at device-side positions; graph-captured on CUDA."""

    def __init__(self, model: Model, cache: KVCache, batch_size: int, compiled: bool = False):
        if cache.max_length is None:
            raise ValueError("the decode step needs a preallocated cache (kv_cache 'static')")
        device = model.device
        self.decoder, self.head, self.cache = model.decoder, model.head, cache  # not the model: see decode_step
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the next key/value is written
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.visible = torch.zeros(batch_size, cache.max_length, dtype=torch.bool, device=device)
        self.capture = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the graph's output buffer
        self._run = functools.partial(_compiled_step(model), self) if compiled else self._step

    def start(self, prompt_mask: Tensor) -> None:
        """After the prefill stored the prompt: the next token goes to slot ``prompt length``."""
        length = prompt_mask.shape[1]
        self.slot.fill_(length)
        self.positions.copy_(prompt_mask.sum(dim=1, keepdim=True))  # per row: real tokens so far
        self.visible.zero_()
        self.visible[:, :length] = prompt_mask.bool()
        self.cache.follow(self.slot)

    def __call__(self, token: Tensor) -> Tensor:
        """Next-token logits (rows, vocab) in fp32 after appending ``token`` (rows,)."""
        self.ids.copy_(token[:, None])
        if self.capture:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._run()

    def _step(self) -> Tensor:
        self.visible.index_fill_(1, self.slot, True)
        mask = AttentionMask(batch_size=self.ids.shape[0], q_len=1, kv_len=self.visible.shape[1], causal=False,
                             key_padding=self.visible, every_query_sees_a_key=True)
        hidden, _, _ = self.decoder(input_ids=self.ids, inputs_embeds=None, attention_mask=None,
                                    position_ids=self.positions, cache=self.cache, output_hidden_states=False,
                                    output_attentions=False, attention=mask)
        logits = self.head(hidden, HeadInputs(input_ids=self.ids, logits_to_keep=1))["logits"][:, -1].float()
        self.slot.add_(1)
        self.positions.add_(1)
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream (lazy initialisation stays out of the graph), then capture one step."""
        self.capture = False
        saved = self.slot.clone(), self.positions.clone(), self.visible.clone()
        try:
            stream = torch.cuda.Stream(device=self.ids.device)
            stream.wait_stream(torch.cuda.current_stream(self.ids.device))
            with torch.cuda.stream(stream):
                self._run()  # compiles here, when compiled
            torch.cuda.current_stream(self.ids.device).wait_stream(stream)
            self._restore(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._run()
            self.graph, self.logits = graph, logits
        except Exception as exc:  # a component that syncs despite its declaration: stay correct, go slower
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(exc).__name__}: {exc}); "
                          "decoding without graphs", RuntimeWarning, stacklevel=3)
        self._restore(saved)

    def _restore(self, saved: tuple[Tensor, Tensor, Tensor]) -> None:
        self.slot.copy_(saved[0])
        self.positions.copy_(saved[1])
        self.visible.copy_(saved[2])


# model -> its compiled copy of DecodeStep._step (see _compiled_step)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
RECOMPILE_LIMIT = 32  # shapes per model: batch sizes x length buckets x dtypes


def _compiled_step(model: Model):
    """``DecodeStep._step`` compiled by inductor for fixed shapes, one function per model.

    torch.compile keeps its compilations, and its limit of 8 before it gives up and runs the function
    uncompiled, per code object. A copy of the step's code per model keeps models from using up each
    other's; each model may have several shapes (batch sizes, length buckets), so the limit is raised
    where this torch lets a single function say so.
    """
    compiled = _COMPILED.get(model)
    if compiled is None:
        plain = DecodeStep._step
        step = types.FunctionType(plain.__code__.replace(), plain.__globals__, plain.__name__, plain.__defaults__,
                                  plain.__closure__)
        options = {"recompile_limit": RECOMPILE_LIMIT} \
            if "recompile_limit" in inspect.signature(torch.compile).parameters else {}
        compiled = _COMPILED[model] = torch.compile(step, dynamic=False, backend=inductor_with_gemv, **options)
    return compiled


def inductor_with_gemv(graph: torch.fx.GraphModule, example_inputs):
    """Inductor, with one-row matrix products computed by its own (tuned) reduction kernels.

    With ``coordinate_descent_tuning`` (gpt-fast's setting) inductor turns a one-row ``mm`` into a
    reduction tuned to the bandwidth limit, where cuBLAS's GEMV stays far below it;
    :func:`_addmm_one_row` does the same for the biased projections, which it leaves alone.
    """
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    table[torch.ops.aten.addmm.default] = _addmm_one_row(table.get(torch.ops.aten.addmm.default))
    table[torch.ops.aten.mm.default] = _mm_one_row(table.get(torch.ops.aten.mm.default))
    table[torch.ops.aten.bmm.default] = _bmm_one_row(table.get(torch.ops.aten.bmm.default))
    return compile_fx(graph, example_inputs, decompositions=table, config_patches={"coordinate_descent_tuning": True})


def _once(rows: Tensor) -> Tensor:
    """``rows`` in fp32, stored once on CPU instead of recomputed for every output.

    Inductor would otherwise inline whatever produced the row (a layer norm, a cast) into the
    reduction's inner loop and redo it for each of the N outputs, which makes bf16 GEMVs compute-bound.
    Not applied on CUDA, where it was not measured.
    """
    rows = rows.float()
    if rows.device.type == "cpu":
        rows = torch.ops.prims.inductor_force_stride_order(rows, rows.stride())
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


def _fingerprint(model: Model) -> tuple:
    """Changes whenever a module or a weight's storage is replaced (a captured graph reads old addresses)."""
    return (tuple((id(m), type(m)) for m in model.modules()), tuple(t.data_ptr() for t in model.parameters()),
            tuple(t.data_ptr() for t in model.buffers()))


COMPILED_LENGTH_STEP = 256

# model -> (key, step) of its last captured step; weak, so a dropped model frees its graph and cache
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_step(model: Model, batch_size: int, max_length: int, cache_kind: str | None,
                compiled: bool = False) -> DecodeStep:
    """A decode step with a fresh (reset) cache; on CUDA the last captured one is reused when it fits.

    Capturing costs a few forward passes, so the graph and its cache stay on the model for the next
    ``generate`` call of the same batch size and length; any change of modules or weight storage
    (``set_backend``, ``.to()``) makes a new one. ``generate`` fuses the q/k/v projections before
    (``Attention.fuse_projections``), so the fingerprint already sees the fused layout.
    A compiled step's cache is rounded up to a multiple of ``COMPILED_LENGTH_STEP`` positions: each
    cache length is a new compilation (and torch.compile gives up after a few), while unwritten
    slots cost only a little masked attention.
    """
    if compiled:
        max_length = -(-max_length // COMPILED_LENGTH_STEP) * COMPILED_LENGTH_STEP
    key = (batch_size, max_length, cache_kind, compiled, model.device, model.dtype, _fingerprint(model))
    kept = _KEPT.pop(model, None)  # at most one per model: the old graph's memory is freed first
    if kept is not None and kept[0] == key:
        _KEPT[model] = kept
        kept[1].cache.reset()
        return kept[1]
    del kept
    cache = model.new_cache(batch_size, max_length=max_length, kind=cache_kind)
    step = DecodeStep(model, cache, batch_size, compiled)
    if step.capture and callable(getattr(cache, "reset", None)):
        _KEPT[model] = (key, step)
    return step
