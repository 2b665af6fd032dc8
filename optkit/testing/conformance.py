"""The attention-backend conformance kit: every property a backend owes the core.

The eager backend is the definition of correct (docs/architecture.md). A backend passes
when it computes eager's function on random shapes, padding and cache offsets, keeps
fully masked rows at exactly zero in every dtype it declares, differentiates like eager,
does what its `Capabilities` say (and refuses what they do not), and gives the same
logits inside a whole model, whether built with it or switched to it by `set_backend`.

Each property runs on its own and reports what failed in words a plugin author can act
on, including the exact case (``AttentionCase``) that reproduces it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal

import torch
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
from torch import Tensor

from optkit.errors import BackendUnavailableError, SpecValidationError, UnknownComponentError
from optkit.interfaces import AttentionKernel, AttentionMask
from optkit.registration import ALL_DTYPES, Registration, Registry
from optkit.testing.cases import AttentionCase, attention_cases, empty_row_cases

try:
    _ExceptionGroup = BaseExceptionGroup
except NameError:  # Python 3.10: hypothesis depends on the backport
    from exceptiongroup import BaseExceptionGroup as _ExceptionGroup

# Random cases per property; OPTKIT_CONFORMANCE_EXAMPLES raises it for a deep run or lowers it in CI.
DEFAULT_EXAMPLES = int(os.environ.get("OPTKIT_CONFORMANCE_EXAMPLES", "40"))
KNOWN_DEVICES = ("cpu", "cuda", "mps", "xpu")
DROPOUT_SAMPLES = 200


@dataclass(frozen=True)
class Tolerance:
    """``|got - eager| <= atol + rtol * |eager|`` elementwise (torch.isclose's rule)."""

    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g}"


# A backend's result in dtype d is compared with eager computed in float64 on the same
# (rounded) inputs: |got - exact| <= atol + rtol * |exact| + 2 * max|eager_d - exact|, i.e.
# the tolerance below plus twice the error eager itself makes in d (scores that round to
# d carry errors that grow with their magnitude; no backend can be asked to beat that).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2),
}
# float32 gradients of q, k and v, same rule, with atol scaled by the largest exact gradient
# (at least 1): softmax's backward subtracts terms of that size, so its rounding is relative to them.
GRADIENT_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4)
LOGITS_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-5)  # float32 logits of the tiny model at real tokens


class Skip(Exception):
    """A property that does not apply to this backend (it declares it does not need it)."""


@dataclass(frozen=True)
class PropertyResult:
    name: str
    status: Literal["passed", "failed", "skipped"]
    detail: str = ""


@dataclass
class ConformanceReport:
    """What ``check_attention_backend`` found, property by property."""

    backend: str
    results: list[PropertyResult] = field(default_factory=list)

    def names(self, status: str) -> list[str]:
        return [r.name for r in self.results if r.status == status]

    @property
    def passed(self) -> list[str]:
        return self.names("passed")

    @property
    def failed(self) -> list[str]:
        return self.names("failed")

    @property
    def skipped(self) -> list[str]:
        return self.names("skipped")

    def __str__(self) -> str:
        lines = [f"conformance of attention backend '{self.backend}':"]
        lines += [f"  {r.status:7} {r.name}" + (f": {r.detail}" if r.detail else "") for r in self.results]
        return "\n".join(lines)


class ConformanceError(AssertionError):
    """A backend failed one or more properties; ``.report`` has every result."""

    def __init__(self, report: ConformanceReport) -> None:
        self.report = report
        failures = [r for r in report.results if r.status == "failed"]
        lines = [f"attention backend '{report.backend}' fails {len(failures)} of {len(report.results)} "
                 "conformance properties:"]
        lines += [f"  - {r.name}: {r.detail}" for r in failures]
        lines.append(f"passed: {', '.join(report.passed) or 'none'}; skipped: {', '.join(report.skipped) or 'none'}")
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (pytest-xdist sends failures between processes)
        return type(self), (self.report,)


