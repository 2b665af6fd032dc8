"""`LoRALinear`: a low-rank delta on top of whatever linear the spec chose.

``h = base(x) + B(A(dropout(x))) * scale`` with ``scale = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
The base is used only through the :class:`~optkit.interfaces.WrappableLinear` contract (sizes and a
forward), so the same adapter sits on torch's ``nn.Linear``, the int8 linear, oneDNN's or a third
party's. A is Kaiming-uniform and B zero, so a fresh adapter changes nothing.

One wrapper holds several named adapters (``lora_A[name]``, ``lora_B[name]``, as PEFT names its
parameters) and runs the ``active`` one. Merging folds ``scale * B @ A`` into the base weight; that needs
a float weight, which only a :class:`~optkit.interfaces.MergeableLinear` (or a plain ``nn.Linear``)
offers, so a quantized base refuses with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optkit.errors import InputError, brief_repr
from optkit.interfaces import MergeableLinear, StackableLinear, WrappableLinear

# PEFT's ``LoraConfig().lora_alpha``: an adapter added without ``alpha`` scales its delta as PEFT's would, so a
# PEFT user's ``r=...``-only recipe means the same here (a test compares with the installed peft).
DEFAULT_ALPHA = 8


@dataclass(frozen=True)
class LoRASettings:
    """One adapter's hyper-parameters (PEFT's ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``); ``alpha``
    defaults to PEFT's 8."""

    r: int
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        problems = check_settings(self.r, self.alpha, self.dropout, self.use_rslora)
        if problems:
            raise InputError("LoRA settings: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        """What multiplies ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (stable at large r)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def check_settings(r: object, alpha: object, dropout: object, use_rslora: object) -> list[str]:
    """Every problem with a set of LoRA hyper-parameters, each naming the argument (empty: fine)."""
    problems = []
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r must be a positive integer (the rank), got {brief_repr(r)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha == 0:
        # 0 scales the delta to nothing: the adapter would never change the output nor get a gradient
        problems.append(f"alpha must be a finite non-zero number (the delta is scaled by alpha / r), "
                        f"got {brief_repr(alpha)}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be a number in [0, 1), got {brief_repr(dropout)}")
    if not isinstance(use_rslora, bool):
        problems.append(f"use_rslora must be true or false, got {brief_repr(use_rslora)}")
    return problems


def merge_refusal(base: nn.Module) -> str | None:
    """Why ``scale * B @ A`` cannot be folded into ``base``'s weight (None: it can).

    A :class:`MergeableLinear` hands out and takes back a float weight; plain ``nn.Linear`` (and the
    :class:`StackableLinear` family, whose weights are ordinary ``nn.Linear`` weights) is written in place.
    Anything else -- the int8 linear among them -- stores its weight in a way the adapter may not assume. A base
    with a ``merge_refusal_reason`` string (the 4-bit linears) refuses with that reason.
    """
    own = getattr(base, "merge_refusal_reason", None)  # a base that knows why it refuses (e.g. 4-bit) says so
    if isinstance(own, str):
        return own
    if isinstance(base, MergeableLinear) or type(base) is nn.Linear or isinstance(base, StackableLinear):
        return None
    return (f"its base {type(base).__name__} does not implement optkit.interfaces.MergeableLinear "
            "(dense_weight / set_dense_weight), so its weight cannot be rewritten in floating point; keep the "
            "adapter unmerged (it runs on top of the base as it is), or build the model with linear='torch' to merge")


class LoRALinear(nn.Module):
    """A registered linear plus named low-rank adapters (implements :class:`~optkit.interfaces.LinearAdapter`)."""

    def __init__(self, base: nn.Module, r: int, alpha: float = DEFAULT_ALPHA, dropout: float = 0.0,
                 use_rslora: bool = False, *,
                 name: str = "default", dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if not isinstance(base, WrappableLinear) or not isinstance(base, nn.Module):
            raise InputError(f"LoRALinear wraps a linear module with in_features, out_features and a forward; "
                             f"got {type(base).__name__}")
        self.base = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.settings: dict[str, LoRASettings] = {}
        self.active: str | None = name  # the adapter forward adds (None: the base alone)
        self.merged: str | None = None  # the adapter folded into the base weight right now
        self.add(name, LoRASettings(r, alpha, dropout, use_rslora), dtype=dtype, device=device)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def adapter_names(self) -> list[str]:
        return list(self.settings)

    def add(self, name: str, settings: LoRASettings, *, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> None:
        """A new adapter ``name``: A ``(r, in)`` Kaiming-uniform, B ``(out, r)`` zero (so it starts as a no-op)."""
        check_adapter_name(name)
        if name in self.settings:
            raise InputError(f"this linear already has an adapter named '{name}'; choose another name")
        a = nn.Linear(self.in_features, settings.r, bias=False, dtype=dtype, device=device)
        b = nn.Linear(settings.r, self.out_features, bias=False, dtype=dtype, device=device)
        # nn.Linear's own default (a = sqrt(5)), which is also PEFT's: uniform(+-1/sqrt(in_features)).
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.settings[name] = settings

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        name = self.active
        if name is None or self.merged is not None or name not in self.settings:
            return out
        a, b, settings = self.lora_A[name], self.lora_B[name], self.settings[name]
        h = x.to(a.weight.dtype)  # adapters may train in fp32 on a bf16 / int8 base
        if settings.dropout and self.training:
            h = F.dropout(h, p=settings.dropout, training=True)
        return out + (b(a(h)) * settings.scale).to(out.dtype)

    def delta_weight(self, name: str) -> Tensor:
        """``scale * B @ A`` in float32, shaped like the base weight ``(out_features, in_features)``."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (b.detach().float() @ a.detach().float()) * self.settings[name].scale

    def merge(self) -> None:
        """Fold the active adapter into the base weight; forward then runs the base alone (no-op if merged)."""
        if self.merged is not None:
            return
        if self.active is None or self.active not in self.settings:
            raise InputError("there is no active adapter to merge on this linear; call set_adapter first")
        reason = merge_refusal(self.base)
        if reason is not None:
            raise InputError(f"cannot merge adapter '{self.active}': {reason}")
        self._add_to_base(self.delta_weight(self.active), sign=1.0)
        self.merged = self.active

    def unmerge(self) -> None:
        """Subtract a merged adapter from the base weight again (no-op if none is merged).

        The weight comes back within one rounding of its dtype per element (``(W + d) - d``), not always
        bit for bit.
        """
        if self.merged is None:
            return
        self._add_to_base(self.delta_weight(self.merged), sign=-1.0)
        self.merged = None

    def _add_to_base(self, delta: Tensor, *, sign: float) -> None:
        base = self.base
        with torch.no_grad():
            if isinstance(base, MergeableLinear):
                weight = base.dense_weight()
                base.set_dense_weight((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))
            else:  # in place: the parameter object (and its version counter, which packed copies watch) stays
                weight = base.weight
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype), alpha=sign)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}(r={s.r}, alpha={s.alpha}, dropout={s.dropout}"
                             f"{', rslora' if s.use_rslora else ''})" for name, s in self.settings.items())
        return f"adapters=[{adapters}], active={self.active!r}, merged={self.merged!r}"


def check_adapter_name(name: object) -> None:
    """Adapter names key ``nn.ModuleDict`` entries (and PEFT's sub-folders): a plain non-empty word."""
    if not isinstance(name, str) or not name or "." in name or "/" in name or name != name.strip():
        raise InputError(f"adapter name must be a non-empty string without '.', '/' or surrounding spaces, "
                         f"got {brief_repr(name)}")
