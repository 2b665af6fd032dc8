"""Hugging Face checkpoint files in and out (OPT, and every family in optkit.formats).

Reads ``config.json`` + weights (``model.safetensors``, sharded safetensors with an
index, or ``pytorch_model.bin`` loaded with ``weights_only=True``; never arbitrary
pickle), with or without the ``model.`` prefix and with or without ``lm_head.weight``; a damaged or
inconsistent checkpoint is one CheckpointError naming the file and the key or field.
Writes ``config.json`` + safetensors that ``transformers`` reads back, replacing an earlier save as
one atomic change (optkit.checkpoint_files says how). Turning the files into a model is optkit.loading.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from optkit.bundled import bundled_directory
from optkit.checkpoint_files import (CONFIG_NAME, PICKLE, PICKLE_INDEX, SAFETENSORS,  # noqa: F401 - re-exported
                                     OPTKIT_SPEC_NAME, SAFETENSORS_INDEX, Weights, capped, find_weights, inside,
                                     quoted, read_weights, write_checkpoint, Writer)
from optkit.errors import CheckpointError, CheckpointNotFoundError, InputError, SpecValidationError
from optkit.formats import CheckpointFormat, format_for_config, format_for_spec
from optkit.spec import ModelSpec

# Floating dtypes a config's torch_dtype may name for dtype="auto".
AUTO_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Keys that real checkpoints carry and no model needs (fairseq leftovers, rotary buffers).
IGNORED_KEYS = re.compile(r"(^|\.)(version|_float_tensor|inv_freq)$")
SHOWN_UNITS = 5  # streamed units named in save_pretrained's refusal


# -- config.json <-> ModelSpec, key names (per family, see optkit.formats) ----------------------
def spec_from_hf_config(config: dict[str, Any], *, head: str = "causal_lm", num_labels: int | None = None,
                        source: str | None = None) -> ModelSpec:
    """A transformers ``config.json`` as an optkit spec, through its family's format."""
    fmt = format_for_config(config, source)
    fmt.check_config(config, source)
    if head not in fmt.head_classes:
        raise SpecValidationError([f"head: unknown head '{head}' (available: {', '.join(fmt.head_classes)})"])
    return fmt.spec_from_config(config, head=head, num_labels=num_labels, source=source)