# -- the backend under test --------------------------------------------------------------------
@dataclass(frozen=True)
class Subject:
    """One backend, as the core will build it: registered name + params, on one device."""

    name: str
    registry: Registry
    params: dict[str, Any]
    device: torch.device
    max_examples: int
    shrink: bool = True

    @property
    def entry(self) -> Registration:
        return self.registry.get("attention", self.name)

    def spec(self, attention: Any = None) -> Any:
        """The tiny model's spec with this backend (or ``attention``), checked against our registry."""
        from optkit.spec import resolve_raw, validate_spec

        raw = resolve_raw("opt-tiny")
        raw["decoder"]["attention"] = attention or {"name": self.name, "params": dict(self.params)}
        return validate_spec(raw, registry=self.registry)

    def kernel(self, dtype: torch.dtype = torch.float32) -> AttentionKernel:
        from optkit.context import BuildContext

        ctx = BuildContext(spec=self.spec(), registry=self.registry, device=self.device, dtype=dtype)
        kernel = ctx.create("attention")
        return kernel.to(self.device) if isinstance(kernel, torch.nn.Module) else kernel

    def usable(self, dtype: torch.dtype) -> bool:
        return not self.entry.unavailable_reasons(self.device, dtype)

    def usable_dtypes(self) -> list[torch.dtype]:
        """Declared dtypes that can run on this device (its check() may still refuse some)."""
        declared = [getattr(torch, name) for name in sorted(self.entry.capabilities.dtypes)]
        return [dtype for dtype in declared if self.usable(dtype)]

    def settings(self, fraction: float = 1.0) -> settings:
        """Reproducible (derandomized, no example database written to the project) and quiet."""
        phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if self.shrink else [])
        return settings(max_examples=max(1, int(self.max_examples * fraction)), deadline=None, derandomize=True,
                        database=None, verbosity=Verbosity.quiet, print_blob=False, phases=phases,
                        suppress_health_check=list(HealthCheck))


def _eager() -> AttentionKernel:
    """The eager backend: the definition of correct."""
    from optkit_attention_eager import EagerAttention

    return EagerAttention()


def _exact(*tensors: Tensor) -> list[Tensor]:
    """The tensors as float64 on the CPU: the inputs of the exact reference."""
    return [t.detach().to("cpu", torch.float64) for t in tensors]


def _eager_pair(case: AttentionCase, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask,
                need_weights: bool = False) -> tuple[Any, Any]:
    """Eager in float64 on the CPU (exact), and eager in the inputs' own dtype and device."""
    exact = _eager()(*_exact(q, k, v), case.mask("cpu"), scale=case.scale, need_weights=need_weights)
    own = _eager()(q, k, v, mask, scale=case.scale, need_weights=need_weights)
    return exact, own


def _own_error(own: Tensor, exact: Tensor) -> float:
    """How far eager itself is from exact in the inputs' dtype (inf when it is not finite)."""
    own = own.detach().to("cpu", torch.float64)
    if not own.numel():
        return 0.0
    if not bool(torch.isfinite(own).all()):
        return math.inf
    return float((own - exact).abs().max())


def _call(kernel: AttentionKernel, case: AttentionCase, *tensors: Any, **kwargs: Any) -> Any:
    """The kernel's result; an exception becomes a failure that names the case."""
    try:
        return kernel(*tensors, **kwargs)
    except Exception as exc:
        raise AssertionError(f"raised {type(exc).__name__}: {exc} (case: {case.describe()})") from exc


