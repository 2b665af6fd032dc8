"""optkit's own checkpoint format: for models that transformers cannot describe.

A model built from plugin components with no transformers equivalent (a GeGLU MLP, a scaled
RMSNorm, sinusoidal positions, ...) has no ``config.json`` that transformers understands, yet its
weights are ordinary tensors and its spec says exactly how to rebuild it. So the checkpoint is:

- ``optkit-spec.yaml``: the resolved spec (what ``optkit spec show`` prints), the model's recipe;
- ``model.safetensors`` (or shards + ``model.safetensors.index.json``): the weights under optkit's
  own module paths (``decoder.layers.0.mlp.gate_proj.weight``), never a pickle;
- ``config.json``: the manifest, ``{"model_type": "optkit", "optkit_format_version": 1, ...}``, naming
  the plugins (entry point, distribution, version) whose components the spec uses. It is written last,
  as in every optkit save (optkit.checkpoint_files), so it is the commit; transformers refuses it
  with "unrecognized model type 'optkit'" instead of misreading it;
- tokenizer files and ``generation_config.json`` when given, as for transformers' format.

``save_pretrained`` writes it when the model has no transformers equivalent (or with ``format="optkit"``);
``from_pretrained`` reads it with the plugins its manifest names, and a missing one is one
CheckpointError naming the component, the plugin and the package to install.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from optkit.checkpoint_files import CONFIG_NAME, OPTKIT_SPEC_NAME, Writer, capped, inside, quoted
from optkit.errors import CheckpointError, InputError, SpecValidationError, brief_repr, shorten
from optkit.interfaces.adapters import held_adapters
from optkit.spec import DECODER_COMPONENTS, ModelSpec, parse_yaml, validate_spec

log = logging.getLogger("optkit")

MODEL_TYPE = "optkit"  # config.json's model_type for this format
FORMAT_VERSION = 1  # bumped when a reader of this version could not read what a newer writer writes
SPEC_NAME = OPTKIT_SPEC_NAME
FORMATS = ("auto", "transformers", "optkit")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")

Format = Literal["transformers", "optkit"]


# -- which format -------------------------------------------------------------------------------
def transformers_problems(model: Any) -> Exception | None:
    """Why transformers' format cannot describe ``model`` (the error its config writer raises), or None."""
    from optkit.formats import format_for_spec

    if held_adapters(model):  # LoRA wrappers rename the base weights (q_proj.base.weight): no transformers key
        return InputError(f"the model holds LoRA adapter(s) {', '.join(held_adapters(model))}, which transformers' "
                          "format cannot hold; merge them in first (optkit.adapters.merge_and_unload(model)), or "
                          "save only the adapters in PEFT's files (model.save_adapter(dir))")
    try:
        format_for_spec(model.spec, registry=model.registry).config_from_spec(model.spec, model.dtype)
    except (SpecValidationError, CheckpointError) as exc:
        return exc
    return None


def adapters_problem(model: Any) -> InputError | None:
    """Adapters a checkpoint of ``model`` could not be loaded back with (the spec's ``adapters:`` block
    rebuilds only its own; added ones would make the saved checkpoint unloadable), or None."""
    names = held_adapters(model)
    described = getattr(model.spec, "adapters", None)
    if not names or (described is not None and names == [described.name]):
        return None
    return InputError(f"save_pretrained cannot save this model: it holds LoRA adapter(s) {', '.join(names)} that "
                      "its spec does not describe, so the checkpoint would not load back; merge them in first "
                      "(optkit.adapters.merge_and_unload(model)), or save only the adapters in PEFT's files "
                      "(model.save_adapter(dir) / optkit.adapters.save_adapters)")


def resolve_format(model: Any, format: str = "auto") -> Format:
    """The format ``save_pretrained(model, ..., format=format)`` writes: transformers' whenever it can
    describe the model ("auto"), optkit's otherwise; ``"transformers"`` raises transformers' refusal."""
    if format not in FORMATS:
        raise InputError(f"format={brief_repr(format, 40)}: save_pretrained's format is 'auto' (transformers' "
                         "when the model has a transformers equivalent, else optkit's own), 'transformers' or 'optkit'")
    problem = adapters_problem(model)
    if problem is not None:
        raise problem
    if format == "optkit":
        return "optkit"
    problem = transformers_problems(model)
    if problem is None:
        return "transformers"
    if format == "transformers":
        raise problem
    return "optkit"