def hf_config_from_spec(spec: ModelSpec, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The ``config.json`` transformers needs to rebuild this model."""
    return format_for_spec(spec).config_from_spec(spec, dtype)


def optkit_key(fmt: CheckpointFormat, hf_key: str) -> str | None:
    """transformers' key -> optkit's module path (None: a key nothing needs)."""
    if IGNORED_KEYS.search(hf_key):
        return None
    key = hf_key.removeprefix("model.")
    for prefix in fmt.head_prefixes:
        if key.startswith(prefix + "."):
            return f"head[{prefix}]." + key[len(prefix) + 1:]
    return fmt.optkit_key(key)


def hf_key(fmt: CheckpointFormat, key: str, head_prefix: str, *, base_model: bool) -> str:
    """optkit's module path -> transformers' key."""
    if key.startswith("head."):
        return f"{head_prefix}.{key[len('head.'):]}"
    key = fmt.hf_key(key)
    return key if base_model else f"model.{key}"


# -- reading ------------------------------------------------------------------------------------
def resolve_checkpoint_dir(path_or_id: str | os.PathLike, *, revision: str | None = None,
                           local_files_only: bool | None = None) -> Path:
    """A local directory, ``"optkit-default"`` (the bundled model), or a Hub id resolved through
    huggingface_hub's cache (offline when cached)."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise InputError(f"the checkpoint must be a directory path or a Hub id (a str or os.PathLike), got "
                         f"{quoted(path_or_id)} ({type(path_or_id).__name__})")
    bundled = bundled_directory(path_or_id)
    if bundled is not None:
        return bundled
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; pass the directory that holds config.json and the weights")
    name = str(path_or_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointNotFoundError(f"checkpoint directory {name} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    patterns = [CONFIG_NAME, "*.safetensors", SAFETENSORS_INDEX, "pytorch_model*.bin", PICKLE_INDEX, OPTKIT_SPEC_NAME]
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_exc:  # noqa: BLE001 - any failure means "not cached"
        if local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CheckpointNotFoundError(
                f"'{name}' is not a local directory and is not in the Hugging Face cache ({HF_HUB_CACHE}); "
                f"offline mode is on, so it was not downloaded ({type(cached_exc).__name__})") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=[CONFIG_NAME, "*.safetensors",
                                                                                SAFETENSORS_INDEX, OPTKIT_SPEC_NAME]))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointNotFoundError(
            f"cannot find checkpoint '{name}': it is not a local directory, not in the Hugging Face cache "
            f"({HF_HUB_CACHE}), and downloading it failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"Check the id, or download it where the Hub is reachable (`hf download {name}`) and pass the "
            "directory") from None


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint, safetensors preferred (an index names only files inside ``directory``)."""
    return find_weights(directory).files


def read_state_dict(files: Iterable[Path] | Weights, *, progress: bool = False) -> dict[str, Tensor]:
    """All tensors of the weight files, each stored once; ``progress`` reports each file on stderr (for terminals).

    Given the ``Weights`` of a sharded checkpoint, the shards must also hold exactly what its index lists.
    """
    if not isinstance(files, Weights):
        files = Weights(Path("."), tuple(str(path) for path in files))  # Path(".") / "/a/b" is "/a/b"
    return read_weights(files, progress=progress)


def _to_canonical(fmt: CheckpointFormat, raw: dict[str, Tensor], head_prefix: str
                  ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Checkpoint keys -> optkit keys (keys of other heads are dropped), and each optkit key's name in the file."""
    state: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    for key, tensor in raw.items():
        mapped = optkit_key(fmt, key)
        if mapped is None:
            continue
        if mapped.startswith("head["):
            prefix, rest = mapped[len("head["):].split("].", 1)
            if prefix != head_prefix:
                continue
            mapped = "head." + rest
        if mapped in names:
            raise CheckpointError(f"{quoted(names[mapped])} and {quoted(key)} are the same tensor (with and without "
                                  "the 'model.' prefix); a checkpoint holds each tensor once: delete one of them")
        state[mapped], names[mapped] = tensor, key
    return state, names


def _file_namer(fmt: CheckpointFormat, model: Any, raw: dict[str, Tensor], names: dict[str, str]
                ) -> Callable[[str], str]:
    """optkit key -> the name the checkpoint uses (or would use) for it, so users can grep their files."""
    if raw:
        bare = not any(key.startswith("model.") for key in raw)
    else:
        bare = model.spec.head.name == "base"
    prefix = model.head.checkpoint_prefix
    return lambda key: capped(names.get(key) or hf_key(fmt, key, prefix, base_model=bare))


def config_dtype(config: dict[str, Any], *, source: str) -> torch.dtype:
    """The dtype a config's ``torch_dtype`` (or newer ``dtype``) names, for ``dtype="auto"``; float32 when unset."""
    field = "torch_dtype" if config.get("torch_dtype") is not None else "dtype"
    value = config.get(field) or "float32"
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in AUTO_DTYPES:
        raise CheckpointError(f"{source}: field '{field}' is {quoted(value)}, not a floating-point dtype "
                              f"({', '.join(AUTO_DTYPES)}); fix the field, or pass dtype=torch.float32 (or another) "
                              "instead of dtype=\"auto\"")
    return getattr(torch, name)



