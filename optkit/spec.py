"""Model specs: pydantic models, YAML in and out, presets with `extends`.

Validation runs in two phases and reports every problem at once, each with its YAML
path: phase 1 is the shape of the document (pydantic), phase 2 resolves component
names in the registry and validates their params against each component's own model.

Specs fail early: a file that is not UTF-8 YAML, a duplicate key, a document nested or
expanded (YAML aliases) beyond reason, an `extends` chain too long, a non-finite number or
a boolean where a number belongs, and sizes no machine could hold are all validation
errors with their YAML path -- before anything is allocated. Messages quote user data
only in bounded form (`optkit.errors.brief_repr`).
"""

from __future__ import annotations

import codecs
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optkit.errors import SpecValidationError, UnknownComponentError, brief_repr, shorten
from optkit.host import meminfo_bytes
from optkit.registration import AUTO, AUTO_KINDS, KINDS, Registry

if TYPE_CHECKING:
    import torch

DECODER_COMPONENTS: tuple[str, ...] = tuple(kind for kind in KINDS if kind != "head")

MAX_SPEC_BYTES = 1 << 20  # a spec file is a few hundred bytes; anything near this is not a spec
MAX_DEPTH = 32  # nesting of mappings and lists in one document
MAX_VALUES = 100_000  # values in one document once YAML aliases are expanded (a "billion laughs" stops here)
MAX_EXTENDS = 32  # length of an `extends` chain
MAX_PARAMETERS = 2**50  # ~1.1e15: more than any machine holds, and far from int64 overflow in any tensor size
HOST_BYTES_PER_LAYER = 32 * 1024  # rough host memory of one layer's Python modules, on any device (meta too)


