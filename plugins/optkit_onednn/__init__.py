"""oneDNN linears for CPU decoding (``linear="onednn"``), with no second copy of the weights where none is needed.

Decoding reads every weight once per token, so on a CPU its speed is the memory bandwidth divided by the
bytes read. torch's default ``F.linear`` for one row (a GEMV) reaches well under that bandwidth; oneDNN's
matmul kernels get much closer, and in bfloat16 read half the bytes.

Where the weights live (issue 16: a loaded model must not hold its weights twice). oneDNN wants each weight
in a layout of its choosing. Measured with ``ONEDNN_VERBOSE=1`` (oneDNN 3.12, torch 2.13, AVX-512/AMX Xeon):

* **fp32: the chosen layout is the plain row-major one** (``ab``). "Packing" was a byte-for-byte copy
  (``reorder jit_direct_copy ab -> ab``) and the kernel that ran on it is the one that runs on the
  parameter itself (``brg_matmul``, ``wei:ab``, no reorder per call); timed alternately the two are equal.
  So no copy is made: oneDNN reads the ``nn.Linear`` parameter's own storage. Memory is the weights, once,
  and nothing has to be unpacked: ``state_dict``, saving, ``parameters()``, ``.weight``, training, LoRA,
  and ``.to()`` see the one true tensor because there is no other (tensor parallelism still refuses this
  linear: its plan declares no split yet).
* **bf16 on AMX: a blocked layout** (``AB16b64a2b``), on which the GEMVs run ~1.8x faster than on the plain
  weight. There a packed copy (rebuilt when the weight changes) is still kept, and costs as much memory as
  the weights; the tied LM head's copy included.

Which case holds is probed once per dtype (:func:`optkit.torch_internals.mkldnn_weight_layout_is_plain`),
not assumed: another CPU or oneDNN may choose a blocked fp32 layout, and then fp32 packs a copy too.
Alternatives considered and not taken: a packed tensor that *replaces* the parameter and is unpacked when
read cannot be made transparent (``parameters()`` and optimizers read ``Module._parameters`` directly, so a
reader would see an empty or oneDNN-layout tensor) and is pointless where the packed bytes equal the
plain ones; a memory-mapped dense copy still doubles the virtual footprint and faults back in on any read.
:func:`packed_bytes` reports what the copies hold.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import optkit
from optkit import torch_internals
from optkit.interfaces import StackableLinear
from optkit.registration import Capabilities

OPTKIT_PLUGIN_API = 1
DTYPES = (torch.float32, torch.bfloat16)


def unavailable_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    reasons = []
    if not torch.backends.mkldnn.is_available():
        reasons.append("this torch build has no oneDNN (mkldnn)")
    elif not torch_internals.available("mkldnn_linear"):
        reasons.append(f"torch {torch.__version__} lacks torch.ops.mkldnn._linear_pointwise")
    return reasons


class PackedWeight:
    """The weight oneDNN reads: the parameter itself where its layout is oneDNN's (see the module docstring),
    else a packed copy, rebuilt when the parameter's storage or version changes."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: Tensor | None = None

    def get(self, weight: Tensor) -> Tensor:
        if reads_in_place(weight):
            self._key = self._packed = None  # a copy made before (another dtype) is no longer needed
            return weight
        version = torch_internals.tensor_version(weight)
        views = versions_of_views(weight)
        key = (weight.data_ptr(), version, views, weight.dtype, tuple(weight.shape))
        if version is None or views is None or key != self._key:  # no version counter: repack, never use a stale copy
            self._packed = None  # free the old copy before making the new one
            self._packed = torch_internals.mkldnn_pack(weight)
            self._key = key
        return self._packed

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the parameter (0 without a copy)."""
        if self._packed is None:
            return 0
        held = torch_internals.mkldnn_nbytes(self._packed)
        return held if held is not None else self._packed.nelement() * self._packed.element_size()


# storage address -> the layers whose weights were moved into it as views (stacked q/k/v). Their parameters
# got the views through ``.data``, which gives each its own version counter: an optimizer step on q_proj does
# not bump the stacked weight's. The stacked layer's packed copy therefore also watches theirs.
_VIEWS: dict[int, weakref.WeakSet] = {}


def versions_of_views(weight: Tensor) -> int | None:
    """The summed version counters of the layers' weights that view ``weight``'s storage (counters only grow,
    so any in-place update changes the sum); None when a counter is unknown."""
    address = weight.untyped_storage().data_ptr()
    total = 0
    for layer in list(_VIEWS.get(address, ())):
        if layer.weight.untyped_storage().data_ptr() == address:
            version = torch_internals.tensor_version(layer.weight)
            if version is None:
                return None
            total += version
    return total


def reads_in_place(weight: Tensor) -> bool:
    """oneDNN computes from the parameter's own storage: its layout is the one oneDNN would pack into."""
    return weight.is_contiguous() and torch_internals.mkldnn_weight_layout_is_plain(weight.dtype)