# -- writing ------------------------------------------------------------------------------------
def spec_text(spec: ModelSpec) -> str:
    """The spec as the YAML file of the checkpoint, checked to read back as the same spec."""
    text = ("# optkit model spec: how to rebuild the model whose weights are in this directory\n"
            "# (optkit.from_pretrained reads it; see docs/checkpoints.md, \"optkit's own format\")\n"
            + spec.to_yaml())
    again = parse_yaml(text, source=SPEC_NAME)
    if again != spec.to_dict():
        raise CheckpointError(f"the model's spec does not survive YAML (it reads back as {brief_repr(again)}); "
                              "report this as an optkit bug")
    return text


def providers(spec: ModelSpec, registry: Any) -> list[dict[str, Any]]:
    """The plugins whose components ``spec`` uses: entry point, distribution, version and the components."""
    found: dict[str, dict[str, Any]] = {}
    for kind, name in components(spec):
        if (kind, name) not in registry:  # e.g. a kernel installed by hand: the spec still names it
            continue
        provider = registry.get(kind, name).provider
        entry = found.setdefault(provider.plugin, {"plugin": provider.plugin, "distribution": provider.distribution,
                                                   "version": provider.version, "components": []})
        entry["components"].append(f"{kind}:{name}")
    return list(found.values())


def components(spec: ModelSpec | dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, name) of every component a spec (or its raw dict) chooses."""
    data = spec.to_dict() if isinstance(spec, ModelSpec) else spec
    decoder = data.get("decoder") if isinstance(data.get("decoder"), dict) else {}
    refs = [(kind, decoder.get(kind)) for kind in DECODER_COMPONENTS] + [("head", data.get("head"))]
    named = [(kind, ref if isinstance(ref, str) else ref.get("name") if isinstance(ref, dict) else None)
             for kind, ref in refs]
    return [(kind, name) for kind, name in named if isinstance(name, str)]


def manifest(model: Any) -> dict[str, Any]:
    """config.json of the format: what it is, the dtype the weights are in, and the plugins it needs."""
    import optkit

    return {"model_type": MODEL_TYPE, "optkit_format_version": FORMAT_VERSION, "optkit_version": optkit.__version__,
            "spec_file": SPEC_NAME, "torch_dtype": str(model.dtype).removeprefix("torch."),
            "plugins": providers(model.spec, model.registry)}


def native_files(model: Any, weight_files: dict[str, Writer]) -> dict[str, Writer]:
    """The spec and the manifest next to the weight files (the manifest, config.json, last: the commit)."""
    text, config = spec_text(model.spec), manifest(model)
    files = dict(weight_files)
    files[SPEC_NAME] = lambda path: path.write_text(text, encoding="utf-8")
    files[CONFIG_NAME] = lambda path: path.write_text(json.dumps(config, indent=2) + "\n")
    log.info("optkit: saving in optkit's own format (%s): %s", SPEC_NAME,
             shorten(str(transformers_problems(model) or "format='optkit' was asked for"), 300))
    return files


def tokenizer_files(tokenizer: Any) -> dict[str, Writer]:
    """Writers of a tokenizer's files: from a directory (the files it has), or an object with ``save_pretrained``."""
    if tokenizer is None:
        return {}
    if isinstance(tokenizer, (str, os.PathLike)):
        source = Path(tokenizer)
        if not source.is_dir():
            raise InputError(f"tokenizer={quoted(str(tokenizer))} is not a directory of tokenizer files")
        found = {name: source / name for name in TOKENIZER_FILES if (source / name).is_file()}
        if not found:
            raise InputError(f"tokenizer directory {capped(str(source))} has none of {', '.join(TOKENIZER_FILES)}")
        return {name: (lambda path, file=file: shutil.copyfile(file, path)) for name, file in found.items()}
    if not hasattr(tokenizer, "save_pretrained"):
        raise InputError(f"tokenizer must be a directory or have save_pretrained(directory), got "
                         f"{type(tokenizer).__name__}")
    scratch = Path(tempfile.mkdtemp(prefix="optkit-tokenizer-"))
    try:
        tokenizer.save_pretrained(str(scratch))
        contents = {p.name: p.read_bytes() for p in scratch.iterdir() if p.is_file()}
    except Exception as exc:  # noqa: BLE001 - whatever the tokenizer's own code raises; nothing is written yet
        raise InputError(f"tokenizer: {type(tokenizer).__name__}.save_pretrained failed "
                         f"({type(exc).__name__}: {shorten(str(exc))}); nothing was saved: fix the tokenizer, or "
                         "pass the directory of its files (tokenizer='path/to/tokenizer')") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {name: (lambda path, data=data: path.write_bytes(data)) for name, data in contents.items()}


# -- reading ------------------------------------------------------------------------------------
def is_native(config: dict[str, Any]) -> bool:
    """Whether a config.json is this format's manifest."""
    return config.get("model_type") == MODEL_TYPE


def read_spec(directory: Path, config: dict[str, Any], *, head: str | None = None, num_labels: int | None = None,
              chosen: dict[str, Any] | None = None, registry: Any = None) -> ModelSpec:
    """The spec of a native checkpoint, checked against the plugins loaded now.

    ``chosen``: components the caller picks itself (``{"attention": "sdpa"}``), whose saved choice need not
    be installed. ``head``/``num_labels`` swap the saved head (None: keep it).
    """
    chosen = {kind: choice for kind, choice in (chosen or {}).items() if choice is not None}
    if registry is None:
        from optkit import registry
    source = directory / CONFIG_NAME
    version = config.get("optkit_format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{source}: field 'optkit_format_version' is {quoted(version)}, not a positive "
                              "integer; the manifest is damaged: save the checkpoint again")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source} is optkit format version {version}, written by a newer optkit "
                              f"({quoted(config.get('optkit_version'))}); this optkit reads version "
                              f"{FORMAT_VERSION}: upgrade optkit")
    name = config.get("spec_file", SPEC_NAME)
    if not isinstance(name, str) or not inside(name):
        raise CheckpointError(f"{source}: field 'spec_file' is {quoted(name)}; it must name a file inside "
                              f"{directory}")
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{directory} is an optkit checkpoint without its spec file {capped(name)}; "
                              "copy it back or save the checkpoint again")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), source=str(path))
    except (OSError, UnicodeDecodeError, SpecValidationError) as exc:
        raise CheckpointError(f"cannot read {path}: {shorten(str(exc), 300)}; save the checkpoint again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a YAML {type(data).__name__}, not a model spec")
    _require_plugins(directory, config, data, tuple(chosen), registry)
    data = _with_head(_with_choices(data, chosen), head, num_labels)
    return validate_spec(data, source=str(path), registry=registry)


def _with_choices(data: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """The raw spec with the components the caller chose instead of the saved ones."""
    if not chosen or not isinstance(data.get("decoder"), dict):
        return data
    picked = {kind: choice.model_dump() if hasattr(choice, "model_dump") else choice for kind, choice in chosen.items()}
    return {**data, "decoder": {**data["decoder"], **picked}}


def _with_head(data: dict[str, Any], head: str | None, num_labels: int | None) -> dict[str, Any]:
    """The raw spec with the head the caller asked for (the saved one's params kept when it is the same head)."""
    if head is None and num_labels is None:
        return data
    saved = data.get("head") if isinstance(data.get("head"), dict) else {"name": data.get("head"), "params": {}}
    name = head or saved.get("name")
    params = dict(saved.get("params") or {}) if name == saved.get("name") else {}
    if num_labels is not None:
        params["num_labels"] = num_labels
    return {**data, "head": {"name": name, "params": params}}


def _require_plugins(directory: Path, config: dict[str, Any], data: dict[str, Any], chosen: tuple[str, ...],
                     registry: Any) -> None:
    """One CheckpointError naming every saved component no loaded plugin provides, with its plugin and package."""
    missing = [(kind, name) for kind, name in components(data) if kind not in chosen and (kind, name) not in registry]
    if not missing:
        _note_other_providers(config, data, registry)
        return
    saved = _saved_providers(config)
    groups: dict[tuple[str, str, str], list[str]] = {}
    for kind, name in missing:
        plugin, distribution, version = saved.get(f"{kind}:{name}", ("?", "?", "?"))
        groups.setdefault((plugin, distribution, version), []).append(f"{kind} '{shorten(name, 80)}'")
    parts, fixes = [], []
    for (plugin, distribution, version), names in groups.items():
        if plugin == "?":
            parts.append(f"{', '.join(names)} (its manifest does not say which plugin provides it)")
            fixes.append("install the plugin that registers it")
            continue
        record = next((r for r in getattr(registry, "plugins", []) if r.name == plugin), None)
        parts.append(f"{', '.join(names)}, provided by plugin '{shorten(plugin, 80)}' of the package "
                     f"{shorten(distribution, 80)} {shorten(version, 40)}, {_plugin_state(record)}")
        fixes.append(_plugin_fix(record, plugin, distribution))
    swappable = sorted({kind for kind, _ in missing if kind in ("attention", "linear", "kv_cache")})
    if swappable:
        fixes.append("choose another with " + ", ".join(f"{kind}=..." for kind in swappable))
    raise CheckpointError(f"{directory} is an optkit checkpoint whose model needs components that no loaded plugin "
                          f"provides: {'; '.join(parts)}. To load it, {'; or '.join(dict.fromkeys(fixes))}")


def _saved_providers(config: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """"kind:name" -> (plugin, distribution, version) from the manifest (a damaged entry is skipped)."""
    result = {}
    for entry in config.get("plugins") or []:
        if not isinstance(entry, dict):
            continue
        who = tuple(str(entry.get(field, "?")) for field in ("plugin", "distribution", "version"))
        for component in entry.get("components") or []:
            if isinstance(component, str):
                result[component] = who
    return result  # type: ignore[return-value]


def _plugin_state(record: Any) -> str:
    """What became of a plugin here: not installed, or installed but blocked/disabled/broken (and why)."""
    if record is None:
        return "which is not installed"
    if record.status == "ok":
        return f"which is installed ({record.distribution} {record.version}) but does not register it"
    return f"which is installed but {record.status} ({shorten(record.reason, 120)})"


def _plugin_fix(record: Any, plugin: str, distribution: str) -> str:
    """How to get a plugin's components back, for the state it is in."""
    if record is None:
        if distribution in ("?", "<direct>", "<temporary>"):
            return f"register plugin '{shorten(plugin, 80)}' in this process"
        return f"install {shorten(distribution, 80)} (pip install {shorten(distribution, 80)})"
    if record.status == "blocked":
        return f"remove '{shorten(plugin, 80)}' from OPTKIT_BLOCK_PLUGINS"
    if record.status == "disabled":
        return f"allow plugin '{shorten(plugin, 80)}' ({shorten(record.reason, 80)})"
    if record.status == "broken":
        return f"fix or reinstall {shorten(distribution, 80)} (`optkit plugins` shows its error)"
    return f"install the version of {shorten(distribution, 80)} that saved it"


def _note_other_providers(config: dict[str, Any], data: dict[str, Any], registry: Any) -> None:
    """Log when a component now comes from another package than the one that saved it (weights may not fit)."""
    saved = _saved_providers(config)
    for kind, name in components(data):
        then = saved.get(f"{kind}:{name}")
        if then is None or (kind, name) not in registry:
            continue
        now = registry.get(kind, name).provider
        if then[1] != now.distribution:
            log.warning("optkit: %s '%s' was saved with plugin '%s' (%s %s) and is now provided by %s", kind, name,
                        then[0], then[1], then[2], now)