def _compare(what: str, got: Tensor, ref: Tensor, tol: Tolerance, context: str, slack: float = 0.0,
             where: Tensor | None = None, scale: float = 1.0) -> None:
    """Fail with the worst element unless ``got`` matches ``ref`` (optionally only at ``where``)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise AssertionError(f"{what} has shape {tuple(got.shape)}, eager's is {tuple(ref.shape)} ({context})")
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    finite = torch.isfinite(got) if where is None else torch.isfinite(got) | ~where
    if not bool(finite.all()):
        raise AssertionError(f"{what} has {int((~finite).sum())} NaN/inf values where eager is finite ({context})")
    excess = (got - ref).abs() - (tol.atol * scale + slack + tol.rtol * ref.abs())
    if where is not None:
        excess = excess.masked_fill(~where, -1.0)
    if bool((excess > 0).any()):
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{what}: off from eager by {float((got - ref).abs()[index]):.3g} at index {list(index)} "
            f"(got {float(got[index]):.6g}, eager {float(ref[index]):.6g}; tolerance {tol}"
            + (f", atol x {scale:.3g}" if scale != 1.0 else "") + (f" + {slack:.3g}" if slack else "")
            + f") ({context})")


def _context(case: AttentionCase) -> str:
    return f"case: {case.describe()}"


def _run(test: Callable[[], None]) -> None:
    """Run a hypothesis test; several distinct failures are reported together."""
    try:
        test()
    except _ExceptionGroup as group:  # hypothesis reports distinct bugs as a group
        raise AssertionError("; ".join(str(exc) for exc in group.exceptions)) from group


def _supported(case: AttentionCase, subject: Subject) -> bool:
    caps = subject.entry.capabilities
    return (caps.padding or case.padding == "none") and (caps.kv_cache or case.past == 0)


def _require_float32(subject: Subject) -> None:
    if not subject.usable(torch.float32):
        raise Skip(f"float32 is not usable on {subject.device.type}: "
                   + "; ".join(subject.entry.unavailable_reasons(subject.device, torch.float32)))


# -- properties --------------------------------------------------------------------------------
def check_registration(subject: Subject) -> str:
    """Registered under its name, builds an AttentionKernel named like its registration that owns
    no weights (kernels are compute only, so a swap never changes a checkpoint key)."""
    try:
        entry = subject.entry
    except UnknownComponentError as exc:
        raise AssertionError(str(exc)) from None
    try:
        kernel = subject.kernel()
    except SpecValidationError as exc:
        raise AssertionError(f"params {subject.params} are refused: {exc}") from None
    if not isinstance(kernel, AttentionKernel):
        raise AssertionError(f"the factory returned {type(kernel).__name__}, not an optkit.interfaces.AttentionKernel")
    if kernel.name != subject.name:
        raise AssertionError(f"the kernel's name is {kernel.name!r} but it is registered as {subject.name!r}: "
                             f"set `name = {subject.name!r}` on the class (the model reads capabilities by it)")
    owned = list(kernel.state_dict())
    if owned:
        raise AssertionError(f"the kernel owns state {owned}: kernels are compute only, weights belong to the "
                             "core (otherwise switching backends changes checkpoint keys)")
    return f"provided by {entry.provider}"


def check_capabilities(subject: Subject) -> str:
    """Undeclared dtypes and devices are refused by registry.require_usable with the reason
    (never computed wrongly); declared ones on this device are usable unless check() says why."""
    caps, problems, notes = subject.entry.capabilities, [], []
    for dtype_name in sorted(ALL_DTYPES - caps.dtypes):
        problems += _refusal(subject, subject.device, getattr(torch, dtype_name), f"dtype {dtype_name}", dtype_name)
    for device_type in sorted(set(KNOWN_DEVICES) - caps.devices):
        problems += _refusal(subject, torch.device(device_type), torch.float32, f"device {device_type}", device_type)
    for dtype_name in sorted(caps.dtypes):
        reasons = subject.entry.unavailable_reasons(subject.device, getattr(torch, dtype_name))
        if reasons:
            notes.append(f"{dtype_name} refused here by its check(): {'; '.join(reasons)}")
    elsewhere = sorted(caps.devices - {subject.device.type})
    if elsewhere:
        notes.append(f"declared devices not exercised here (pass device=...): {', '.join(elsewhere)}")
    if problems:
        raise AssertionError("; ".join(problems))
    return "; ".join(notes)


def _refusal(subject: Subject, device: torch.device, dtype: torch.dtype, what: str, token: str) -> list[str]:
    try:
        subject.registry.require_usable("attention", subject.name, device, dtype)
    except BackendUnavailableError as exc:
        return [] if token in str(exc) else [f"the refusal of undeclared {what} does not name it: {exc}"]
    return [f"{what} is not declared, yet registry.require_usable accepts it"]


def check_equals_eager(subject: Subject) -> str:
    """float32 outputs equal eager's on random shapes, head dims 8..128, lengths from 1 across
    chunk sizes, cache offsets, left/right/scattered padding (fully padded rows included)."""
    _require_float32(subject)
    _matches_eager(subject, torch.float32, 1.0)
    return f"{subject.max_examples} random cases, {TOLERANCES[torch.float32]}"


def check_reduced_precision(subject: Subject) -> str:
    """Every declared float16/bfloat16 usable here: as close to exact as eager is, finite, in the input dtype."""
    dtypes = [d for d in subject.usable_dtypes() if d != torch.float32]
    if not dtypes:
        raise Skip(f"declares no float16/bfloat16 usable on {subject.device.type}")
    for dtype in dtypes:
        _matches_eager(subject, dtype, 0.5)
    return ", ".join(f"{_dtype_name(d)} ({TOLERANCES[d]})" for d in dtypes)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _matches_eager(subject: Subject, dtype: torch.dtype, fraction: float) -> None:
    kernel, tol = subject.kernel(dtype), TOLERANCES[dtype]

    def test(case: AttentionCase) -> None:
        q, k, v, mask = case.tensors(dtype, subject.device)
        got = _call(kernel, case, q, k, v, mask, scale=case.scale).output
        _check_dtype(got, dtype, case)
        exact, own = _eager_pair(case, q, k, v, mask)
        _compare(f"{_dtype_name(dtype)} output", got, exact.output, tol, _context(case),
                 slack=2 * _own_error(own.output, exact.output))

    _run_cases(subject, fraction, test)


# Hypothesis draws long lengths from short lists (17, 63, 64, 65, ...) and can only shrink them to an
# earlier entry of the list; a bug at a block boundary is then reported at, say, q_len=127 with
# kv_len=223. After hypothesis, the kit shrinks one field at a time (lengths one by one) while the
# failure persists, so the report shows the boundary itself (kv_len=17 for a 16-wide block).
FURTHER_SHRINK_BUDGET = 300


def _run_cases(subject: Subject, fraction: float, test: Callable[[AttentionCase], None]) -> None:
    """``test`` on random cases; a failure is reported at the smallest case that still fails."""
    failing: list[AttentionCase] = []

    @subject.settings(fraction)
    @given(case=attention_cases(subject.entry.capabilities))
    def run(case: AttentionCase) -> None:
        try:
            test(case)
        except AssertionError:
            failing.append(case)
            raise

    empty_rows = next((c for c in empty_row_cases() if c.padding != "none" and _supported(c, subject)), None)
    if empty_rows is not None:  # every random run also meets a fully masked row, first
        run = example(case=empty_rows)(run)
    try:
        _run(run)
    except AssertionError as exc:
        if not (subject.shrink and failing):
            raise
        _, error = _shrink_further(failing[-1], test, subject)
        if error is None:
            raise
        raise AssertionError(str(error)) from exc


def _shrink_further(case: AttentionCase, test: Callable[[AttentionCase], None], subject: Subject
                    ) -> tuple[AttentionCase, AssertionError | None]:
    """Greedy: take the first simpler variant that still fails, until none does or the budget is spent."""
    error: AssertionError | None = None
    budget = FURTHER_SHRINK_BUDGET
    improved = True
    while improved and budget > 0:
        improved = False
        for candidate in _simpler(case):
            if budget <= 0:
                break
            if candidate == case or not _supported(candidate, subject):
                continue
            budget -= 1
            try:
                test(candidate)
            except AssertionError as exc:
                case, error, improved = candidate, exc, True
                break
    return case, error


def _simpler(case: AttentionCase) -> list[AttentionCase]:
    """Variants of ``case`` one step simpler, the biggest steps first; every one a valid case."""

    def fit(**changes: Any) -> AttentionCase:
        new = replace(case, **changes)
        batch_pads = tuple(min(p, new.kv_len) for p in new.pads[:new.batch])
        return replace(new, pads=batch_pads)

    out = [fit(batch=1), fit(batch=case.batch - 1), fit(heads=1), fit(head_dim=8),
           fit(head_dim=case.head_dim - 8), fit(padding="none", pads=(), slots=0)]
    for length in ("q_len", "past"):
        value, low = getattr(case, length), 1 if length == "q_len" else 0
        out += [fit(**{length: v}) for v in sorted({low, value // 2, value - 1}) if low <= v < value]
    out += [fit(slots=max(case.slots - 1, 1 if case.padding == "slots" else 0))]
    out += [fit(pads=case.pads[:i] + (v,) + case.pads[i + 1:]) for i, pad in enumerate(case.pads)
            for v in sorted({0, pad - 1}) if 0 <= v < pad]
    out += [fit(causal=True), fit(spread=1.0), fit(scale=1.0), fit(seed=0)]
    return [c for c in out if c.batch >= 1 and c.head_dim >= 8 and c.q_len >= 1 and c.past >= 0]


def _check_dtype(got: Tensor, expected: torch.dtype, case: AttentionCase) -> None:
    if got.dtype != expected:
        raise AssertionError(f"output dtype is {got.dtype}, the inputs' is {expected} (case: {case.describe()})")


def check_fully_masked_rows(subject: Subject) -> str:
    """Query rows that may see no key come out as exactly 0, never NaN, in every usable dtype."""
    cases = [c for c in empty_row_cases() if _supported(c, subject)]
    if not any(c.padding != "none" for c in cases):
        raise Skip("declares padding=False: no query row can be fully masked")
    dtypes = subject.usable_dtypes()
    if not dtypes:
        raise Skip(f"no declared dtype is usable on {subject.device.type}")
    for dtype in dtypes:
        kernel = subject.kernel(dtype)
        for case in cases:
            _empty_rows_are_zero(kernel, case, dtype, subject.device)
    return f"{len(cases)} cases in {', '.join(str(d).removeprefix('torch.') for d in dtypes)}"


def _empty_rows_are_zero(kernel: AttentionKernel, case: AttentionCase, dtype: torch.dtype,
                         device: torch.device) -> None:
    q, k, v, mask = case.tensors(dtype, device)
    got = _call(kernel, case, q, k, v, mask, scale=case.scale).output
    name = str(dtype).removeprefix("torch.")
    bad = ~torch.isfinite(got)
    if bool(bad.any()):
        raise AssertionError(f"{int(bad.sum())} NaN/inf values in {name} with fully masked rows "
                             f"(case: {case.describe()})")
    empty = (~mask.query_has_keys).to(device).expand_as(got)
    if bool((got[empty] != 0).any()):
        raise AssertionError(f"rows that may attend to no key must be exactly 0 in {name}, got values up to "
                             f"{float(got[empty].abs().max()):.3g} (case: {case.describe()})")


def check_gradients(subject: Subject) -> str:
    """With backward declared: float32 gradients of q, k and v equal eager's (finite everywhere)."""
    if not subject.entry.capabilities.backward:
        raise Skip("declares backward=False")
    _require_float32(subject)
    kernel = subject.kernel()

    def test(case: AttentionCase) -> None:
        q, k, v, mask = case.tensors(torch.float32, subject.device)
        upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(case.seed)).to(subject.device)
        got = _grads(kernel, case, q, k, v, mask, upstream)  # first: a broken kernel fails fast
        exact = _grads(_eager(), case, *_exact(q, k, v), case.mask("cpu"), *_exact(upstream))
        own = _grads(_eager(), case, q, k, v, mask, upstream)
        scale = max([1.0] + [float(g.abs().max()) for g in exact if g.numel()])
        for name, ours, ref, eager in zip("qkv", got, exact, own):
            _compare(f"gradient of {name}", ours, ref, GRADIENT_TOLERANCE, _context(case),
                     slack=2 * _own_error(eager, ref), scale=scale)

    _run_cases(subject, 0.5, test)
    return f"{GRADIENT_TOLERANCE} (atol x the largest gradient)"


