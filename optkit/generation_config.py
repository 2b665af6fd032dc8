"""``GenerationConfig``: every setting of ``generate`` as one typed, validated object.

Field names and meanings follow transformers' ``GenerationConfig`` so a ``generation_config.json``
written by transformers loads into it, plus three of optkit's own (``cache_implementation``
defaults to optkit's static cache, ``decode_graph``, ``compile``). Types are strict: a string is
never read as a number (``top_p="0.9"``), a bool never as an integer, and floats must be finite, so a
mistyped setting is an ``InputError`` naming it rather than a different continuation.

Settings that depend on the model (token ids inside the vocabulary, lengths within its positions)
and on each other (``temperature > 0`` only matters when sampling) are checked by ``generate``.
"""

from __future__ import annotations

import difflib
import json
import reprlib
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from optkit.errors import InputError

__all__ = ["GENERATION_CONFIG_NAME", "GenerationConfig"]

GENERATION_CONFIG_NAME = "generation_config.json"  # next to config.json, as transformers names it

# What each field must be: the whole message after "name=value: must be ".
REQUIREMENTS = {
    "max_new_tokens": "a positive integer (the number of tokens to add) or None",
    "max_length": "a positive integer (prompt + new tokens) or None",
    "min_new_tokens": "an integer >= 0",
    "do_sample": "True or False",
    "temperature": "a finite number (> 0 when sampling; 1.0 leaves the distribution as it is)",
    "top_k": "an integer >= 0 (0 turns it off) or None (50 when sampling)",
    "top_p": "in (0, 1], a float (1 or None turns it off)",
    "repetition_penalty": "> 0 and finite (1.0 turns it off)",
    "no_repeat_ngram_size": "an integer >= 0 (0 turns it off)",
    "num_beams": "an integer >= 1",
    "num_return_sequences": "an integer >= 1",
    "length_penalty": "a finite number (> 0 favours longer beams, < 0 shorter ones)",
    "early_stopping": "True, False or 'never'",
    "eos_token_id": "an integer token id, a list of them ([] never stops early) or None (the model's)",
    "pad_token_id": "an integer token id or None (the model's)",
    "bos_token_id": "an integer token id or None (kept for transformers; generate starts from input_ids)",
    "use_cache": "True or False (optkit always decodes through its KV cache: the tokens are the same)",
    "return_dict_in_generate": "True or False (True: generate returns an output with .sequences)",
    "output_scores": "True or False (the processed scores of each step, with return_dict_in_generate)",
    "output_logits": "True or False (the raw logits of each step, with return_dict_in_generate)",
    "cache_implementation": "a kv_cache name such as 'static' or 'dynamic', or None (the model spec's)",
    "decode_graph": "True, False or None (automatic)",
    "compile": "True, False or None (automatic: compiled when a warm compile cache or the work repays it)",
}

# transformers keys that never change which tokens generate() returns from input ids: dropped on load.
NO_EFFECT_KEYS = frozenset({
    "transformers_version", "decoder_start_token_id", "output_attentions", "output_hidden_states", "renormalize_logits",
    "remove_invalid_values", "cache_config", "max_cache_len", "compile_config", "disable_compile", "low_memory",
    "prefill_chunk_size", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "assistant_early_exit",
    "assistant_ensemble_weight", "prompt_lookup_num_tokens", "max_matching_ngram_size",
})

# transformers keys optkit does not implement, with the value that turns each off: dropped at that value.
OFF_VALUES: dict[str, Any] = {
    "min_length": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
    "num_beam_groups": 1, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0,
    "guidance_scale": 1.0, "penalty_alpha": 0.0, "token_healing": False, "max_time": None, "min_p": None,
    "top_h": None, "bad_words_ids": None, "force_words_ids": None, "constraints": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "watermarking_config": None, "dola_layers": None,
    "use_mtp": False, "stop_strings": None,
}
# Sampling-only settings: greedy decoding ignores them (transformers warns when a user sets one with do_sample off).
SAMPLING_ONLY = ("temperature", "top_p", "top_k")


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist = 80, 80, 8


def _short(value: Any) -> str:
    """A user value as it appears in a message: repr, capped."""
    return _REPR.repr(value)


