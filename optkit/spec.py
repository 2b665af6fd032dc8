"""Model specs: pydantic models, YAML in and out, presets with `extends`.

Validation runs in two phases and reports every problem at once, each with its YAML
path: phase 1 is the shape of the document (pydantic), phase 2 resolves component
names in the registry and validates their params against each component's own model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from optkit.errors import SpecValidationError, UnknownComponentError

DECODER_COMPONENTS = ("token_embedding", "positional_embedding", "attention", "mlp", "norm", "linear", "kv_cache",
                      "block")
AUTO = "auto"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    max_positions: int = Field(gt=0)
    word_embed_proj_dim: int | None = Field(default=None, gt=0)
    norm_position: Literal["pre", "post"] = "pre"  # OPTConfig.do_layer_norm_before
    final_norm: bool = True  # False for post-LN models and `_remove_final_layer_norm`
    bias: bool = True  # OPTConfig.enable_bias: q/k/v/out and MLP biases
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    attention_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    layerdrop: float = Field(default=0.0, ge=0.0, le=1.0)
    init_std: float = Field(default=0.02, gt=0.0)
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
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2


class ModelSpec(StrictModel):
    """A whole model: family, decoder, head and special tokens."""

    family: str = "opt"
    decoder: DecoderSpec
    head: ComponentRef = _ref("causal_lm")
    tokens: TokensSpec = Field(default_factory=TokensSpec)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_components(self, *, registry: Any = None, **choices: Any) -> "ModelSpec":
        """A copy with some components swapped, e.g. ``attention="sdpa"`` or ``head="base"``,
        validated against ``registry`` (default: the global one)."""
        data = self.to_dict()
        for kind, choice in choices.items():
            if choice is None:
                continue
            ref = ComponentRef.model_validate(choice).model_dump()
            if kind == "head":
                data["head"] = ref
            elif kind in DECODER_COMPONENTS:
                data["decoder"][kind] = ref
            else:
                raise SpecValidationError([f"{kind}: not a component kind (kinds: head, {', '.join(DECODER_COMPONENTS)})"])
        return validate_spec(data, registry=registry)


# -- loading ---------------------------------------------------------------------------------
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


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecValidationError([f"not valid YAML: {exc}"], source=str(path)) from None
    if not isinstance(data, dict):
        raise SpecValidationError([f"expected a mapping at the top level, got {type(data).__name__}"], source=str(path))
    return data


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or Path(name).is_file()


def resolve_raw(name_or_path: str | Path | dict[str, Any], _seen: tuple[str, ...] = (), _base_dir: Path | None = None) -> dict[str, Any]:
    """The spec mapping with every ``extends`` resolved (preset name, alias or YAML path)."""
    from optkit.presets import canonical_preset_name, preset_names, preset_spec

    if isinstance(name_or_path, dict):
        data, here = dict(name_or_path), _base_dir
    else:
        key = str(name_or_path)
        candidate = Path(key) if _base_dir is None or Path(key).is_absolute() else _base_dir / key
        ident = str(candidate.resolve()) if candidate.is_file() else key  # one name per file
        if ident in _seen:
            raise SpecValidationError([f"extends: cycle {' -> '.join(_seen + (ident,))}"])
        _seen = _seen + (ident,)
        if canonical_preset_name(key) is not None and not candidate.is_file():
            data, here = preset_spec(key), None
        elif _looks_like_path(key) or candidate.is_file():
            if not candidate.is_file():
                raise SpecValidationError([f"spec file {candidate} does not exist"])
            data, here = _read_yaml(candidate), candidate.parent
        else:
            raise SpecValidationError([
                f"unknown preset '{key}' (presets: {', '.join(preset_names())}); "
                "or give the path of a .yaml spec file"
            ])
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise SpecValidationError([f"extends: expected a preset name or a path, got {parent!r}"])
    return _merge(resolve_raw(parent, _seen, here), data)


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if part not in ("function-before[_from_name()]",)) or "<root>"


def _pydantic_problems(error: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for item in error.errors():
        loc = _format_loc(item["loc"])
        path = f"{prefix}.{loc}" if prefix and loc != "<root>" else (prefix or loc)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown field (not allowed here)"
        elif item["type"] == "missing":
            message = "required field is missing"
        problems.append(f"{path}: {message}")
    return problems


def component_problems(spec: ModelSpec, registry: Any = None) -> list[str]:
    """Phase 2: every component name exists and its params validate."""
    if registry is None:
        from optkit import registry
    refs = [(f"decoder.{kind}", kind, getattr(spec.decoder, kind)) for kind in DECODER_COMPONENTS]
    refs.append(("head", "head", spec.head))
    problems = []
    for path, kind, ref in refs:
        if ref.name == AUTO and kind in ("attention", "linear", "kv_cache"):
            if ref.params:
                problems.append(f"{path}.params: 'auto' takes no params")
            continue
        try:
            entry = registry.get(kind, ref.name)
        except UnknownComponentError as exc:
            problems.append(f"{path}: {exc}")
            continue
        try:
            entry.params.model_validate(ref.params)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, prefix=f"{path}.params"))
    return problems


def structure_problems(spec: ModelSpec) -> list[str]:
    d = spec.decoder
    problems = []
    if d.hidden_size % d.num_heads:
        problems.append(f"decoder.hidden_size: {d.hidden_size} is not divisible by num_heads={d.num_heads}")
    for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(spec.tokens, field)
        if value is not None and not 0 <= value < d.vocab_size:
            problems.append(f"tokens.{field}: {value} is outside the vocabulary [0, {d.vocab_size})")
    return problems


def validate_spec(data: dict[str, Any] | ModelSpec, *, source: str | None = None, registry: Any = None) -> ModelSpec:
    """A validated ModelSpec, or one SpecValidationError listing every problem."""
    if isinstance(data, ModelSpec):
        data = data.to_dict()
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


def _names_only_problems(data: dict[str, Any], registry: Any) -> list[str]:
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
            try:
                registry.get(kind, name).params.model_validate(params)
            except ValidationError as exc:
                problems.extend(_pydantic_problems(exc, prefix=f"{path}.params"))
    return problems


def load_spec(name_or_path: str | Path | dict[str, Any], *, registry: Any = None, **overrides: Any) -> ModelSpec:
    """A preset name/alias, a YAML path or a mapping -> validated ModelSpec.

    Keyword overrides are deep-merged on top (``load_spec("opt-125m", decoder={"num_layers": 2})``).
    Component names are checked against ``registry`` (default: the global one).
    """
    source = None if isinstance(name_or_path, dict) else str(name_or_path)
    raw = resolve_raw(name_or_path)
    if overrides:
        raw = _merge(raw, overrides)
    return validate_spec(raw, source=source, registry=registry)


def spec_from_yaml(text: str) -> ModelSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecValidationError([f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise SpecValidationError([f"expected a mapping at the top level, got {type(data).__name__}"])
    return validate_spec(resolve_raw(data))
