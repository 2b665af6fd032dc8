"""Conformance kits for the non-attention component kinds: MLP, norm, positional embedding,
token embedding, linear and KV cache.

    from optkit.testing import check_component
    check_component("mlp", "geglu")                          # raises ComponentConformanceError per failed property
    check_component("norm", "fused_layernorm", reference="layernorm")   # must compute what optkit's LayerNorm does

Every kit builds the component exactly as the core does (through its registration and a
``BuildContext`` over a small OPT spec whose sizes hypothesis draws) and checks:

- ``builds``: the factory returns what its kind's interface asks for, at every drawn size;
- ``shapes``: outputs have the shapes the core relies on;
- ``dtypes``: in every declared dtype usable on the device, outputs come back in that dtype and finite;
- ``no_hidden_state``: the same input twice gives the same output, whatever ran in between
  (a KV cache keeps only its documented state: what was stored in *that* cache);
- ``gradients``: with ``backward`` declared, gradients reach the float inputs and every trainable parameter;
- ``equivalence``: equal to a reference, when there is one: optkit's own component of that kind
  (``reference=`` names it; first-party names are their own reference), computed here from
  its definition with the component's own weights;
- ``capacity`` (KV caches only): a cache with a ``max_length`` refuses to overflow with an optkit error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from optkit.errors import ComponentError, OptkitError, SpecValidationError, UnknownComponentError
from optkit.interfaces import KVCache
from optkit.registration import Registration, Registry
from optkit.testing.conformance import (
    DEFAULT_EXAMPLES,
    ConformanceError,
    ConformanceReport,
    PropertyResult,
    Skip,
    Tolerance,
    _run,
)

COMPONENT_KINDS = ("mlp", "norm", "positional_embedding", "token_embedding", "linear", "kv_cache")
MODULE_PROPERTIES = ("builds", "shapes", "dtypes", "no_hidden_state", "gradients", "equivalence")
COMPONENT_PROPERTIES: dict[str, tuple[str, ...]] = {kind: MODULE_PROPERTIES for kind in COMPONENT_KINDS}
COMPONENT_PROPERTIES["kv_cache"] = MODULE_PROPERTIES + ("capacity",)
EQUIVALENCE_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-5)  # float32, same weights, same formula
MAX_POSITIONS = 64
PAD_TOKEN = 1


# -- sizes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """One drawn configuration: the spec's sizes and one call's inputs (plain data, printable)."""

    batch: int
    length: int
    heads: int
    head_dim: int
    ffn: int
    vocab: int
    past: int = 0
    pads: tuple[int, ...] = ()
    bias: bool = True
    chunks: tuple[int, ...] = (1,)
    seed: int = 0

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def describe(self) -> str:
        return (f"batch={self.batch} length={self.length} hidden_size={self.hidden} num_heads={self.heads} "
                f"ffn_dim={self.ffn} vocab_size={self.vocab} past={self.past} pads={list(self.pads)} "
                f"bias={self.bias} chunks={list(self.chunks)} seed={self.seed}")


@st.composite
def component_sizes(draw: st.DrawFn) -> Sizes:
    """Small sizes: the properties are about structure, not scale (tensors stay tiny and fast)."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    return Sizes(batch=batch, length=length, heads=draw(st.integers(1, 4)), head_dim=draw(st.sampled_from([2, 4, 8])),
                 ffn=draw(st.integers(1, 48)), vocab=draw(st.integers(8, 64)),
                 past=draw(st.integers(0, MAX_POSITIONS - 2 * length)),
                 pads=tuple(draw(st.integers(0, length - 1)) for _ in range(batch)), bias=draw(st.booleans()),
                 chunks=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))),
                 seed=draw(st.integers(0, 2**16)))


# -- reports -----------------------------------------------------------------------------------
@dataclass
class ComponentReport(ConformanceReport):
    """What ``check_component`` found, property by property (``backend`` is the component's name)."""

    kind: str = ""

    def __str__(self) -> str:
        lines = [f"conformance of {self.kind} '{self.backend}':"]
        lines += [f"  {r.status:7} {r.name}" + (f": {r.detail}" if r.detail else "") for r in self.results]
        return "\n".join(lines)


class ComponentConformanceError(ConformanceError):
    """A component failed one or more properties; ``.report`` has every result."""

    def __init__(self, report: ComponentReport) -> None:  # noqa: D107 - the message names kind and component
        self.report = report
        failures = [r for r in report.results if r.status == "failed"]
        lines = [f"{report.kind} '{report.backend}' fails {len(failures)} of {len(report.results)} "
                 "conformance properties:"]
        lines += [f"  - {r.name}: {r.detail}" for r in failures]
        lines.append(f"passed: {', '.join(report.passed) or 'none'}; skipped: {', '.join(report.skipped) or 'none'}")
        AssertionError.__init__(self, "\n".join(lines))