class GenerationConfig(BaseModel):
    """The settings of one ``generate`` call; ``generate(model, ids, generation_config=cfg, top_k=5)``
    uses ``cfg`` with ``top_k`` replaced, as transformers does.

    Immutable (safe to share between threads); ``cfg.replace(top_k=5)`` returns a validated copy.
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    # lengths: max_new_tokens wins; max_length counts the prompt; neither: 20 new tokens within the positions
    max_new_tokens: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=1)
    min_new_tokens: int = Field(default=0, ge=0)  # EOS is suppressed until this many tokens were generated
    # sampling (greedy when do_sample is False); processors run in transformers' order
    do_sample: bool = False
    temperature: float | None = 1.0  # None: 1.0; only read when sampling
    top_k: int | None = Field(default=None, ge=0)  # None: 50 when sampling, as transformers; 0: off
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # nucleus mass; None or 1.0: off
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # > 1 discourages tokens already in the row
    no_repeat_ngram_size: int = Field(default=0, ge=0)  # never repeat an n-gram of this size (0: off)
    # beam search
    num_beams: int = Field(default=1, ge=1)
    num_return_sequences: int = Field(default=1, ge=1)  # per prompt; <= num_beams with beams
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty
    early_stopping: bool | Literal["never"] = False
    # special tokens: None takes the model's (its spec's tokens)
    eos_token_id: int | list[int] | None = None  # [] never stops early
    pad_token_id: int | None = None  # fills rows that already ended
    bos_token_id: int | None = None  # kept for transformers' files; generate continues input_ids as given
    # what generate returns (transformers' output flags)
    use_cache: bool = True  # False gives the same tokens: optkit always decodes through its KV cache
    return_dict_in_generate: bool = False  # True: an output with .sequences (.scores / .logits when asked)
    output_scores: bool = False  # per step, the scores after the logits processors, (rows, vocab) each
    output_logits: bool = False  # per step, the raw next-token logits, (rows, vocab) each
    # optkit's own: how the steps run (never which tokens come out, in fp32)
    cache_implementation: str | None = Field(default="static", min_length=1)  # a kv_cache; None: the spec's
    decode_graph: bool | None = None  # one CUDA-graph replay per step; None: on CUDA when the components allow
    compile: bool | None = None  # torch.compile the decode step; None: optkit.inference.policy decides (a warm
    # compile cache, or enough work to repay the compile; never for small models)

    def __init__(self, **settings: Any) -> None:
        try:
            super().__init__(**settings)
        except ValidationError as exc:
            raise _InvalidSettings(_problems(exc, settings), "GenerationConfig()") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise InputError(f"GenerationConfig is immutable (it may be shared between threads); "
                         f"use cfg.replace({name}=...) for a changed copy")

    @field_validator("eos_token_id", mode="before")
    @classmethod
    def _tuple_as_list(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    # -- building -----------------------------------------------------------------------------
    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with ``changes`` applied, validated like the constructor (unknown names included); the
        settings this config did not set stay unset (see :meth:`explicit`)."""
        return GenerationConfig(**{**self.explicit(), **changes})

    def explicit(self) -> dict[str, Any]:
        """Only the settings given when this config was made (transformers' "not None" ones): what it
        changes when laid over a model's own config, and what ``generation_config.json`` stores."""
        return {name: getattr(self, name) for name in type(self).model_fields if name in self.model_fields_set}

    def over(self, base: GenerationConfig) -> GenerationConfig:
        """``base`` with this config's explicit settings laid on top: transformers 5's rule for
        ``generate(generation_config=cfg)``, where settings ``cfg`` leaves unset come from the model's."""
        return base.replace(**self.explicit())

    def to_json(self) -> str:
        """``generation_config.json``'s text (the explicit settings; transformers reads it), refusing, as
        transformers' save does, sampling settings that greedy decoding would ignore."""
        ignored = ignored_sampling_settings(self, self.model_fields_set)
        if ignored:
            raise InputError(f"generation config: {', '.join(ignored)}: only used when sampling, but do_sample is "
                             "False; set do_sample=True or drop them before saving (transformers refuses this too)")
        return json.dumps(self.explicit(), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` (a file name, or a directory to hold generation_config.json)."""
        path = Path(path)
        text = self.to_json()
        (path / GENERATION_CONFIG_NAME if path.is_dir() else path).write_text(text, encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "generation config") -> GenerationConfig:
        """Read transformers' layout: optkit's fields are validated strictly; other keys are dropped
        when they cannot change the tokens (metadata, output flags, a sampler left at its "off"
        value, any None), and refused otherwise: ignoring them would silently generate other text."""
        if not isinstance(data, Mapping):
            raise InputError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
        fields, refused = {}, []
        for key, value in data.items():
            if key in cls.model_fields:
                field = cls.model_fields[key]
                if value is not None or (field.default is not None and _accepts_none(field.annotation)):
                    fields[key] = value  # null is "unset" (transformers), unless None means other than the default
            elif not _has_no_effect(key, value):
                near = difflib.get_close_matches(key, cls.model_fields, n=1, cutoff=0.8)
                if key in OFF_VALUES or near:  # a transformers setting optkit lacks, or a typo of one it has
                    refused.append(f"{key}={_short(value)}" + (f" (did you mean {near[0]!r}?)" if near else ""))
                # any other key is a custom entry: transformers keeps it as an attribute nothing reads
        if refused:
            raise InputError(f"{source}: {'; '.join(refused)}: not implemented by optkit, so generation would not "
                             f"follow it; remove it from the file (settings: {', '.join(cls.model_fields)})")
        try:
            config = cls(**fields)
        except _InvalidSettings as exc:
            raise InputError(f"{source}: " + "; ".join(exc.problems)) from None
        ignored = ignored_sampling_settings(config, fields)
        if ignored:  # transformers logs the same and decodes greedily
            warnings.warn(f"{source}: {', '.join(ignored)}: only used when sampling, but do_sample is False; greedy "
                          "decoding ignores them", UserWarning, stacklevel=3)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationConfig:
        """A ``generation_config.json`` (transformers' or ``to_dict()``'s), or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / GENERATION_CONFIG_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"generation config {str(path)!r}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"generation config {str(path)!r}: cannot be read ({exc})") from None
        try:
            data = json.loads(text, object_pairs_hook=_without_duplicates)
        except json.JSONDecodeError as exc:
            raise InputError(f"generation config {str(path)!r}: not valid JSON ({exc})") from None
        except _DuplicateKey as exc:
            raise InputError(f"generation config {str(path)!r}: {exc.key} is given twice (JSON keeps the last one "
                             "silently); keep one") from None
        return cls.from_dict(data, source=f"generation config {str(path)!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain JSON values; ``GenerationConfig(**cfg.to_dict()) == cfg``."""
        return self.model_dump()


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = _short(key)


def _without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (``{"top_k": 5, "top_k": 50}``: which one was meant?)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def _accepts_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def ignored_sampling_settings(cfg: GenerationConfig, names: typing.Iterable[str]) -> list[str]:
    """Among ``names``, the sampling-only settings ``cfg`` gives a non-neutral value while it decodes greedily."""
    if cfg.do_sample:
        return []
    neutral = {"temperature": (None, 1.0), "top_p": (None, 1.0), "top_k": (None,)}
    return [f"{name}={getattr(cfg, name)!r}" for name in SAMPLING_ONLY
            if name in names and getattr(cfg, name) not in neutral[name]]


def _has_no_effect(key: str, value: Any) -> bool:
    """Whether a transformers key optkit has no field for can be dropped without changing the tokens."""
    if key.startswith("_") or key in NO_EFFECT_KEYS or value is None or value == [] or value == {}:
        return True
    off = OFF_VALUES.get(key, ...)
    return value == off and isinstance(value, bool) == isinstance(off, bool)


class _InvalidSettings(InputError):
    """Settings GenerationConfig refused, one line each; several are joined in one message."""

    def __init__(self, problems: list[str], where: str):
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else f"bad {where} arguments: " + "; ".join(problems))


def _problems(exc: ValidationError, given: Mapping[str, Any]) -> list[str]:
    """One line per bad setting, naming it and what it must be."""
    problems: dict[str, str] = {}
    for error in exc.errors():
        name = str(error["loc"][0])
        if name in problems:
            continue  # a union type reports one error per alternative
        if error["type"] == "extra_forbidden":
            problems[name] = unknown_setting(name)
        else:
            problems[name] = f"{name}={_short(given.get(name, error['input']))}: must be {REQUIREMENTS[name]}"
    return list(problems.values())


def resolve(base: GenerationConfig, overrides: Mapping[str, Any], where: str) -> GenerationConfig:
    """``base`` with ``overrides`` applied (transformers' keyword-over-config rule), validated; the
    InputError names every bad setting, ``where`` says whose arguments they were."""
    if not overrides:
        return base
    try:
        return GenerationConfig(**{**base.to_dict(), **overrides})
    except _InvalidSettings as exc:
        raise _InvalidSettings(exc.problems, where) from None


def unknown_setting(name: str) -> str:
    """The message for a setting that does not exist, with the nearest real one."""
    near = difflib.get_close_matches(name, GenerationConfig.model_fields, n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"{name}: not a generation setting; {hint}(settings: {', '.join(GenerationConfig.model_fields)})"
