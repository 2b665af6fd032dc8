"""One decode step with all its per-token state on the device, captured once as a CUDA graph.

The reference loop (``generation._forward_last``) hands each step its cache offset and mask as
Python values; a CUDA graph would freeze those at capture. Here the new token, its position, the
cache slot it is written to and the keys it may see live in tensors that the step itself advances,
so replaying the captured step is the whole per-token cost: one launch instead of hundreds of
kernel launches from Python. That launch overhead, not memory bandwidth, is what bounds small
models on a GPU.

On the CPU the same step runs eagerly (no graphs there); the tests use that to prove it computes
exactly what the reference loop computes, and on CUDA they compare the replayed graph with it.

A step may run a compiled copy of :meth:`DecodeStep._step` instead (``run=``; see
``optkit.inference.compiled``); the compiled step is still captured into our graph, so its
device-side state works unchanged. Which steps are kept between ``generate`` calls is the
business of :class:`optkit.inference.InferenceSession`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
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
    registry = model.registry
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
    if model.placement is not None and not model.placement.single_device:
        return "the model is spread over devices or offloaded (device_map): its hooks move weights per step"
    return None


class DecodeStep:
    """Feeds one token per row through the model at device-side positions; graph-captured on CUDA."""

    def __init__(self, model: Model, cache: KVCache, batch_size: int, run: Callable[[DecodeStep], Tensor] | None = None):
        if cache.max_length is None:
            raise ValueError("the decode step needs a preallocated cache (kv_cache 'static')")
        device = model.device
        self.decoder, self.head, self.cache = model.decoder, model.head, cache  # not the model: it may be kept
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the next key/value is written
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.visible = torch.zeros(batch_size, cache.max_length, dtype=torch.bool, device=device)
        self.capture = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the graph's output buffer
        self._run = functools.partial(run, self) if run is not None else self._step

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
                                    output_attentions=False, mask=mask)
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


def _fingerprint(model: Model) -> tuple:
    """Changes whenever a module or a weight's storage is replaced (a captured graph reads old addresses),
    or a forward hook is added or removed (a captured graph replays the hooks it saw)."""
    return (tuple((id(m), type(m)) for m in model.modules()), tuple(t.data_ptr() for t in model.parameters()),
            tuple(t.data_ptr() for t in model.buffers()), forward_hooks(model))


def forward_hooks(model: Model) -> tuple[int, ...]:
    """The forward (pre-)hooks the model's modules would run, global ones included, by handle id (empty: none).

    torch.compile does not guard on hooks, so a compiled step would keep running the hooks (or their
    absence) it was traced with, even for another model; and a CUDA graph replays the ones it captured."""
    dicts = [getattr(torch.nn.modules.module, name, None) or {}
             for name in ("_global_forward_hooks", "_global_forward_pre_hooks")]
    for module in model.modules():
        dicts += [getattr(module, "_forward_hooks", None) or {}, getattr(module, "_forward_pre_hooks", None) or {}]
    return tuple(key for hooks in dicts for key in hooks)


COMPILED_LENGTH_STEP = 256


def step_key(model: Model, batch_size: int, max_length: int, cache_kind: str | None, compiled: bool) -> tuple:
    """What a kept step must match to be replayed: shapes, kinds, device, dtype, the module/weight layout, and
    whether inference mode is on (a step made in ``torch.inference_mode`` holds inference tensors, which
    cannot be written in place outside it)."""
    return (batch_size, max_length, cache_kind, compiled, model.device, model.dtype, _fingerprint(model),
            torch.is_inference_mode_enabled())


def padded_length(max_length: int, compiled: bool) -> int:
    """A compiled step's cache is rounded up to a multiple of ``COMPILED_LENGTH_STEP`` positions: each
    cache length is a new compilation (and torch.compile gives up after a few), while unwritten
    slots cost only a little masked attention."""
    return -(-max_length // COMPILED_LENGTH_STEP) * COMPILED_LENGTH_STEP if compiled else max_length