# -- the component under test -------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentSubject:
    """One registered component, built as the core builds it, on one device."""

    kind: str
    name: str
    registry: Registry
    params: dict[str, Any]
    device: torch.device
    max_examples: int
    reference: str | None
    shrink: bool = True

    @property
    def entry(self) -> Registration:
        return self.registry.get(self.kind, self.name)

    def spec(self, sizes: Sizes) -> Any:
        from optkit.spec import resolve_raw, validate_spec

        raw = resolve_raw("opt-tiny")
        raw["decoder"].update(hidden_size=sizes.hidden, num_heads=sizes.heads, ffn_dim=sizes.ffn,
                              vocab_size=sizes.vocab, max_positions=MAX_POSITIONS, bias=sizes.bias)
        raw["decoder"][self.kind] = {"name": self.name, "params": dict(self.params)}
        return validate_spec(raw, registry=self.registry)

    def context(self, sizes: Sizes) -> Any:
        from optkit.context import BuildContext

        return BuildContext(spec=self.spec(sizes), registry=self.registry, device=self.device, dtype=torch.float32)

    def validated_params(self) -> dict[str, Any]:
        return self.entry.params.model_validate(self.params).model_dump()

    def usable_dtypes(self) -> list[torch.dtype]:
        declared = [getattr(torch, name) for name in sorted(self.entry.capabilities.dtypes)]
        return [d for d in declared if not self.entry.unavailable_reasons(self.device, d)]

    def settings(self) -> settings:
        phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if self.shrink else [])
        return settings(max_examples=max(1, self.max_examples), deadline=None, derandomize=True, database=None,
                        verbosity=Verbosity.quiet, print_blob=False, phases=phases,
                        suppress_health_check=list(HealthCheck))


def _context(sizes: Sizes) -> str:
    return f"sizes: {sizes.describe()}"


# -- per kind: how to build one, feed it, and what comes out -------------------------------------
@dataclass(frozen=True)
class KindKit:
    """How a module kind is exercised: build it, make inputs, call it, the shapes the core needs."""

    build: Callable[[ComponentSubject, Sizes], nn.Module]
    inputs: Callable[[Sizes, torch.dtype, torch.device], dict[str, Tensor]]
    call: Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]]
    shapes: Callable[[Sizes], dict[str, tuple[int, ...]]]