def _grads(kernel: AttentionKernel, case: AttentionCase, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask,
           upstream: Tensor) -> list[Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = _call(kernel, case, *leaves, mask, scale=case.scale).output
    if not out.requires_grad:
        raise AssertionError(f"the output does not require grad although q, k, v do: backward is declared but "
                             f"the kernel detaches its result (case: {case.describe()})")
    try:
        out.backward(upstream)
    except Exception as exc:
        raise AssertionError(f"backward raised {type(exc).__name__}: {exc} (case: {case.describe()})") from exc
    missing = [name for name, leaf in zip("qkv", leaves) if leaf.grad is None]
    if missing:
        raise AssertionError(f"no gradient reaches {', '.join(missing)} (case: {case.describe()})")
    return [leaf.grad for leaf in leaves]


DROPOUT_CASE = AttentionCase(batch=2, heads=2, head_dim=8, q_len=5, past=2, padding="left", pads=(0, 5), seed=3)


def check_dropout(subject: Subject) -> str:
    """dropout=True: dropout_p > 0 drops probabilities with 1/(1-p) rescaling (unbiased, never NaN);
    dropout=False: dropout_p > 0 raises an error that says so, rather than silently not dropping."""
    case = DROPOUT_CASE if _supported(DROPOUT_CASE, subject) else AttentionCase(2, 2, 8, 5, 0, seed=3)
    dtype = torch.float32 if subject.usable(torch.float32) else next(iter(subject.usable_dtypes()), None)
    if dtype is None:
        raise Skip(f"no declared dtype is usable on {subject.device.type}")
    kernel = subject.kernel(dtype)
    q, k, v, mask = case.tensors(dtype, subject.device)
    if not subject.entry.capabilities.dropout:
        return _refuses_dropout(kernel, case, q, k, v, mask)
    return _drops_probabilities(kernel, case, q, k, v, mask)


def _refuses_dropout(kernel: AttentionKernel, case: AttentionCase, *tensors: Any) -> str:
    try:
        kernel(*tensors, scale=case.scale, dropout_p=0.5)
    except Exception as exc:
        if "dropout" not in str(exc).lower():
            raise AssertionError(f"refuses dropout_p=0.5 with an error that does not mention dropout: "
                                 f"{type(exc).__name__}: {exc}") from exc
        return f"refuses dropout_p > 0: {type(exc).__name__}: {exc}"
    raise AssertionError("declares dropout=False but accepted dropout_p=0.5 without an error; it must raise, "
                         "or training with attention dropout silently runs without it")


def _drops_probabilities(kernel: AttentionKernel, case: AttentionCase, q: Tensor, k: Tensor, v: Tensor,
                         mask: AttentionMask) -> str:
    expected = _eager()(*_exact(q, k, v), case.mask("cpu"), scale=case.scale).output
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        samples = torch.stack([_call(kernel, case, q, k, v, mask, scale=case.scale, dropout_p=0.5).output.float()
                               for _ in range(DROPOUT_SAMPLES)])
    if not bool(torch.isfinite(samples).all()):
        raise AssertionError(f"NaN/inf with dropout_p=0.5 (case: {case.describe()})")
    samples = samples.to("cpu", torch.float64)
    empty = (~mask.query_has_keys).to("cpu").expand_as(expected)
    if bool((samples[:, empty] != 0).any()):
        raise AssertionError(f"fully masked rows are not 0 with dropout_p=0.5 (case: {case.describe()})")
    if not bool(((samples - expected).abs() > 1e-3).any()):
        raise AssertionError("dropout_p=0.5 changes nothing: dropout is declared but ignored")
    _no_dropout_matches(kernel, case, q, k, v, mask, expected)
    mean, bound = samples.mean(0), 6 * samples.std(0) / math.sqrt(DROPOUT_SAMPLES) + 1e-4
    if bool(((mean - expected).abs() > bound).any()):
        raise AssertionError(_bias_diagnosis(mean, expected, bound, 0.5, case))
    return f"unbiased over {DROPOUT_SAMPLES} samples at dropout_p=0.5"


def _no_dropout_matches(kernel: AttentionKernel, case: AttentionCase, q: Tensor, k: Tensor, v: Tensor,
                        mask: AttentionMask, expected: Tensor) -> None:
    """The dropout check compares sample means with eager's output: it means something only when the
    kernel's own output without dropout is eager's (otherwise the bug is elsewhere, e.g. the mask)."""
    plain = _call(kernel, case, q, k, v, mask, scale=case.scale, dropout_p=0.0).output
    tol = TOLERANCES.get(plain.dtype, TOLERANCES[torch.float32])
    try:
        _compare("output with dropout_p=0", plain, expected, tol, _context(case), slack=1e-3)
    except AssertionError as exc:
        raise AssertionError(f"dropout cannot be judged: without dropout the kernel already differs from eager "
                             f"(a mask, offset or scale bug, not dropout scaling; see equals_eager): {exc}") from None


def _bias_diagnosis(mean: Tensor, expected: Tensor, bound: Tensor, p: float, case: AttentionCase) -> str:
    """Why the mean of dropped-out outputs is off, from what was observed: each scaling mistake predicts
    the mean exactly, so a hint is given only when its prediction matches."""
    error = (mean - expected).abs()
    index = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
    where = (f"worst at index {list(index)} (query {index[2]}): mean {float(mean[index]):.6g}, "
             f"no-dropout output {float(expected[index]):.6g}; case: {case.describe()}")
    head = f"the mean of {DROPOUT_SAMPLES} outputs with dropout_p={p:g} is off the no-dropout output by up to " \
           f"{float(error.max()):.3g}"
    if bool(((mean - (1 - p) * expected).abs() <= bound).all()):
        return f"{head}, and equals (1-p) times it: kept probabilities must be scaled by 1/(1-p) ({where})"
    if bool(((mean - expected / (1 - p)).abs() <= bound).all()):
        return f"{head}, and equals it divided by (1-p): the 1/(1-p) rescaling is applied twice ({where})"
    return (f"{head}; it matches neither that output nor (1-p) times it (unscaled dropout), so the dropout path "
            f"computes another function than the path without dropout: compare the mask, offset and padding "
            f"it applies ({where})")


WEIGHTS_CASE = AttentionCase(batch=2, heads=2, head_dim=16, q_len=4, past=3, padding="left", pads=(5, 0),
                             scale=0.25, seed=5)


def check_attention_weights(subject: Subject) -> str:
    """need_weights=True: weights equal eager's when declared; when not, the kernel raises or
    returns None (never weights that are wrong)."""
    _require_float32(subject)
    declared = subject.entry.capabilities.attention_weights
    case = WEIGHTS_CASE if _supported(WEIGHTS_CASE, subject) else AttentionCase(2, 2, 16, 4, 0, scale=0.25)
    q, k, v, mask = case.tensors(torch.float32, subject.device)
    try:
        result = subject.kernel()(q, k, v, mask, scale=case.scale, need_weights=True)
    except Exception as exc:
        if declared:
            raise AssertionError(f"declares attention_weights=True but need_weights=True raised "
                                 f"{type(exc).__name__}: {exc}") from exc
        return f"need_weights=True is refused: {type(exc).__name__}: {exc}"
    if result.weights is None:
        if declared:
            raise AssertionError("declares attention_weights=True but returned weights=None for need_weights=True")
        return "need_weights=True returns no weights"
    exact, own = _eager_pair(case, q, k, v, mask, need_weights=True)
    for what, got, ref, eager in (("attention weights", result.weights, exact.weights, own.weights),
                                  ("output with need_weights=True", result.output, exact.output, own.output)):
        _compare(what, got, ref, TOLERANCES[torch.float32], _context(case), slack=2 * _own_error(eager, ref))
    return "weights equal eager's"


def check_model_logits(subject: Subject) -> str:
    """optkit.build('opt-tiny', attention=<backend>): float32 logits equal eager's at every real
    token of a left-padded batch (one row fully padded), then over cached decode steps."""
    _require_float32(subject)
    caps = subject.entry.capabilities
    model, reference = _tiny_pair(subject)
    ids, attention_mask = _batch(model, padded=caps.padding)
    _compare_logits("prefill logits", model, reference, ids, attention_mask)
    if not caps.kv_cache:
        return "prefill only (declares kv_cache=False)"
    kinds = [kind for kind in ("dynamic", "static") if ("kv_cache", kind) in subject.registry]
    for kind in kinds:
        _compare_decode(kind, model, reference, ids, attention_mask)
    return f"prefill + decode with {', '.join(kinds)} caches, tolerance {LOGITS_TOLERANCE}"


def _tiny_pair(subject: Subject) -> tuple[Any, Any]:
    """The tiny model with this backend, prepared for inference as loaded models are (so the kernel also
    gets the folded power-of-two scale), and the same weights in the plain eager model."""
    from optkit.builder import build
    from optkit.inference.transform import prepare

    model = prepare(build(subject.spec(), registry=subject.registry, device=subject.device).eval())
    reference = build(subject.spec("eager"), registry=subject.registry, device=subject.device).eval()
    try:
        reference.load_state_dict(model.state_dict())
    except RuntimeError as exc:
        raise AssertionError(f"the model built with this backend has other weights than with eager: {exc}") from None
    return model, reference


def _batch(model: Any, *, padded: bool) -> tuple[Tensor, Tensor | None]:
    """Left-padded ids: rows with 0, 3 and 9 pads of 10 and one row that is all padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.spec.decoder.vocab_size, (4, 10), generator=g).to(model.device)
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    for row, pads in enumerate((0, 3, 9, 10)):
        mask[row, :pads] = 0
        ids[row, :pads] = model.spec.tokens.pad_token_id
    return ids, mask


def _compare_logits(what: str, model: Any, reference: Any, ids: Tensor, attention_mask: Tensor | None,
                    **kwargs: Any) -> tuple[Any, Any]:
    with torch.no_grad():
        got = model(ids, attention_mask=attention_mask, **kwargs.get("ours", {}))
        ref = reference(ids, attention_mask=attention_mask, **kwargs.get("theirs", {}))
    real = None if attention_mask is None else attention_mask[:, -ids.shape[1]:].bool()[..., None]
    if not bool(torch.isfinite(got.logits).all()):
        raise AssertionError(f"{what}: NaN/inf logits (fully padded rows must stay finite)")
    where = None if real is None else real.expand_as(ref.logits)
    _compare(what, got.logits, ref.logits, LOGITS_TOLERANCE, "opt-tiny, left-padded batch, real tokens", where=where)
    return got, ref


def _compare_decode(kind: str, model: Any, reference: Any, ids: Tensor, attention_mask: Tensor | None) -> None:
    """Prefill into a fresh cache of ``kind``, then three one-token steps."""
    batch, length = ids.shape
    caches = [m.new_cache(batch, max_length=length + 3, kind=kind) for m in (model, reference)]
    step_ids, mask = ids, attention_mask
    for step in range(4):
        args = {"ours": {"past_key_values": caches[0]}, "theirs": {"past_key_values": caches[1]}}
        got, _ = _compare_logits(f"{kind}-cache logits at step {step}", model, reference, step_ids, mask, **args)
        step_ids = got.logits[:, -1:].argmax(-1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)


def check_set_backend(subject: Subject) -> str:
    """optkit.set_backend swaps an eager model to this backend (and back) with equal logits."""
    _require_float32(subject)
    from optkit.builder import build, set_backend
    from optkit.inference.transform import prepare

    model = prepare(build(subject.spec("eager"), registry=subject.registry, device=subject.device).eval())
    ids, attention_mask = _batch(model, padded=subject.entry.capabilities.padding)
    with torch.no_grad():
        before = model(ids, attention_mask=attention_mask)
    set_backend(model, attention={"name": subject.name, "params": dict(subject.params)}, registry=subject.registry)
    names = {kernel.name for _, kernel in model.attention_kernels()}
    if names != {subject.name} or model.spec.decoder.attention.name != subject.name:
        raise AssertionError(f"after set_backend the layers run {sorted(names)}, "
                             f"the spec says {model.spec.decoder.attention.name!r}")
    _compare_logits("logits after set_backend", model, _Frozen(before), ids, attention_mask)
    set_backend(model, attention="eager", registry=subject.registry)
    _compare_logits("logits after set_backend back to eager", model, _Frozen(before), ids, attention_mask)
    return "eager -> backend -> eager"


class _Frozen:
    """Stands in for a reference model whose outputs were computed earlier."""

    def __init__(self, output: Any) -> None:
        self.output = output

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


PROPERTIES: dict[str, Callable[[Subject], str]] = {
    "registration": check_registration,
    "capabilities": check_capabilities,
    "equals_eager": check_equals_eager,
    "reduced_precision": check_reduced_precision,
    "fully_masked_rows": check_fully_masked_rows,
    "gradients": check_gradients,
    "dropout": check_dropout,
    "attention_weights": check_attention_weights,
    "model_logits": check_model_logits,
    "set_backend": check_set_backend,
}


# -- entry points ------------------------------------------------------------------------------
def make_subject(name: str, *, params: dict[str, Any] | None = None, registry: Registry | None = None,
                 device: torch.device | str = "cpu", max_examples: int = DEFAULT_EXAMPLES,
                 shrink: bool = True) -> Subject:
    if registry is None:
        from optkit import registry
    return Subject(name, registry, dict(params or {}), torch.device(device), max_examples, shrink)


def run_property(subject: Subject, prop: str) -> PropertyResult:
    """One property's verdict; a crash inside the kit's own set-up counts as a failure too."""
    if prop not in PROPERTIES:
        raise KeyError(f"unknown conformance property {prop!r} (properties: {', '.join(PROPERTIES)})")
    try:
        detail = PROPERTIES[prop](subject)
    except Skip as skip:
        return PropertyResult(prop, "skipped", str(skip))
    except AssertionError as exc:
        return PropertyResult(prop, "failed", str(exc))
    except Exception as exc:  # noqa: BLE001 - e.g. the factory raised: report it as this property's failure
        return PropertyResult(prop, "failed", f"{type(exc).__name__}: {exc}")
    return PropertyResult(prop, "passed", detail)


def check_attention_backend(name: str, *, params: dict[str, Any] | None = None, registry: Registry | None = None,
                            device: torch.device | str = "cpu", max_examples: int = DEFAULT_EXAMPLES,
                            only: Iterable[str] | None = None, skip: Iterable[str] = (),
                            shrink: bool = True) -> ConformanceReport:
    """Run every conformance property (or ``only`` some) on the attention backend ``name``.

    Returns the report when all pass or are skipped (not applicable); raises
    ``ConformanceError`` naming each failed property and the case that shows it (the
    smallest such case, unless ``shrink=False`` trades that for speed).
    """
    subject = make_subject(name, params=params, registry=registry, device=device, max_examples=max_examples,
                           shrink=shrink)
    chosen = [p for p in (list(only) if only is not None else PROPERTIES) if p not in set(skip)]
    report = ConformanceReport(name, [run_property(subject, prop) for prop in chosen])
    if report.failed:
        raise ConformanceError(report)
    return report