def packed_bytes(model: nn.Module) -> int:
    """Bytes the packed copies of ``model`` hold beyond its parameters (0 where oneDNN reads them in place).

    Also finds the stacked q/k/v layers that ``optkit.inference`` keeps as plain attributes, not submodules."""
    seen: set[int] = set()
    total = 0
    stack = list(model.modules())
    while stack:
        module = stack.pop()
        for value in vars(module).values():
            if isinstance(value, PackedWeight) and id(value) not in seen:
                seen.add(id(value))
                total += value.nbytes
            elif isinstance(value, tuple):
                stack.extend(m for item in value if isinstance(item, nn.Module) for m in item.modules())
    return total


def packable(x: Tensor, weight: Tensor) -> bool:
    """Inference on CPU in fp32/bf16 with matching dtypes, on a torch that has the kernel; anything else
    takes torch's public path (same values)."""
    return (not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad)) \
        and x.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype and not weight.is_meta \
        and torch_internals.available("mkldnn_linear")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, cache: PackedWeight) -> Tensor:
    if packable(x, weight):
        return torch_internals.mkldnn_linear(x, cache.get(weight), bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(StackableLinear):
    """``nn.Linear`` whose CPU inference runs on oneDNN (on the weight itself, or on a packed copy).

    Stackable: given stacked weights it computes stacked outputs, so inference may fuse q/k/v (one GEMV).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._packed = PackedWeight()

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self._packed)

    def weights_changed(self) -> None:
        """Inference moved the weight into a stacked buffer: free any packed copy of the old storage now, and
        let the stacked layer's copy follow in-place updates of this weight (see ``_VIEWS``)."""
        self._packed = PackedWeight()
        for address in [a for a, layers in _VIEWS.items() if not layers]:  # layers gone: forget their storage
            del _VIEWS[address]
        _VIEWS.setdefault(self.weight.untyped_storage().data_ptr(), weakref.WeakSet()).add(self)


class OneDNNLinearFactory:
    """Builds the projections; ``matmul`` lets a head (the tied LM head) use the same kernel."""

    def __init__(self, init_std: float) -> None:
        self.init_std = init_std

    def __call__(self, in_features: int, out_features: int, *, bias: bool) -> OneDNNLinear:
        layer = OneDNNLinear(in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, std=self.init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer

    @staticmethod
    def matmul_cache() -> PackedWeight:
        return PackedWeight()

    @staticmethod
    def matmul(x: Tensor, weight: Tensor, cache: PackedWeight) -> Tensor:
        return linear(x, weight, None, cache)


def onednn(params, ctx) -> OneDNNLinearFactory:
    return OneDNNLinearFactory(ctx.decoder.init_std)


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register("linear", "onednn", onednn,
                      capabilities=Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({"float32", "bfloat16"})),
                      check=unavailable_reasons,
                      description="oneDNN kernels for fast CPU decoding (fp32, bf16)")