def _generator(sizes: Sizes, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(sizes.seed * 7 + salt)


def _hidden_input(features: Callable[[Sizes], int]) -> Callable[[Sizes, torch.dtype, torch.device], dict[str, Tensor]]:
    def make(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        x = torch.randn(sizes.batch, sizes.length, features(sizes), generator=_generator(sizes))
        return {"x": x.to(device, dtype)}

    return make


def _built(subject: ComponentSubject, sizes: Sizes) -> Any:
    """``BuildContext.create`` of the kind: the core's own check of the factory's result."""
    try:
        return subject.context(sizes).create(subject.kind)
    except SpecValidationError as exc:
        raise AssertionError(f"params {subject.params} are refused: {exc}") from None
    except ComponentError as exc:
        raise AssertionError(f"{exc} ({_context(sizes)})") from None


def _module(thing: Any, interface: str, sizes: Sizes) -> nn.Module:
    if not isinstance(thing, nn.Module):
        raise AssertionError(f"built {type(thing).__name__}, not an nn.Module {interface} ({_context(sizes)})")
    return thing


def _build_mlp(subject: ComponentSubject, sizes: Sizes) -> nn.Module:
    return _module(_built(subject, sizes), "MLP", sizes)


def _build_norm(subject: ComponentSubject, sizes: Sizes) -> nn.Module:
    ctx = subject.context(sizes)
    _built(subject, sizes)
    try:
        return _module(ctx.norm(sizes.hidden), "Norm", sizes)
    except ComponentError as exc:
        raise AssertionError(f"{exc} ({_context(sizes)})") from None


def _build_linear(subject: ComponentSubject, sizes: Sizes) -> nn.Module:
    ctx = subject.context(sizes)
    _built(subject, sizes)
    try:
        return _module(ctx.linear(sizes.hidden, sizes.ffn, bias=sizes.bias), "linear layer", sizes)
    except ComponentError as exc:
        raise AssertionError(f"{exc} ({_context(sizes)})") from None


def _build_plain(interface: str) -> Callable[[ComponentSubject, Sizes], nn.Module]:
    return lambda subject, sizes: _module(_built(subject, sizes), interface, sizes)


def _token_inputs(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    ids = torch.randint(0, sizes.vocab, (sizes.batch, sizes.length), generator=_generator(sizes))
    for row, pads in enumerate(sizes.pads):
        ids[row, :pads] = PAD_TOKEN  # left padding, as a padded batch arrives
    return {"input_ids": ids.to(device)}


def _position_ids(sizes: Sizes) -> Tensor:
    """0-based positions after ``past`` cached tokens; -1 at left-padding slots (as the model computes them)."""
    ids = torch.arange(sizes.length).repeat(sizes.batch, 1) + sizes.past
    for row, pads in enumerate(sizes.pads):
        ids[row] = torch.arange(sizes.length) - pads + sizes.past
        ids[row, :pads] = -1
    return ids


def _position_inputs(sizes: Sizes, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    g = _generator(sizes)
    shape = (sizes.batch, sizes.heads, sizes.length, sizes.head_dim)
    return {"position_ids": _position_ids(sizes).to(device),
            "query": torch.randn(shape, generator=g).to(device, dtype),
            "key": torch.randn(shape, generator=g).to(device, dtype)}


def _call_positions(module: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    additive = module.additive(inputs["position_ids"])
    if additive is not None:
        out["additive"] = additive
    rotated = module.rotate(inputs["query"], inputs["key"], inputs["position_ids"])
    if not (isinstance(rotated, tuple) and len(rotated) == 2):
        raise AssertionError(f"rotate() returned {type(rotated).__name__}, not a (query, key) pair")
    out["query"], out["key"] = rotated
    return out


def _position_shapes(sizes: Sizes) -> dict[str, tuple[int, ...]]:
    heads = (sizes.batch, sizes.heads, sizes.length, sizes.head_dim)
    return {"additive": (sizes.batch, sizes.length, sizes.hidden), "query": heads, "key": heads}


KITS: dict[str, KindKit] = {
    "mlp": KindKit(_build_mlp, _hidden_input(lambda s: s.hidden), lambda m, i: {"output": m(i["x"])},
                   lambda s: {"output": (s.batch, s.length, s.hidden)}),
    "norm": KindKit(_build_norm, _hidden_input(lambda s: s.hidden), lambda m, i: {"output": m(i["x"])},
                    lambda s: {"output": (s.batch, s.length, s.hidden)}),
    "linear": KindKit(_build_linear, _hidden_input(lambda s: s.hidden), lambda m, i: {"output": m(i["x"])},
                      lambda s: {"output": (s.batch, s.length, s.ffn)}),
    "token_embedding": KindKit(_build_plain("TokenEmbedding"), _token_inputs,
                               lambda m, i: {"output": m(i["input_ids"])},
                               lambda s: {"output": (s.batch, s.length, s.hidden)}),
    "positional_embedding": KindKit(_build_plain("PositionalEmbedding"), _position_inputs, _call_positions,
                                    _position_shapes),
}


def _outputs(kit: KindKit, module: nn.Module, inputs: dict[str, Tensor], sizes: Sizes) -> dict[str, Tensor]:
    try:
        out = kit.call(module, inputs)
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(f"raised {type(exc).__name__}: {exc} ({_context(sizes)})") from exc
    for what, tensor in out.items():
        if not isinstance(tensor, Tensor):
            raise AssertionError(f"{what} is {type(tensor).__name__}, not a tensor ({_context(sizes)})")
    return out


# -- references: optkit's first-party components, from their definitions ------------------------
def _weights(module: nn.Module, names: Iterable[str], reference: str) -> dict[str, Tensor]:
    state = module.state_dict()
    missing = [n for n in names if n not in state]
    if missing:
        raise AssertionError(f"the reference '{reference}' reads the weights {', '.join(names)}; this component has "
                             f"{', '.join(state) or 'none'} (missing: {', '.join(missing)})")
    return {n: state[n] for n in names}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    tanh_gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    return {"relu": F.relu, "gelu": F.gelu, "gelu_new": tanh_gelu, "gelu_pytorch_tanh": tanh_gelu,
            "silu": F.silu, "swish": F.silu}[name]


def _ffn_reference(module: nn.Module, params: dict[str, Any], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """OPT's feed-forward: fc2(act(fc1(x))), ReLU by default."""
    state = module.state_dict()
    names = ["fc1.weight", "fc2.weight"] + [n for n in ("fc1.bias", "fc2.bias") if n in state]
    w = _weights(module, names, "ffn")
    act = _activation(params.get("activation", "relu"))
    hidden = act(F.linear(inputs["x"], w["fc1.weight"], w.get("fc1.bias")))
    return {"output": F.linear(hidden, w["fc2.weight"], w.get("fc2.bias"))}


def _layernorm_reference(module: nn.Module, params: dict[str, Any], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """torch's LayerNorm over the last dimension; no weight and no bias when not elementwise-affine."""
    affine = params.get("elementwise_affine", True)
    w = _weights(module, ("weight", "bias") if affine else (), "layernorm")
    x = inputs["x"]
    return {"output": F.layer_norm(x, (x.shape[-1],), w.get("weight"), w.get("bias"), params.get("eps", 1e-5))}


def _learned_positions_reference(module: nn.Module, params: dict[str, Any], inputs: dict[str, Tensor]
                                 ) -> dict[str, Tensor]:
    """OPT's learned positions: row ``position + offset`` (offset 2), added; q and k untouched."""
    table = _weights(module, ("weight",), "learned")["weight"]
    return {"additive": table[inputs["position_ids"] + params.get("offset", 2)],
            "query": inputs["query"], "key": inputs["key"]}


def _token_reference(module: nn.Module, params: dict[str, Any], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """A lookup table: row ``id`` of ``weight``."""
    return {"output": _weights(module, ("weight",), "learned")["weight"][inputs["input_ids"]]}


def _linear_reference(module: nn.Module, params: dict[str, Any], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """torch.nn.Linear: x W^T + b."""
    names = ("weight", "bias") if "bias" in module.state_dict() else ("weight",)
    w = _weights(module, names, "torch")
    return {"output": F.linear(inputs["x"], w["weight"], w.get("bias"))}


Reference = Callable[[nn.Module, dict[str, Any], dict[str, Tensor]], dict[str, Tensor]]
REFERENCES: dict[tuple[str, str], Reference] = {
    ("mlp", "ffn"): _ffn_reference,
    ("norm", "layernorm"): _layernorm_reference,
    ("positional_embedding", "learned"): _learned_positions_reference,
    ("token_embedding", "learned"): _token_reference,
    ("linear", "torch"): _linear_reference,
}
CACHE_REFERENCES = ("dynamic", "static")  # both are "every key stored so far, in order"


# -- comparing ---------------------------------------------------------------------------------
def _compare(what: str, got: Tensor, ref: Tensor, context: str, tol: Tolerance = EQUIVALENCE_TOLERANCE) -> None:
    if tuple(got.shape) != tuple(ref.shape):
        raise AssertionError(f"{what} has shape {tuple(got.shape)}, the reference's is {tuple(ref.shape)} ({context})")
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    excess = (got - ref).abs() - (tol.atol + tol.rtol * ref.abs())
    if bool((excess > 0).any()) or not bool(torch.isfinite(got).all()):
        index = tuple(int(i) for i in torch.unravel_index(excess.nan_to_num(math.inf).argmax(), excess.shape))
        raise AssertionError(f"{what}: off from the reference by {float((got - ref).abs()[index]):.3g} at index "
                             f"{list(index)} (got {float(got[index]):.6g}, reference {float(ref[index]):.6g}; "
                             f"tolerance {tol}) ({context})")


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """The core adds positional vectors to (batch, length, hidden): anything that broadcasts to it exactly."""
    try:
        return torch.broadcast_shapes(shape, expected) == torch.Size(expected)
    except RuntimeError:
        return False


# -- module properties ---------------------------------------------------------------------------
def _per_size(subject: ComponentSubject, test: Callable[[Sizes], None]) -> None:
    @subject.settings()
    @given(sizes=component_sizes())
    def run(sizes: Sizes) -> None:
        test(sizes)

    _run(run)


def _fresh(subject: ComponentSubject, sizes: Sizes, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(sizes.seed)
    return KITS[subject.kind].build(subject, sizes).to(subject.device, dtype)


def check_builds(subject: ComponentSubject) -> str:
    """The registration exists and, at every drawn size, builds what the core will accept."""
    try:
        entry = subject.entry
    except UnknownComponentError as exc:
        raise AssertionError(str(exc)) from None
    if subject.kind == "kv_cache":
        _per_size(subject, lambda sizes: _two_caches(subject, sizes))
    else:
        _per_size(subject, lambda sizes: _fresh(subject, sizes))
    return f"provided by {entry.provider}"


def _float32(subject: ComponentSubject) -> torch.dtype:
    if torch.float32 not in subject.usable_dtypes():
        raise Skip(f"float32 is not usable on {subject.device.type}: "
                   + "; ".join(subject.entry.unavailable_reasons(subject.device, torch.float32)))
    return torch.float32


def check_shapes(subject: ComponentSubject) -> str:
    """Outputs have the shapes the core uses them with (hidden_size wide, one row per token)."""
    dtype = _float32(subject)
    if subject.kind == "kv_cache":
        _per_size(subject, lambda sizes: _cache_run(subject, sizes, dtype))
        return f"{subject.max_examples} drawn sizes, update/get_seq_length/attended_length"
    kit = KITS[subject.kind]

    def test(sizes: Sizes) -> None:
        out = _outputs(kit, _fresh(subject, sizes), kit.inputs(sizes, dtype, subject.device), sizes)
        for what, expected in kit.shapes(sizes).items():
            if what in out and not _fits(tuple(out[what].shape), expected):
                raise AssertionError(f"{what} has shape {tuple(out[what].shape)}, the core needs {expected} "
                                     f"({_context(sizes)})")

    _per_size(subject, test)
    return f"{subject.max_examples} drawn sizes"


def check_dtypes(subject: ComponentSubject) -> str:
    """In each declared dtype usable here, outputs come back in that dtype, finite."""
    dtypes = subject.usable_dtypes()
    if not dtypes:
        raise Skip(f"no declared dtype is usable on {subject.device.type}")
    for dtype in dtypes:
        if subject.kind == "kv_cache":
            _per_size(subject, lambda sizes: _cache_run(subject, sizes, dtype))
            continue
        kit = KITS[subject.kind]

        def test(sizes: Sizes, dtype: torch.dtype = dtype) -> None:
            out = _outputs(kit, _fresh(subject, sizes, dtype), kit.inputs(sizes, dtype, subject.device), sizes)
            for what, tensor in out.items():
                if tensor.dtype != dtype:
                    raise AssertionError(f"{what} is {tensor.dtype} for a component and inputs in {dtype} "
                                         f"({_context(sizes)})")
                if not bool(torch.isfinite(tensor).all()):
                    raise AssertionError(f"{what} has NaN/inf values in {dtype} ({_context(sizes)})")

        _per_size(subject, test)
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_no_hidden_state(subject: ComponentSubject) -> str:
    """After a first call (one-time set-up such as lazy quantization is allowed), input A, then B, then A
    again: the same output for A both times, and the weights and buffers unchanged (a component that
    remembers calls changes outputs between training and generation)."""
    dtype = _float32(subject)
    if subject.kind == "kv_cache":
        _per_size(subject, lambda sizes: _caches_are_independent(subject, sizes, dtype))
        return "fresh caches start empty and share nothing"
    kit = KITS[subject.kind]

    def test(sizes: Sizes) -> None:
        module = _fresh(subject, sizes).eval()
        first_inputs = kit.inputs(sizes, dtype, subject.device)
        other = kit.inputs(Sizes(**{**sizes.__dict__, "seed": sizes.seed + 1}), dtype, subject.device)
        with torch.no_grad():
            _outputs(kit, module, other, sizes)  # one-time set-up at the first call (lazy quantization) is allowed
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            first = _outputs(kit, module, first_inputs, sizes)
            _outputs(kit, module, other, sizes)
            again = _outputs(kit, module, first_inputs, sizes)
        for what in first:
            if not torch.equal(first[what], again[what]):
                diff = float((first[what].double() - again[what].double()).abs().max())
                raise AssertionError(f"the same input gave a different {what} the second time (by up to {diff:.3g}): "
                                     f"the component keeps state between calls ({_context(sizes)})")
        for key, value in module.state_dict().items():
            if key not in state or not torch.equal(state[key], value):
                raise AssertionError(f"calling it changed its state_dict entry {key!r}: the component keeps state "
                                     f"between calls ({_context(sizes)})")

    _per_size(subject, test)
    return "eval mode, same input twice"


def check_gradients(subject: ComponentSubject) -> str:
    """With backward declared: float32 gradients reach every float input and every trainable parameter."""
    if not subject.entry.capabilities.backward:
        raise Skip("declares backward=False")
    dtype = _float32(subject)
    if subject.kind == "kv_cache":
        _per_size(subject, lambda sizes: _cache_gradients(subject, sizes))
        return "returned keys/values differentiate to the stored ones"
    kit = KITS[subject.kind]

    def test(sizes: Sizes) -> None:
        module = _fresh(subject, sizes).train()
        inputs = {k: (v.requires_grad_(True) if v.is_floating_point() else v)
                  for k, v in kit.inputs(sizes, dtype, subject.device).items()}
        out = _outputs(kit, module, inputs, sizes)
        g = _generator(sizes, salt=1)
        loss = sum((t * torch.randn(t.shape, generator=g).to(t.device, t.dtype)).sum() for t in out.values()
                   if t.requires_grad)
        if not isinstance(loss, Tensor):
            raise AssertionError(f"no output requires grad although inputs/parameters do: the component detaches "
                                 f"its result ({_context(sizes)})")
        try:
            loss.backward()
        except Exception as exc:
            raise AssertionError(f"backward raised {type(exc).__name__}: {exc} ({_context(sizes)})") from exc
        _require_grads({f"input {k}": v for k, v in inputs.items() if v.is_floating_point()}, sizes)
        _require_grads({f"parameter {k}": p for k, p in module.named_parameters() if p.requires_grad}, sizes)

    _per_size(subject, test)
    return "inputs and parameters"


def _require_grads(tensors: dict[str, Tensor], sizes: Sizes) -> None:
    missing = [name for name, t in tensors.items() if t.grad is None]
    if missing:
        raise AssertionError(f"no gradient reaches {', '.join(missing)} ({_context(sizes)})")
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t.grad).all())]
    if bad:
        raise AssertionError(f"NaN/inf gradient of {', '.join(bad)} ({_context(sizes)})")


def check_equivalence(subject: ComponentSubject) -> str:
    """Equal (float32) to the reference component computed from its definition with these weights."""
    dtype = _float32(subject)
    reference = subject.reference
    if subject.kind == "kv_cache":
        _per_size(subject, lambda sizes: _cache_run(subject, sizes, dtype, reorder=True))
        return "every update returns all keys/values stored so far, in order (the dynamic cache's definition)"
    if reference is None:
        raise Skip(f"no reference {subject.kind} (pass reference= naming one of: "
                   f"{', '.join(n for k, n in REFERENCES if k == subject.kind)})")
    if (subject.kind, reference) not in REFERENCES:
        raise AssertionError(f"no reference {subject.kind} named {reference!r} "
                             f"(references: {', '.join(n for k, n in REFERENCES if k == subject.kind)})")
    kit, formula, params = KITS[subject.kind], REFERENCES[(subject.kind, reference)], subject.validated_params()

    def test(sizes: Sizes) -> None:
        module = _fresh(subject, sizes).eval()
        inputs = kit.inputs(sizes, dtype, subject.device)
        with torch.no_grad():
            got, want = _outputs(kit, module, inputs, sizes), formula(module, params, inputs)
        for what, ref in want.items():
            if what not in got:
                raise AssertionError(f"returns no {what}; the reference '{reference}' does ({_context(sizes)})")
            _compare(what, got[what].expand_as(ref), ref, _context(sizes))

    _per_size(subject, test)
    return f"reference '{reference}', {EQUIVALENCE_TOLERANCE}"


# -- KV caches --------------------------------------------------------------------------------------
NUM_LAYERS = 2


def _new_cache(subject: ComponentSubject, sizes: Sizes, dtype: torch.dtype, max_length: int | None = None) -> KVCache:
    factory = _built(subject, sizes)
    try:
        cache = factory(batch_size=sizes.batch, max_length=max_length or sum(sizes.chunks) + sizes.past,
                        max_positions=MAX_POSITIONS, num_layers=NUM_LAYERS, num_heads=sizes.heads,
                        head_dim=sizes.head_dim, dtype=dtype, device=subject.device)
    except Exception as exc:
        raise AssertionError(f"the factory raised {type(exc).__name__}: {exc} ({_context(sizes)})") from exc
    if not isinstance(cache, KVCache):
        raise AssertionError(f"the factory returned {type(cache).__name__}, not an optkit.interfaces.KVCache "
                             f"({_context(sizes)})")
    stored = [cache.get_seq_length(layer) for layer in range(NUM_LAYERS)]
    if any(stored):
        raise AssertionError(f"a new cache already holds {stored} tokens per layer ({_context(sizes)})")
    return cache


def _chunk(sizes: Sizes, step: int, layer: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    g = _generator(sizes, salt=100 * step + layer)
    shape = (sizes.batch, sizes.heads, sizes.chunks[step], sizes.head_dim)
    return torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype)


def _cache_run(subject: ComponentSubject, sizes: Sizes, dtype: torch.dtype, reorder: bool = False) -> None:
    """Store ``chunks`` in both layers, one step at a time; after every update the cache returns all keys and
    values stored so far for that layer, in order, shaped (batch, heads, stored, head_dim), in ``dtype``."""
    cache = _new_cache(subject, sizes, dtype)
    stored: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(NUM_LAYERS)]
    for step, new in enumerate(sizes.chunks):
        expected_length = cache.attended_length(new)
        for layer in range(NUM_LAYERS):
            key, value = _chunk(sizes, step, layer, dtype, subject.device)
            stored[layer].append((key, value))
            try:
                got = cache.update(layer, key, value)
            except Exception as exc:
                raise AssertionError(f"update raised {type(exc).__name__}: {exc} ({_context(sizes)})") from exc
            context = f"layer {layer}, update {step}; {_context(sizes)}"
            total = sum(sizes.chunks[:step + 1])
            for what, tensor, parts in zip(("keys", "values"), got, zip(*stored[layer])):
                shape = (sizes.batch, sizes.heads, total, sizes.head_dim)
                if tuple(tensor.shape) != shape:
                    raise AssertionError(f"update returned {what} of shape {tuple(tensor.shape)}; after "
                                         f"{total} stored tokens it must be {shape} ({context})")
                if tensor.dtype != dtype:
                    raise AssertionError(f"update returned {what} in {tensor.dtype} for a cache in {dtype} ({context})")
                _compare(f"{what} returned by update", tensor, torch.cat(parts, dim=-2), context,
                         Tolerance(0.0, 0.0))
            if cache.get_seq_length(layer) != total:
                raise AssertionError(f"get_seq_length({layer}) is {cache.get_seq_length(layer)} after {total} "
                                     f"stored tokens ({context})")
        if expected_length != sum(sizes.chunks[:step + 1]):
            raise AssertionError(f"attended_length({new}) said {expected_length}, update returned "
                                 f"{sum(sizes.chunks[:step + 1])} keys ({_context(sizes)})")
    if reorder and sizes.batch > 1:
        _reorders(cache, stored, sizes, dtype, subject.device)


def _reorders(cache: KVCache, stored: list[list[tuple[Tensor, Tensor]]], sizes: Sizes, dtype: torch.dtype,
              device: torch.device) -> None:
    """reorder(beam_idx) (when implemented) selects batch rows of everything stored."""
    beams = torch.arange(sizes.batch - 1, -1, -1, device=device)
    try:
        cache.reorder(beams)
    except NotImplementedError:
        return
    key = torch.zeros(sizes.batch, sizes.heads, 1, sizes.head_dim, dtype=dtype, device=device)
    for layer in range(NUM_LAYERS):
        got, _ = cache.update(layer, key, key)
        want = torch.cat([k for k, _ in stored[layer]] + [key], dim=-2).index_select(0, beams)
        want[:, :, -1:] = 0
        _compare("keys after reorder", got, want, f"layer {layer}; {_context(sizes)}", Tolerance(0.0, 0.0))


def _two_caches(subject: ComponentSubject, sizes: Sizes) -> None:
    """Each call of the factory makes a new, empty cache."""
    if _new_cache(subject, sizes, torch.float32) is _new_cache(subject, sizes, torch.float32):
        raise AssertionError("the factory returned the same cache object twice: every call must make a fresh cache")


def _caches_are_independent(subject: ComponentSubject, sizes: Sizes, dtype: torch.dtype) -> None:
    """Two caches from one factory: writing one leaves the other as it was (no shared buffers)."""
    first, second = _new_cache(subject, sizes, dtype), _new_cache(subject, sizes, dtype)
    if first is second:
        raise AssertionError("the factory returned the same cache object twice: every call must make a fresh cache")
    key, value = _chunk(sizes, 0, 0, dtype, subject.device)
    kept = first.update(0, key, value)[0].clone()
    second.update(0, torch.full_like(key, 7.0), torch.full_like(value, 7.0))
    if first.get_seq_length(0) != sizes.chunks[0] or second.get_seq_length(0) != sizes.chunks[0]:
        raise AssertionError(f"two caches from one factory share their length: after one update each they hold "
                             f"{first.get_seq_length(0)} and {second.get_seq_length(0)} tokens ({_context(sizes)})")
    third = _new_cache(subject, sizes, dtype)
    again = third.update(0, key, value)[0]
    if not torch.equal(again, kept):
        raise AssertionError(f"a fresh cache returned other keys for the same update: caches share state "
                             f"({_context(sizes)})")


def _cache_gradients(subject: ComponentSubject, sizes: Sizes) -> None:
    cache = _new_cache(subject, sizes, torch.float32)
    key, value = (t.requires_grad_(True) for t in _chunk(sizes, 0, 0, torch.float32, subject.device))
    keys, values = cache.update(0, key, value)
    if not (keys.requires_grad and values.requires_grad):
        raise AssertionError(f"the keys/values update returns do not require grad although the stored ones do "
                             f"({_context(sizes)})")
    (keys.sum() + values.sum()).backward()
    _require_grads({"stored key": key, "stored value": value}, sizes)


def check_capacity(subject: ComponentSubject) -> str:
    """A cache with a max_length refuses tokens beyond it with an optkit error (never wraps or grows silently)."""
    if subject.kind != "kv_cache":
        raise Skip("applies to KV caches only")
    dtype = _float32(subject)
    sizes = Sizes(batch=1, length=1, heads=1, head_dim=2, ffn=1, vocab=8, chunks=(2,))
    cache = _new_cache(subject, sizes, dtype, max_length=3)
    if cache.max_length is None:
        return "grows without bound (max_length is None)"
    if cache.max_length != 3:
        raise AssertionError(f"asked for max_length=3, the cache says max_length={cache.max_length}")
    key = torch.zeros(1, 1, 2, 2, dtype=dtype, device=subject.device)
    cache.update(0, key, key)
    try:
        cache.update(0, key, key)
    except OptkitError as exc:
        return f"overflow refused: {type(exc).__name__}"
    except Exception as exc:
        raise AssertionError(f"overflowing max_length=3 raised {type(exc).__name__}: {exc}; raise an optkit error "
                             "(InputError) that says the cache is full") from exc
    raise AssertionError(f"stored 4 tokens in a cache with max_length=3 without an error (it holds "
                         f"{cache.get_seq_length(0)}): overflow must raise InputError")


PROPERTY_CHECKS: dict[str, Callable[[ComponentSubject], str]] = {
    "builds": check_builds,
    "shapes": check_shapes,
    "dtypes": check_dtypes,
    "no_hidden_state": check_no_hidden_state,
    "gradients": check_gradients,
    "equivalence": check_equivalence,
    "capacity": check_capacity,
}


# -- entry points --------------------------------------------------------------------------------
def make_component_subject(kind: str, name: str, *, params: dict[str, Any] | None = None,
                           registry: Registry | None = None, device: torch.device | str = "cpu",
                           max_examples: int = DEFAULT_EXAMPLES, reference: str | None = None,
                           shrink: bool = True) -> ComponentSubject:
    if kind not in COMPONENT_KINDS:
        raise ValueError(f"no conformance kit for kind {kind!r} (kits: {', '.join(COMPONENT_KINDS)}; attention: "
                         "check_attention_backend)")
    if registry is None:
        from optkit import registry
    if reference is None and ((kind, name) in REFERENCES or (kind == "kv_cache" and name in CACHE_REFERENCES)):
        reference = name  # optkit's own components are their own definition
    return ComponentSubject(kind, name, registry, dict(params or {}), torch.device(device), max_examples, reference,
                            shrink)


def run_component_property(subject: ComponentSubject, prop: str) -> PropertyResult:
    """One property's verdict; a crash in the kit's own set-up (e.g. the factory raised) fails it too."""
    if prop not in COMPONENT_PROPERTIES[subject.kind]:
        raise KeyError(f"unknown {subject.kind} property {prop!r} "
                       f"(properties: {', '.join(COMPONENT_PROPERTIES[subject.kind])})")
    try:
        detail = PROPERTY_CHECKS[prop](subject)
    except Skip as skip:
        return PropertyResult(prop, "skipped", str(skip))
    except AssertionError as exc:
        return PropertyResult(prop, "failed", str(exc))
    except Exception as exc:  # noqa: BLE001 - reported as this property's failure
        return PropertyResult(prop, "failed", f"{type(exc).__name__}: {exc}")
    return PropertyResult(prop, "passed", detail)


def check_component(kind: str, name: str, *, params: dict[str, Any] | None = None, registry: Registry | None = None,
                    device: torch.device | str = "cpu", max_examples: int = DEFAULT_EXAMPLES,
                    reference: str | None = None, only: Iterable[str] | None = None, skip: Iterable[str] = (),
                    shrink: bool = True) -> ComponentReport:
    """Run every property of ``kind``'s kit (or ``only`` some) on the registered component ``name``.

    ``reference`` names optkit's component the result must equal with the same weights ("ffn",
    "layernorm", "learned", "torch"); optkit's own components are checked against their own
    definition. Returns the report when everything passes or is skipped; raises
    ``ComponentConformanceError`` naming each failed property and the sizes that show it.
    """
    subject = make_component_subject(kind, name, params=params, registry=registry, device=device,
                                     max_examples=max_examples, reference=reference, shrink=shrink)
    chosen = [p for p in (list(only) if only is not None else COMPONENT_PROPERTIES[kind]) if p not in set(skip)]
    report = ComponentReport(name, [run_component_property(subject, p) for p in chosen], kind=kind)
    if report.failed:
        raise ComponentConformanceError(report)
    return report


def _kit(kind: str) -> Callable[..., ComponentReport]:
    def check(name: str, **kwargs: Any) -> ComponentReport:
        return check_component(kind, name, **kwargs)

    check.__name__ = f"check_{kind}"
    check.__doc__ = f"``check_component('{kind}', name, ...)``: the {kind} kit."
    return check


check_mlp = _kit("mlp")
check_norm = _kit("norm")
check_positional_embedding = _kit("positional_embedding")
check_token_embedding = _kit("token_embedding")
check_linear = _kit("linear")
check_kv_cache = _kit("kv_cache")
