"""The attention block inference runs: the reference math, with q/k/v in one GEMM and the scale folded.

Two exact rewrites of :class:`optkit.model.Attention`, applied by :func:`optkit.inference.prepare`:

* **stacked projections.** q, k and v are computed by one GEMM over their stacked weights. The three
  parameters become views of one buffer -- same objects, same values, same ``state_dict``, no extra
  memory. It pays where one bigger GEMM beats three (plain ``nn.Linear`` on a GPU; a linear class
  that derives from :class:`~optkit.interfaces.StackableLinear`, like oneDNN's on CPU); torch's CPU
  GEMV gains nothing, so plain ``nn.Linear`` on CPU is left alone.
* **scale folding.** OPT multiplies q by ``head_dim**-0.5`` after its projection. When that scale is a
  power of two (head_dim 64, 256, ...) multiplying the scores instead is bit-identical, so the kernel
  applies it and one pass over q per layer is saved.

Both are inference-only: with autograd on (training) the reference path runs. Whatever replaces a
weight's storage afterwards (``.to()``, ``load_state_dict(assign=True)``) is detected and the stale
stacked buffer dropped; in-place updates keep it. A projection wrapped by an adapter unstacks the block
(the adapter is never bypassed); once the wrappers are gone, its next inference forward stacks again.
Likewise a forward hook on q/k/v (or a global module hook) makes the block call the projections.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from optkit.interfaces import StackableLinear, is_power_of_two
from optkit.model import Attention


def stacking_pays(parts: tuple[nn.Module, ...]) -> bool:
    """Three projections of one stackable class, with equal bias use, on one device, where it is faster."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts) or not issubclass(kind, nn.Linear):
        return False
    if len({p.bias is None for p in parts}) != 1 or len({p.weight.device for p in parts}) != 1:
        return False
    return issubclass(kind, StackableLinear) or (kind is nn.Linear and parts[0].weight.device.type != "cpu")


def carry_module_state(source: nn.Module, target: nn.Module) -> None:
    """What makes ``target`` the same block as ``source``: its submodules, any parameters or buffers of its own,
    and the user's hooks (the hook dicts themselves, so a handle from before still removes its hook)."""
    target._modules.update(source._modules)
    target._parameters.update(source._parameters)
    target._buffers.update(source._buffers)
    target._non_persistent_buffers_set.update(source._non_persistent_buffers_set)
    target.__dict__.update({k: v for k, v in source.__dict__.items() if k.startswith("_") and "hook" in k})


class PreparedAttention(Attention):
    """:class:`Attention` with stacked q/k/v and a folded scale (see the module docstring)."""

    @classmethod
    def from_reference(cls, reference: Attention, *, stack: bool = True) -> "PreparedAttention":
        """The same projections and kernel (the same module objects) and hooks in the prepared block."""
        prepared = cls.__new__(cls)
        nn.Module.__init__(prepared)
        prepared.__dict__.update({k: v for k, v in reference.__dict__.items() if not k.startswith("_")})
        carry_module_state(reference, prepared)
        prepared.training = reference.training
        prepared._stacked = None
        if stack:
            prepared.stack_projections()
        return prepared

    def to_reference(self) -> Attention:
        """The plain block again, over the same modules (the stacked storage stays; values are equal)."""
        reference = Attention.__new__(Attention)
        nn.Module.__init__(reference)
        reference.__dict__.update({k: v for k, v in self.__dict__.items()
                                   if not k.startswith("_") or k == "training"})
        carry_module_state(self, reference)
        return reference

    def stack_projections(self) -> bool:
        """Lay q/k/v out in one buffer where that pays; True when the block computes them with one GEMM."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        if not stacking_pays(parts):
            return False
        if self._current() is not None:
            return True
        kind = type(parts[0])
        # Never inference tensors (stacking may run lazily inside a caller's torch.inference_mode): the
        # parameters become views of this buffer, and training the model later must still work.
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([p.weight for p in parts])
            bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
            sizes = [p.out_features for p in parts]
            for part, w, b in zip(parts, weight.split(sizes), bias.split(sizes) if bias is not None else sizes):
                part.weight.data = w
                if bias is not None:
                    part.bias.data = b
                if isinstance(part, StackableLinear):
                    part.weights_changed()  # e.g. drop a packed copy of the old storage
            with torch.device("meta"):
                stacked = kind(parts[0].in_features, weight.shape[0], bias=bias is not None)
            stacked.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                stacked.bias = nn.Parameter(bias, requires_grad=False)
        # A plain attribute, not a submodule: no new state_dict keys, and .to() does not move it.
        self.__dict__["_stacked"] = (weight, bias, stacked.eval())
        return True

    def _current(self) -> nn.Module | None:
        """The stacked layer while q/k/v still live in its buffer (else drop it)."""
        if self._stacked is None:
            return None
        weight, bias, layer = self._stacked
        if torch.compiler.is_compiling():  # checked eagerly before compiling
            return layer
        if any(type(part) is not type(layer) for part in (self.q_proj, self.k_proj, self.v_proj)):
            self.__dict__["_stacked"] = None  # a projection was wrapped (an adapter) or replaced
            self.__dict__["_restack_when_unwrapped"] = True
            return None
        offsets = (0, self.q_proj.out_features, weight.shape[0] - self.v_proj.out_features)
        for part, offset in zip((self.q_proj, self.k_proj, self.v_proj), offsets):  # any one may be replaced
            if part.weight.data_ptr() != weight[offset].data_ptr() or \
                    (bias is not None and part.bias.data_ptr() != bias[offset:].data_ptr()):
                self.__dict__["_stacked"] = None  # the weights moved out: the buffer is stale
                return None
        return layer

    @property
    def stacked(self) -> bool:
        """Whether q/k/v are computed by one GEMM right now."""
        return self._current() is not None

    def _restack_if_unwrapped(self) -> nn.Module | None:
        """Stack q/k/v again once the wrappers that unstacked them are gone (adapters unloaded or merged away).

        Only a block that was stacked and lost it to a wrapped or replaced projection does this, so a block
        prepared with ``stack=False`` stays as it is, and nothing outside this room has to ask for it.
        """
        if not self.__dict__.get("_restack_when_unwrapped") or torch.compiler.is_compiling():
            return None
        if not stacking_pays((self.q_proj, self.k_proj, self.v_proj)):
            return None  # still wrapped, or the projections are no longer of one stackable kind
        self.__dict__["_restack_when_unwrapped"] = False
        self.stack_projections()
        return self._current()

    def _projections_hooked(self) -> bool:
        """Whether forward hooks would see q/k/v being called (the user's on a projection, or global module
        hooks): the stacked GEMM never calls them, so the projections are called instead."""
        hooked = any(getattr(torch.nn.modules.module, name, None)
                     for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))
        return hooked or any(getattr(part, "_forward_hooks", None) or getattr(part, "_forward_pre_hooks", None)
                             for part in (self.q_proj, self.k_proj, self.v_proj))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        stacked = None if torch.is_grad_enabled() else (self._current() or self._restack_if_unwrapped())
        if stacked is None or self._projections_hooked():
            return super().project(x)
        sizes = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        return stacked(x).split(sizes, dim=-1)

    def scale_query(self, query: Tensor) -> tuple[Tensor, float]:
        if self.query_scaling == "projection" and is_power_of_two(self.scaling) \
                and not torch.is_grad_enabled():
            return query, self.scaling
        return super().scale_query(query)