# -- writing ------------------------------------------------------------------------------------
def save_pretrained(model: Any, directory: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
                    extra_files: dict[str, Writer] | None = None, format: str = "auto", tokenizer: Any = None) -> Path:
    """``config.json`` + safetensors in transformers' layout (sharded with an index when large), or optkit's own.

    ``format``: "auto" writes transformers' format whenever the model has a transformers equivalent and
    optkit's own format (optkit.native_checkpoint: the spec as YAML + safetensors) when it has not, e.g.
    a plugin's MLP; "transformers" demands transformers' format (and raises why not); "optkit" asks for
    optkit's. ``tokenizer`` (a directory of tokenizer files, or an object with ``save_pretrained``) is
    written along, in the same step.

    The save replaces the checkpoint already in ``directory`` as a whole (see optkit.checkpoint_files):
    a crash or a full disk leaves the old checkpoint, the new one, or a directory that refuses to load,
    never a mix. Other files in the directory are left alone. ``extra_files`` (name -> writer of a path)
    are written in the same all-or-nothing step, e.g. a trainer's state next to its weights.
    """
    from optkit.native_checkpoint import native_files, resolve_format, tokenizer_files

    directory = Path(directory)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise InputError(f"max_shard_bytes={quoted(max_shard_bytes)}: must be a positive number of bytes (an int, "
                         "e.g. 5 * 2**30)")
    native = resolve_format(model, format) == "optkit"  # optkit's format keeps optkit's own tensor names
    if not native:
        fmt = format_for_spec(model.spec, registry=model.registry)
        config = fmt.config_from_spec(model.spec, model.dtype)
        base = model.spec.head.name == "base"
    tied = model.head.tied
    state = model.state_dict()
    _refuse_meta(model, state)
    tensors = {}
    for key, tensor in state.items():
        if tied and key == "head.weight":
            continue
        name = key if native else hf_key(fmt, key, model.head.checkpoint_prefix, base_model=base)
        tensors[name] = _standalone(tensor)
    shards = _shard(tensors, max_shard_bytes)
    files: dict[str, Writer] = {}
    if len(shards) == 1:
        files[SAFETENSORS] = lambda path: _write_safetensors(shards[0], path)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            files[name] = lambda path, shard=shard: _write_safetensors(shard, path)
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        files[SAFETENSORS_INDEX] = lambda path: path.write_text(json.dumps(index, indent=2))
    if native:
        files = native_files(model, files)  # + optkit-spec.yaml and the manifest (config.json)
    for name, write in (extra_files or {}).items():
        if not isinstance(name, str) or not inside(name):
            raise InputError(f"extra_files: {quoted(name)} is not a relative path inside {capped(str(directory))}; "
                             "name each extra file relative to the checkpoint directory (no '..', no absolute path)")
        if name in files or name == CONFIG_NAME:
            raise InputError(f"extra_files: {quoted(name)} is a file of the checkpoint itself; give it another name")
        files[name] = write
    if not native:
        files[CONFIG_NAME] = lambda path: path.write_text(json.dumps(config, indent=2) + "\n")
    for name, write in tokenizer_files(tokenizer).items():
        files.setdefault(name, write)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.explicit() and "generation_config.json" not in files:
        text = generation_config.to_json()  # checked before anything is written
        files["generation_config.json"] = lambda path: path.write_text(text)  # generate()'s defaults travel along
    write_checkpoint(directory, files)
    return directory


def check_savable(model: Any, format: str = "auto") -> str:
    """Whether ``save_pretrained`` would succeed, found without writing a byte (for trainers, before step 1):
    the format it would write ("transformers" or "optkit"), or the error the save would raise."""
    from optkit.native_checkpoint import resolve_format, spec_text

    chosen = resolve_format(model, format)
    _refuse_meta(model, model.state_dict())
    if chosen == "optkit":
        spec_text(model.spec)  # the spec must survive its own YAML
    return chosen


def _refuse_meta(model: Any, state: dict[str, Tensor]) -> None:
    """A model whose weights are not all in memory (streamed units of a device map, or built on meta) is not saved."""
    meta = [key for key, tensor in state.items() if tensor.device.type == "meta"]
    if not meta:
        return
    device_map = model.device_map or {}
    units = [unit for unit in device_map if any(key.startswith(unit + ".") for key in meta)]
    if units:
        where = ", ".join(f"{unit} ({device_map[unit]!r})" for unit in units[:SHOWN_UNITS])
        raise InputError(f"save_pretrained cannot save this model: its device map streams {len(units)} unit(s) from "
                         f"cpu or disk ({where}{' ...' if len(units) > SHOWN_UNITS else ''}), whose weights are not in "
                         "memory; load the checkpoint again without device_map (or with every unit on a device) "
                         "to save it")
    raise InputError(f"save_pretrained cannot save this model: {len(meta)} tensor(s) are on the meta device (e.g. "
                     f"{capped(meta[0])}) and have no values; load or assign the weights before saving")


def _write_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _standalone(tensor: Tensor) -> Tensor:
    """A CPU tensor owning exactly its data (safetensors refuses views that share storage, e.g. fused q/k/v)."""
    tensor = tensor.detach().to("cpu")
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor.contiguous()


def _shard(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards
