"""PEFT's LoRA files, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are the adapted module's path in the transformers model, under ``base_model.model.``, without
the adapter name: ``base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight`` for an
OPTForCausalLM. As with PEFT, the adapter named ``default`` is saved in the directory itself and any other
adapter ``name`` in ``directory/name``.

Reading, every config field is either understood, checked to be at its no-op value, or metadata; a field
that would change the computation in a way optkit does not implement (DoRA, biases, per-layer ranks...)
is refused by name, and a field optkit does not know is refused unless it is empty (then a warning says
it was ignored). Tensors that are missing, unexpected or mis-shaped are a CheckpointError naming the key
as it is in the file.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from optkit.adapters.attach import (adapter_names, attach, checkpoint_path, layer_linears, lora_modules,
                                    target_names)
from optkit.adapters.lora import DEFAULT_ALPHA, LoRASettings, check_adapter_name, check_settings
from optkit.checkpoint_files import quoted, read_json, read_pickle, read_safetensors
from optkit.errors import CheckpointError, CheckpointNotFoundError, InputError

if TYPE_CHECKING:
    from optkit.model import Model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"  # older PEFT; read with weights_only=True
PREFIX = "base_model.model."
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "base": "FEATURE_EXTRACTION", "sequence_classification": "SEQ_CLS",
              "question_answering": "QUESTION_ANS"}
KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")

# Fields read for the computation.
USED = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "peft_type")
# Fields that describe the file or only matter while PEFT initialises / trains, whatever their value.
METADATA = ("task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
            "megatron_core", "layers_pattern", "qalora_group_size", "ensure_weight_tying")
# Fields that change what is computed unless they have one of these values; any other value is refused.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "bias": ("none",), "fan_in_fan_out": (False,), "use_dora": (False,), "lora_bias": (False,),
    "modules_to_save": (None, []), "target_parameters": (None, []), "exclude_modules": (None, [], ""),
    "layers_to_transform": (None, []), "layer_replication": (None, []), "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None), "trainable_token_indices": (None,), "alora_invocation_tokens": (None,),
    "use_qalora": (False,), "use_bdlora": (None, False), "megatron_config": (None,),
    # Initialisations that also rewrite the base weights (PiSSA, OLoRA, LoftQ, CorDA...) make an adapter that
    # only fits the rewritten base; plain ones (True/False/"gaussian") only seed A and B.
    "init_lora_weights": (True, False, "gaussian"), "loftq_config": ({}, None), "corda_config": (None,),
    "eva_config": (None,), "kasa_config": (None,), "arrow_config": (None,), "lora_ga_config": (None,),
    "monteclora_config": (None,), "velora_config": (None,),
}
EMPTY = (None, False, {}, [], "")


class AdapterConfigWarning(UserWarning):
    """An adapter_config.json field optkit does not know was ignored because it was empty."""


# -- saving ----------------------------------------------------------------------------------------------
def save_adapters(model: Model, directory: str | os.PathLike[str], *, names: list[str] | None = None,
                  base_model_name_or_path: str | None = None) -> Path:
    """PEFT's files for each adapter (default: all): ``default`` in ``directory``, others in ``directory/name``.

    Only adapter tensors are written (kilobytes to megabytes). Each file is written whole and renamed into
    place, the config last.
    """
    directory = Path(directory)
    held = adapter_names(model)
    for name in names or []:
        if name not in held:
            raise InputError(f"no adapter named {quoted(name)} to save (adapters: {', '.join(held) or 'none'})")
    if not held:
        raise InputError("the model has no adapters to save; add one with add_adapters or load_adapters")
    for name in names or held:
        folder = directory if name == "default" else directory / name
        config, tensors = adapter_files(model, name, base_model_name_or_path=base_model_name_or_path)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the path, or a folder above it, is a file
            raise CheckpointError(f"cannot save adapter '{name}' into {folder}: {exc.strerror or exc}; pass a "
                                  "directory (it is created if missing)") from None
        _replace(folder / WEIGHTS_FILE, lambda path: _save_safetensors(tensors, path))
        _replace(folder / CONFIG_FILE, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def adapter_files(model: Model, name: str, *, base_model_name_or_path: str | None = None
                  ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config and the tensors (PEFT's keys) of adapter ``name``."""
    modules = {path: m for path, m in lora_modules(model).items() if name in m.settings}
    settings = {m.settings[name] for m in modules.values()}
    if len(settings) != 1:  # attach gives one adapter one setting; a hand-made mix has no PEFT config
        raise InputError(f"adapter '{name}' has different settings on different modules; PEFT's config holds one")
    s = settings.pop()
    tensors: dict[str, Tensor] = {}
    targets: dict[str, None] = {}
    for path, module in modules.items():
        file_path = checkpoint_path(model, path)
        targets[file_path.rsplit(".", 1)[-1]] = None
        for which, layer in (("A", module.lora_A[name]), ("B", module.lora_B[name])):
            tensors[f"{PREFIX}{file_path}.lora_{which}.weight"] = layer.weight.detach().to("cpu").contiguous().clone()
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES.get(model.spec.head.name),
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout, "use_rslora": s.use_rslora,
        "target_modules": sorted(targets), "bias": "none", "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
        "exclude_modules": None, "target_parameters": None, "layer_replication": None,
    }
    return config, tensors


def _save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _replace(target: Path, write: Any) -> None:
    """Write next to ``target`` and rename over it: a crash leaves the old file or the new one, never half."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, target)
    except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError ("File too large (os error 27)"), ...
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {target}: {getattr(exc, 'strerror', None) or exc}") from exc


# -- loading ---------------------------------------------------------------------------------------------
def load_adapters(model: Model, directory: str | os.PathLike[str], *, name: str = "default",
                  trainable: bool = False, dtype: torch.dtype | None = None) -> Model:
    """Load the adapter PEFT (or optkit) saved in ``directory`` as adapter ``name``.

    Everything is checked before the model changes. Like ``PeftModel.from_pretrained`` the adapter is
    loaded for inference (``trainable=False``: its parameters do not require grad; the base is frozen either
    way); the first adapter of a model becomes active, later ones wait for ``set_adapter``.
    """
    check_adapter_name(name)
    if name in adapter_names(model):
        raise InputError(f"the model already has an adapter named '{name}'; pass another name= "
                         f"(adapters: {', '.join(adapter_names(model))})")
    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{config_file} does not exist; pass the directory PEFT's save_pretrained "
                                      f"wrote (it holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_json(config_file, what=CONFIG_FILE)
    settings = settings_from_config(config, source=str(config_file))
    tensors, weights_file = _read_tensors(directory)
    paths = _modules_for_tensors(model, tensors, weights_file)
    _check_targets(model, config["target_modules"], set(paths), str(config_file))
    _check_shapes(model, paths, settings, tensors, weights_file)
    wrappers = attach(model, list(paths), settings, name=name, dtype=dtype, trainable=trainable)
    with torch.no_grad():
        for path, keys in paths.items():
            for which, layer in (("A", wrappers[path].lora_A[name]), ("B", wrappers[path].lora_B[name])):
                layer.weight.copy_(tensors[keys[which]])
    return model


def settings_from_config(config: dict[str, Any], *, source: str) -> LoRASettings:
    """LoRASettings from PEFT's config; one CheckpointError naming every field optkit cannot honour."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {quoted(config.get('peft_type'))}; optkit reads LoRA adapters (\"LORA\") only")
    missing = [field for field in ("r", "target_modules") if field not in config]  # lora_alpha: PEFT's default
    problems += [f"field '{field}' is missing" for field in missing]
    for field, allowed in NO_OP_VALUES.items():
        if field in config and config[field] not in allowed:
            problems.append(f"{field} = {quoted(config[field])} is not supported by optkit (supported: "
                            f"{' or '.join(json.dumps(v) for v in allowed)})")
    unknown = [f for f in config if f not in (*USED, *METADATA, *NO_OP_VALUES)]
    problems += [f"field '{f}' = {quoted(config[f])} is unknown to optkit; it is refused rather than ignored"
                 for f in unknown if config[f] not in EMPTY]
    targets = config.get("target_modules")
    if "target_modules" in config and not (isinstance(targets, str) and targets or isinstance(targets, list)
                                           and targets and all(isinstance(t, str) for t in targets)):
        problems.append(f"target_modules must be a non-empty list of names or a regex, got {quoted(targets)}")
    elif isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:  # PEFT matches a string as a regex over module paths
            problems.append(f"target_modules {quoted(targets)} is not a valid regex ({exc}); write a regex or a "
                            "list of projection names")
    alpha = config.get("lora_alpha", DEFAULT_ALPHA)
    if not missing:
        problems += check_settings(config["r"], alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems) + ". Fix the adapter's config (or save it "
                              "again with the options optkit supports)")
    ignored = [f for f in unknown if config[f] in EMPTY]
    if ignored:
        warnings.warn(f"{source}: ignored fields optkit does not know, all empty: {', '.join(ignored)}",
                      AdapterConfigWarning, stacklevel=3)
    return LoRASettings(config["r"], alpha, config.get("lora_dropout", 0.0), config.get("use_rslora", False))


def _read_tensors(directory: Path) -> tuple[dict[str, Tensor], Path]:
    for name, read in ((WEIGHTS_FILE, read_safetensors), (PICKLE_WEIGHTS_FILE, read_pickle)):
        if (directory / name).is_file():
            return read(directory / name), directory / name
    raise CheckpointNotFoundError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE} (or {PICKLE_WEIGHTS_FILE}); "
                                  "copy the adapter's weights next to its config")


def _modules_for_tensors(model: Model, tensors: dict[str, Tensor], file: Path) -> dict[str, dict[str, str]]:
    """optkit module path -> {"A": key, "B": key} for the file's keys; any key that is not a LoRA A/B weight of
    a projection this model has is named."""
    by_file_path = {checkpoint_path(model, path): path for path in layer_linears(model)}
    paths: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = KEY.match(key.removeprefix(PREFIX))
        module = by_file_path.get(match["module"]) if match else None
        if module is None:
            what = "a LoRA A/B weight" if match is None else f"module {quoted(match['module'])}, not a projection"
            raise CheckpointError(f"{file}: tensor {quoted(key)} is not one optkit can load ({what} of this "
                                  f"{model.spec.family} model's layers: {', '.join(target_names(model))}); "
                                  "was the adapter made for another model or with options optkit does not support?")
        paths.setdefault(module, {})[match["which"]] = key
    for path, keys in paths.items():
        for which, partner in (("A", "B"), ("B", "A")):
            if which not in keys:
                present = keys[partner]
                absent = present[:-len(f"lora_{partner}.weight")] + f"lora_{which}.weight"
                raise CheckpointError(f"{file}: tensor {quoted(absent)} is missing (its partner {quoted(present)} "
                                      "is there); save the adapter again")
    return paths


def _check_targets(model: Model, targets: str | list[str], found: set[str], source: str) -> None:
    """Every module the config targets has tensors, and no tensor is for a module it does not target
    (PEFT's matching: a regex string must match the whole module path, a list entry its last parts)."""
    expected = set()
    for path in layer_linears(model):
        file_path = checkpoint_path(model, path)
        if isinstance(targets, str):
            hit = re.fullmatch(targets, file_path) is not None
        else:
            hit = any(file_path == t or file_path.endswith("." + t) for t in targets)
        if hit:
            expected.add(path)
    if not expected:
        raise CheckpointError(f"{source}: target_modules {quoted(targets)} match no projection of this "
                              f"{model.spec.family} model ({', '.join(target_names(model))})")
    absent = sorted(expected - found, key=list(layer_linears(model)).index)
    if absent:
        key = f"{PREFIX}{checkpoint_path(model, absent[0])}.lora_A.weight"
        raise CheckpointError(f"{source}: target_modules selects {len(absent)} module(s) with no tensors in the "
                              f"weights file, e.g. {quoted(key)} is missing; save the adapter again")
    extra = sorted(found - expected)
    if extra:
        raise CheckpointError(f"{source}: the weights file has tensors for {quoted(checkpoint_path(model, extra[0]))}, "
                              f"which target_modules {quoted(targets)} does not select; the config and the weights "
                              "do not belong together")


def _check_shapes(model: Model, paths: dict[str, dict[str, str]], settings: LoRASettings,
                  tensors: dict[str, Tensor], file: Path) -> None:
    for path, keys in paths.items():
        base = model.get_submodule(path)
        wanted = {"A": (settings.r, base.in_features), "B": (base.out_features, settings.r)}
        for which, key in keys.items():
            tensor = tensors[key]
            if tuple(tensor.shape) != wanted[which] or not tensor.is_floating_point():
                raise CheckpointError(f"{file}: tensor {quoted(key)} has shape {tuple(tensor.shape)} and dtype "
                                      f"{str(tensor.dtype).removeprefix('torch.')}; this model needs a float tensor "
                                      f"of shape {wanted[which]} (r={settings.r}); was the adapter made for "
                                      "another model size or rank?")