class StrictModel(BaseModel):
    """No unknown fields, no NaN or infinity in any float."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _strict(**constraints: Any) -> Any:
    """A field without pydantic's lax coercions: ``num_layers: true`` or ``"2"`` is not an int, ``dropout:
    false`` not a float (an int is still a fine float: ``dropout: 0``)."""
    return Field(strict=True, **constraints)


class ComponentRef(StrictModel):
    """A component chosen by registered name, with that component's own params.

    In YAML either ``attention: sdpa`` or ``attention: {name: sdpa, params: {...}}``.
    """

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


def _ref(name: str, **params: Any) -> Any:
    return Field(default_factory=lambda: ComponentRef(name=name, params=dict(params)))


class DecoderSpec(StrictModel):
    """The decoder stack; field names follow transformers' OPTConfig where one exists."""

    vocab_size: int = _strict(gt=0)
    hidden_size: int = _strict(gt=0)
    num_layers: int = _strict(gt=0)
    num_heads: int = _strict(gt=0)
    ffn_dim: int = _strict(gt=0)
    max_positions: int = _strict(gt=0)
    word_embed_proj_dim: int | None = _strict(default=None, gt=0)
    norm_position: Literal["pre", "post"] = "pre"  # OPTConfig.do_layer_norm_before
    final_norm: bool = _strict(default=True)  # False for post-LN models and `_remove_final_layer_norm`
    bias: bool = _strict(default=True)  # OPTConfig.enable_bias: q/k/v/out and MLP biases
    dropout: float = _strict(default=0.0, ge=0.0, lt=1.0)
    attention_dropout: float = _strict(default=0.0, ge=0.0, lt=1.0)
    layerdrop: float = _strict(default=0.0, ge=0.0, le=1.0)
    init_std: float = _strict(default=0.02, gt=0.0)
    # OPT scales q right after q_proj ("projection"); LLaMA-style models scale the scores.
    query_scaling: Literal["projection", "scores"] = "projection"
    token_embedding: ComponentRef = _ref("learned")
    positional_embedding: ComponentRef = _ref("learned", offset=2)
    attention: ComponentRef = _ref("eager")
    mlp: ComponentRef = _ref("ffn", activation="relu")
    norm: ComponentRef = _ref("layernorm", eps=1e-5, elementwise_affine=True)
    linear: ComponentRef = _ref("torch")
    kv_cache: ComponentRef = _ref("dynamic")
    # How one layer arranges the components above (OPT: "sequential"); a family may register its own.
    block: ComponentRef = _ref("sequential")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (and of the LM head's input)."""
        return self.word_embed_proj_dim or self.hidden_size


class TokensSpec(StrictModel):
    pad_token_id: int | None = _strict(default=1)
    bos_token_id: int | None = _strict(default=2)
    eos_token_id: int | None = _strict(default=2)


class AdaptersSpec(StrictModel):
    """LoRA adapters the builder adds once the model is built (``optkit.adapters.add_adapters``; PEFT's names
    in brackets): ``r`` [r], ``alpha`` [lora_alpha], ``dropout`` [lora_dropout], ``target_modules`` (checkpoint
    names such as q_proj, or "all-linear"), ``use_rslora``, ``name``. Target names are checked against the
    built model's projections."""

    r: int = _strict(gt=0)
    alpha: float = _strict(default=8.0)  # PEFT's LoraConfig default (optkit.adapters.lora.DEFAULT_ALPHA)
    dropout: float = _strict(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                                                      min_length=1)
    use_rslora: bool = _strict(default=False)
    name: str = _strict(default="default", min_length=1)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `target_modules: all-linear` reads as a list of one


class ModelSpec(StrictModel):
    """A whole model: family, decoder, head and special tokens (and, optionally, LoRA adapters)."""

    family: str = "opt"
    decoder: DecoderSpec
    head: ComponentRef = _ref("causal_lm")
    tokens: TokensSpec = Field(default_factory=TokensSpec)
    adapters: AdaptersSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if data["adapters"] is None:  # a spec without adapters reads (and prints) as before they existed
            del data["adapters"]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_components(self, *, registry: Registry | None = None, **choices: Any) -> "ModelSpec":
        """A copy with some components swapped, e.g. ``attention="sdpa"`` or ``head="base"``,
        validated against ``registry`` (default: the global one)."""
        data = self.to_dict()
        problems = []
        for kind, choice in choices.items():
            if choice is None:
                continue
            path = "head" if kind == "head" else f"decoder.{kind}"
            if kind != "head" and kind not in DECODER_COMPONENTS:
                problems.append(f"{shorten(kind, 80)}: not a component kind "
                                f"(kinds: head, {', '.join(DECODER_COMPONENTS)})")
                continue
            if not isinstance(choice, (str, dict, ComponentRef)):
                problems.append(f"{path}: expected a component name or {{name: ..., params: {{...}}}}, "
                                f"got {brief_repr(choice)} ({type(choice).__name__})")
                continue
            try:
                ref = ComponentRef.model_validate(choice).model_dump()
            except ValidationError as exc:
                problems.extend(_pydantic_problems(exc, prefix=path))
                continue
            if kind == "head":
                data["head"] = ref
            else:
                data["decoder"][kind] = ref
        if problems:
            raise SpecValidationError(problems)
        return validate_spec(data, registry=registry)


# -- reading YAML ----------------------------------------------------------------------------
class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-5`` as a float the way YAML 1.2 (and every human) does."""


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

_OPENERS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
            yaml.FlowSequenceStartToken)
_CLOSERS = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def parse_yaml(text: str, *, source: str | None = None) -> Any:
    """One YAML document, or a SpecValidationError: invalid YAML, nesting deeper than MAX_DEPTH (found by
    the scanner, before PyYAML's recursive composer could overflow the stack), or a duplicate key."""
    source = None if source is None else shorten(source, 200)
    try:
        depth = 0
        for token in yaml.scan(text, Loader=SpecLoader):
            depth += isinstance(token, _OPENERS) - isinstance(token, _CLOSERS)
            if depth > MAX_DEPTH:
                raise SpecValidationError([f"nested deeper than {MAX_DEPTH} levels (line {token.start_mark.line + 1}); "
                                           "a model spec is a few levels deep"], source=source)
        loader = SpecLoader(text)
        try:
            node = loader.get_single_node()
            problems = _duplicate_keys(node) if node is not None else []
            if problems:
                raise SpecValidationError(problems, source=source)
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SpecValidationError([f"not valid YAML: {shorten(str(exc), 400)}"], source=source) from None


def _duplicate_keys(root: yaml.Node) -> list[str]:
    """Every key given twice in one mapping, with its YAML path (PyYAML silently keeps the last one)."""
    problems, seen_nodes = [], set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:  # an alias: its node was checked where the anchor is
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{path}.{i}" if path else str(i)) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                label = shorten(str(key.value), 80) if isinstance(key, yaml.ScalarNode) else "<complex key>"
                child = f"{path}.{label}" if path else label
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in first_line:
                        problems.append(f"{child}: duplicate key (lines {first_line[key.tag, key.value]} and "
                                        f"{line}); keep one")
                    first_line.setdefault((key.tag, key.value), line)
                stack.append((value, child))
    return sorted(problems)


def _shape_problem(data: Any) -> str | None:
    """A document nested deeper than MAX_DEPTH, larger than MAX_VALUES once aliases (shared objects) are
    expanded, or containing itself -- checked without ever expanding it."""
    sizes: dict[int, int] = {}  # id -> expanded number of values, for containers already measured
    active: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(data, 1, False)]
    while stack:
        value, depth, done = stack.pop()
        children = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if done:
            active.discard(id(value))
            sizes[id(value)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[id(value)] > MAX_VALUES:
                return (f"expands to more than {MAX_VALUES} values (YAML aliases repeating an anchor?); "
                        "a model spec has a few dozen")
            continue
        if id(value) in sizes:
            continue
        if id(value) in active:
            return "contains itself (a YAML alias inside its own anchor)"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels; a model spec is a few levels deep"
        active.add(id(value))
        stack.append((value, depth, True))
        stack.extend((child, depth + 1, False) for child in children)
    return None


def _checked_document(data: Any, source: str | None) -> dict[str, Any]:
    problem = _shape_problem(data)
    if problem is not None:
        raise SpecValidationError([problem], source=source)
    if not isinstance(data, dict):
        raise SpecValidationError([f"expected a mapping at the top level, got {type(data).__name__}"], source=source)
    return data


def _read_text(path: Path) -> str:
    """The file as text, or a SpecValidationError saying what it is instead of UTF-8 YAML."""
    source = shorten(str(path), 200)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecValidationError([f"the file is {size} bytes; a model spec is at most {MAX_SPEC_BYTES} "
                                       "(is this the right file?)"], source=source)
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecValidationError([f"cannot read the file: {shorten(exc.strerror or str(exc), 200)}"],
                                  source=source) from None
    for bom, encoding in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                          (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if raw.startswith(bom):
            raise SpecValidationError([f"the file is {encoding} text; save it as UTF-8"], source=source)
    if b"\x00" in raw:
        raise SpecValidationError(["the file contains NUL bytes: it is binary (or UTF-16/32 without a byte order "
                                   "mark), not a UTF-8 YAML spec"], source=source)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecValidationError([f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                                   "save it as UTF-8"], source=source) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    source = shorten(str(path), 200)
    return _checked_document(parse_yaml(_read_text(path), source=source), source)


# -- resolving `extends` -------------------------------------------------------------------
def _merge(base: Any, override: Any) -> Any:
    """Deep-merge ``override`` into ``base`` (component refs merge only with the same name)."""
    if isinstance(base, str) and isinstance(override, dict) and "name" not in override:
        base = {"name": base}
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return override
    if "name" in override and base.get("name") not in (None, override["name"]):
        return dict(override)
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if key in base else value
    return merged


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the OS, or with a NUL byte, is no file
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or _is_file(Path(name))


def _chain(seen: tuple[str, ...]) -> str:
    return " -> ".join(shorten(item, 80) for item in seen)


def resolve_raw(name_or_path: str | Path | dict[str, Any], _seen: tuple[str, ...] = (), _base_dir: Path | None = None) -> dict[str, Any]:
    """The spec mapping with every ``extends`` resolved (preset name, alias or YAML path)."""
    from optkit.presets import canonical_preset_name, preset_names, preset_spec

    if isinstance(name_or_path, dict):
        data, here = dict(_checked_document(name_or_path, None)), _base_dir
    else:
        key = str(name_or_path)
        candidate = Path(key) if _base_dir is None or Path(key).is_absolute() else _base_dir / key
        ident = str(candidate.resolve()) if _is_file(candidate) else key  # one name per file
        if ident in _seen:
            raise SpecValidationError([f"extends: cycle {_chain(_seen + (ident,))}"])
        _seen = _seen + (ident,)
        if len(_seen) > MAX_EXTENDS:
            raise SpecValidationError([f"extends: a chain of more than {MAX_EXTENDS} specs "
                                       f"({_chain(_seen[:3])} -> ... -> {_chain(_seen[-2:])})"])
        if canonical_preset_name(key) is not None and not _is_file(candidate):
            data, here = preset_spec(key), None
        elif _looks_like_path(key) or _is_file(candidate):
            if not _is_file(candidate):
                raise SpecValidationError([f"spec file {shorten(str(candidate), 200)} does not exist"])
            data, here = _read_yaml(candidate), candidate.parent
        elif key.strip() and _is_dir(candidate):
            raise SpecValidationError([f"{shorten(str(candidate), 200)} is a directory; give a preset name or a .yaml "
                                       "spec file (a checkpoint directory loads with optkit.from_pretrained)"])
        else:
            raise SpecValidationError([
                f"unknown preset '{shorten(key, 80)}' (presets: {', '.join(preset_names())}); "
                "or give the path of a .yaml spec file"
            ])
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise SpecValidationError([f"extends: expected a preset name or a path, got {brief_repr(parent)}"])
    return _merge(resolve_raw(parent, _seen, here), data)


# -- validating ------------------------------------------------------------------------------
def _format_loc(loc: tuple[Any, ...]) -> str:
    parts = [shorten(str(part), 80) for part in loc if part not in ("function-before[_from_name()]",)]
    return ".".join(parts) or "<root>"


_QUOTE_INPUT = frozenset({"int_type", "float_type", "bool_type", "string_type", "finite_number", "int_parsing",
                          "float_parsing", "bool_parsing", "literal_error"})


def _pydantic_problems(error: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for item in error.errors():
        loc = _format_loc(item["loc"])
        path = f"{prefix}.{loc}" if prefix and loc != "<root>" else (prefix or loc)
        message = shorten(item["msg"], 300)
        if item["type"] in _QUOTE_INPUT:  # "should be a valid integer" alone hides that it got `true`
            message += f" (got {brief_repr(item.get('input'), 60)})"
        if item["type"] == "extra_forbidden":
            message = "unknown field (not allowed here)"
        elif item["type"] == "missing":
            message = "required field is missing"
        problems.append(f"{path}: {message}")
    return problems


def _component_refs(spec: ModelSpec) -> list[tuple[str, str, ComponentRef]]:
    refs = [(f"decoder.{kind}", kind, getattr(spec.decoder, kind)) for kind in DECODER_COMPONENTS]
    return refs + [("head", "head", spec.head)]


def _non_finite(value: Any, path: str) -> list[str]:
    """Every NaN or infinity inside a component's params (their own models may allow them; a spec never does)."""
    problems, stack = [], [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            problems.append(f"{where}: {item} is not a finite number")
        elif isinstance(item, dict):
            stack.extend((v, f"{where}.{shorten(str(k), 80)}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}.{i}") for i, v in enumerate(item))
    return sorted(problems)


def component_problems(spec: ModelSpec, registry: Registry | None = None) -> list[str]:
    """Phase 2: every component name exists and its params validate."""
    if registry is None:
        from optkit import registry
    problems = []
    for path, kind, ref in _component_refs(spec):
        problems.extend(_non_finite(ref.params, f"{path}.params"))
        if ref.name == AUTO and kind in AUTO_KINDS:
            if ref.params:
                problems.append(f"{path}.params: '{AUTO}' takes no params")
            continue
        try:
            entry = registry.get(kind, ref.name)
        except UnknownComponentError as exc:
            problems.append(f"{path}: {exc}")
            continue
        problems.extend(params_problems(entry, ref.params, f"{path}.params"))
    return problems


def validated_params(entry: Any, params: Any, prefix: str) -> tuple[BaseModel | None, list[str]]:
    """``params`` validated by ``entry``'s params model, or the problems at YAML path ``prefix``: a plugin's
    validator that raises something else than ValueError is a problem naming its plugin, not a traceback."""
    from optkit.plugins import describe, guarded

    try:
        with guarded():
            return entry.params.model_validate(params), []
    except ValidationError as exc:
        return None, _pydantic_problems(exc, prefix=prefix)
    except Exception as exc:  # noqa: BLE001 - a bug in a plugin's params model
        return None, [f"{prefix}: the params model {getattr(entry.params, '__name__', '?')} of {entry.kind} "
                      f"'{entry.name}' ({entry.provider}) raised {describe(exc)}; fix or block that plugin"]


def params_problems(entry: Any, params: Any, prefix: str) -> list[str]:
    return validated_params(entry, params, prefix)[1]


# -- sizes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeEstimate:
    """Parameters a spec implies (exact integer arithmetic, so a huge spec cannot overflow), split by the
    field that drives each part. A lower bound for OPT-like layers: an untied head or a wider MLP adds more."""

    parts: dict[str, int]  # YAML path of the driving field -> parameters

    @property
    def parameters(self) -> int:
        return sum(self.parts.values())

    @property
    def largest(self) -> str:
        return max(self.parts, key=self.parts.__getitem__)


def size_estimate(decoder: DecoderSpec) -> SizeEstimate:
    """vocab*embed + positions*embed + layers*(4*h*h + 2*h*ffn + biases and norms) + projections."""
    d, h, embed = decoder, decoder.hidden_size, decoder.embed_dim
    per_layer = 4 * h * h + 2 * h * d.ffn_dim + (5 * h + d.ffn_dim if d.bias else 0) + 4 * h
    return SizeEstimate({
        "decoder.vocab_size": d.vocab_size * embed,
        "decoder.max_positions": d.max_positions * embed,
        "decoder.num_layers": d.num_layers * per_layer + 2 * h + (2 * embed * h if embed != h else 0),
    })


def _human(count: float, unit: str = "B") -> str:
    for prefix in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(count) < 1000:
            return f"{count:.3g} {prefix}{unit}"
        count /= 1000
    return f"{count:.3g} Y{unit}"


def _size_summary(spec: ModelSpec, field: str) -> str:
    d = spec.decoder
    what = {"decoder.vocab_size": f"decoder.vocab_size={d.vocab_size} x {d.embed_dim} in the token embedding",
            "decoder.max_positions": f"decoder.max_positions={d.max_positions} x {d.embed_dim} in the positions",
            "decoder.num_layers": f"decoder.num_layers={d.num_layers} layers of hidden_size={d.hidden_size}, "
                                  f"ffn_dim={d.ffn_dim}"}
    return f"mostly {what[field]}"


def structure_problems(spec: ModelSpec) -> list[str]:
    d = spec.decoder
    problems = []
    if d.hidden_size % d.num_heads:
        problems.append(f"decoder.hidden_size: {d.hidden_size} is not divisible by num_heads={d.num_heads}")
    for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(spec.tokens, field)
        if value is not None and not 0 <= value < d.vocab_size:
            problems.append(f"tokens.{field}: {value} is outside the vocabulary [0, {d.vocab_size})")
    estimate = size_estimate(d)
    if estimate.parameters > MAX_PARAMETERS:
        problems.append(f"{estimate.largest}: the model would have about {estimate.parameters:.3g} parameters "
                        f"({_size_summary(spec, estimate.largest)}); optkit refuses more than {MAX_PARAMETERS:.3g}, which no "
                        "machine holds")
    return problems


def memory_problems(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why building ``spec`` on ``device`` in ``dtype`` would run out of memory, from the spec alone: its
    parameters against what the device could ever hold, and its layers' Python objects against the host
    (which a "meta" build needs too). Empty: it may fit."""
    estimate = size_estimate(spec.decoder)
    parameter_bytes = estimate.parameters * dtype.itemsize if device.type != "meta" else 0
    on_host = device.type in ("cpu", "mps", "meta")  # mps shares the host's memory
    problems = []
    capacity = None if on_host else _device_memory(device)
    if capacity is not None and parameter_bytes > capacity:
        problems.append(f"{estimate.largest}: the parameters need about {_human(parameter_bytes)} in "
                        f"{str(dtype).removeprefix('torch.')} ({_size_summary(spec, estimate.largest)}), more than "
                        f"{device} can ever hold ({_human(capacity)}); {_SMALLER_OR_META}")
    host, modules = _host_memory(), spec.decoder.num_layers * HOST_BYTES_PER_LAYER
    needed = modules + (parameter_bytes if on_host else 0)
    if host is not None and needed > host:
        field, what = ((estimate.largest, "the parameters and the layers' modules need") if needed > modules else
                       ("decoder.num_layers", "the layers' modules alone need"))
        problems.append(f"{field}: {what} about {_human(needed)} of host memory ({_size_summary(spec, field)}), "
                        f"more than this machine's memory and swap ({_human(host)}); "
                        + ("make the model smaller" if device.type == "meta" else _SMALLER_OR_META))
    return problems


_SMALLER_OR_META = "make the model smaller, or build it on device='meta' to inspect it"


def _host_memory() -> int | None:
    """What this machine could ever hold: physical memory (POSIX sysconf) plus swap (Linux /proc/meminfo);
    None when the OS does not say, and then nothing is refused."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    return physical + (meminfo_bytes("SwapTotal") or 0)


def _device_memory(device: torch.device) -> int | None:
    """Total memory of an accelerator (None: unknown, or the host's memory is what counts)."""
    import torch

    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device.index or 0).total_memory
        if device.type == "xpu":
            return torch.xpu.get_device_properties(device.index or 0).total_memory
    except Exception:  # noqa: BLE001 - no such device: build() reports that first; no limit known here
        return None
    return None


def training_needs(spec: ModelSpec) -> dict[str, dict[str, str]]:
    """The capabilities (`optkit.Capabilities` fields) that training this spec needs, by component kind, each
    with the reason: ``registry.require_capabilities(kind, name, needs)`` refuses a component without them."""
    d = spec.decoder
    if d.attention_dropout > 0:
        return {"attention": {"dropout": f"decoder.attention_dropout={d.attention_dropout} applies in training mode "
                                         "(a freshly built model is in training mode); set it to 0, or load weights "
                                         "for inference (optkit.from_pretrained)"}}
    return {}


def validate_spec(data: dict[str, Any] | ModelSpec, *, source: str | None = None,
                  registry: Registry | None = None) -> ModelSpec:
    """A validated ModelSpec, or one SpecValidationError listing every problem."""
    source = None if source is None else shorten(source, 200)
    if isinstance(data, ModelSpec):
        data = data.to_dict()
    else:
        problem = _shape_problem(data)
        if problem is not None:
            raise SpecValidationError([problem], source=source)
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        problems = _pydantic_problems(exc)
        decoder = data.get("decoder") if isinstance(data, dict) else None
        if isinstance(decoder, dict):  # still check component names we could read
            problems += _names_only_problems(data, registry)
        raise SpecValidationError(problems, source=source) from None
    problems = structure_problems(spec) + component_problems(spec, registry)
    if problems:
        raise SpecValidationError(problems, source=source)
    return spec


def _names_only_problems(data: dict[str, Any], registry: Registry | None) -> list[str]:
    if registry is None:
        from optkit import registry
    problems = []
    refs = [(f"decoder.{k}", k, data["decoder"].get(k)) for k in DECODER_COMPONENTS] + [("head", "head", data.get("head"))]
    for path, kind, raw in refs:
        name = raw if isinstance(raw, str) else raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str) or not name or name == AUTO:
            continue  # phase 1 already reported a missing or empty name
        if (kind, name) not in registry:
            problems.append(f"{path}: {registry.unknown_message(kind, name)}")
            continue
        params = raw.get("params", {}) if isinstance(raw, dict) else {}
        if isinstance(params, dict):
            problems.extend(params_problems(registry.get(kind, name), params, f"{path}.params"))
    return problems


def load_spec(name_or_path: str | Path | dict[str, Any], *, registry: Registry | None = None,
              **overrides: Any) -> ModelSpec:
    """A preset name/alias, a YAML path or a mapping -> validated ModelSpec.

    Keyword overrides are deep-merged on top (``load_spec("opt-125m", decoder={"num_layers": 2})``).
    Component names are checked against ``registry`` (default: the global one).
    """
    if not isinstance(name_or_path, (str, Path, dict)):
        raise SpecValidationError([f"expected a preset name, a YAML path or a mapping, got {brief_repr(name_or_path)} "
                                   f"({type(name_or_path).__name__})"])
    source = None if isinstance(name_or_path, dict) else str(name_or_path)
    raw = resolve_raw(name_or_path)
    if overrides:
        raw = _merge(raw, _checked_document(overrides, source))
    return validate_spec(raw, source=source, registry=registry)


def spec_from_yaml(text: str) -> ModelSpec:
    return validate_spec(resolve_raw(_checked_document(parse_yaml(text), None)))
