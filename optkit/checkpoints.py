"""Hugging Face checkpoints in and out (OPT, and every family in optkit.formats).

Reads ``config.json`` + weights (``model.safetensors``, sharded safetensors with an
index, or ``pytorch_model.bin`` loaded with ``weights_only=True``; never arbitrary
pickle), with or without the ``model.`` prefix and with or without ``lm_head.weight``; a damaged or
inconsistent checkpoint is one CheckpointError naming the file and the key or field.
Writes ``config.json`` + safetensors that ``transformers`` reads back, replacing an earlier save as
one atomic change (optkit.checkpoint_files says how).
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from optkit.checkpoint_files import (CONFIG_NAME, PICKLE, PICKLE_INDEX, SAFETENSORS,  # noqa: F401 - re-exported
                                     SAFETENSORS_INDEX, Weights, capped, find_weights, interrupted_hint,
                                     locked, quoted, read_json, read_weights, write_checkpoint, Writer)
from optkit.errors import CheckpointError, CheckpointNotFoundError, SpecValidationError
from optkit.formats import HEAD_PREFIXES, CheckpointFormat, format_for_config, format_for_spec
from optkit.spec import ModelSpec

# Floating dtypes a config's torch_dtype may name for dtype="auto".
AUTO_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Keys that real checkpoints carry and no model needs (fairseq leftovers, rotary buffers).
IGNORED_KEYS = re.compile(r"(^|\.)(version|_float_tensor|inv_freq)$")


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
    for prefix in HEAD_PREFIXES:
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
    """A local directory, or a Hub id resolved through huggingface_hub's cache (offline when cached)."""
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

    patterns = [CONFIG_NAME, "*.safetensors", SAFETENSORS_INDEX, "pytorch_model*.bin", PICKLE_INDEX]
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_exc:  # noqa: BLE001 - any failure means "not cached"
        if local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise CheckpointNotFoundError(
                f"'{name}' is not a local directory and is not in the Hugging Face cache ({HF_HUB_CACHE}); "
                f"offline mode is on, so it was not downloaded ({type(cached_exc).__name__})") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=[CONFIG_NAME, "*.safetensors",
                                                                                SAFETENSORS_INDEX]))
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


def load_weights(model: Any, raw: dict[str, Tensor], *, device: torch.device, dtype: torch.dtype,
                 source: str) -> None:
    """Put checkpoint tensors into a model built on "meta"; one error lists every mismatch by its name in the file."""
    fmt = format_for_spec(model.spec)
    state, names = _to_canonical(fmt, raw, model.head.checkpoint_prefix)
    name = _file_namer(fmt, model, raw, names)
    expected = dict(model.state_dict())
    tied = getattr(model.head, "tied", False)
    misshaped = [f"{name(k)} (checkpoint {list(state[k].shape)}, model {list(expected[k].shape)})"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    not_float = [f"{name(k)} ({str(state[k].dtype).removeprefix('torch.')}, model needs floating point)"
                 for k in expected if k in state and expected[k].is_floating_point()
                 and not state[k].is_floating_point()]
    if tied:  # the token embedding is the LM head: a head tensor in the file only has to fit
        state.pop("head.weight", None)
        expected.pop("head.weight", None)
    missing = [k for k in expected if k not in state]
    head_missing = [name(k) for k in missing if k.startswith("head.")]
    missing = [name(k) for k in missing if not k.startswith("head.")]
    unexpected = [name(k) for k in state if k not in expected]
    groups = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
              ("not floating point", not_float))
    if any(keys for _, keys in groups):
        lines = [f"checkpoint {source} does not fit the model its config.json describes:"]
        for label, keys in groups:
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    if head_missing:
        state.update(_fresh_head_state(model, device, dtype))
        warnings.warn(f"{source} has no weights for the {model.spec.head.name} head "
                      f"({', '.join(head_missing)}): they are newly initialized; train them before use",
                      stacklevel=3)
    # One decoder layer on the device at a time: int8 linears quantize as they land, so no full copy exists.
    for group in _by_layer(state):
        model.load_state_dict({k: _place(t, device, dtype) for k, t in group.items()}, strict=False, assign=True)
    model.tie_weights()


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def _by_layer(state: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Checkpoint tensors grouped per decoder layer (everything else in one group)."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        groups.setdefault(match[1] if match else "", {})[key] = tensor
    return list(groups.values())


def _place(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    return tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)


def _fresh_head_state(model: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    from optkit.builder import build_head

    head = build_head(model, device, dtype)
    return {f"head.{k}": v.to(dtype) for k, v in head.state_dict().items()}


def from_pretrained(path_or_id: str | os.PathLike, *, head: str = "causal_lm", attention: Any = None,
                    linear: Any = None, kv_cache: Any = None, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, num_labels: int | None = None,
                    revision: str | None = None, local_files_only: bool | None = None,
                    progress: bool | None = None) -> Any:
    """Load an OPT checkpoint (directory or Hub id) into an optkit model.

    ``dtype=None`` loads float32 (as transformers 4.x); ``dtype="auto"`` uses the
    checkpoint's ``torch_dtype``. ``progress`` (default: when stderr is a terminal) reports each weight file.
    """
    directory = resolve_checkpoint_dir(path_or_id, revision=revision, local_files_only=local_files_only)
    config_path = directory / CONFIG_NAME
    with locked(directory, shared=True):  # a save into this directory waits, so config and weights match
        if not config_path.is_file():
            raise CheckpointError(f"{directory} has no {CONFIG_NAME}; an OPT checkpoint needs one"
                                  + interrupted_hint(directory))
        config = read_json(config_path, what=CONFIG_NAME)
        spec = spec_from_hf_config(config, head=head, num_labels=num_labels, source=str(config_path))
        if dtype == "auto":
            dtype = config_dtype(config, source=str(config_path))
        raw = read_state_dict(find_weights(directory), progress=sys.stderr.isatty() if progress is None else progress)
    return _assemble(spec, raw, source=str(path_or_id), attention=attention, linear=linear, kv_cache=kv_cache,
                     dtype=dtype or torch.float32, device=torch.device(device or "cpu"))


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


def from_transformers(hf_model: Any, *, head: str = "causal_lm", attention: Any = None, linear: Any = None,
                      kv_cache: Any = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      num_labels: int | None = None) -> Any:
    """An optkit model from a loaded transformers model (OPT; Open-Llama where that transformers version still
    has it), without a round trip to disk.

    Tensors that already have the wanted device and dtype (by default the transformers model's) are
    shared, not copied: both models then read the same memory, so later in-place changes show in both.
    """
    name = type(hf_model).__name__
    spec = spec_from_hf_config(hf_model.config.to_dict(), head=head, num_labels=num_labels, source=f"{name}.config")
    parameter = next(hf_model.parameters())
    return _assemble(spec, hf_model.state_dict(), source=name, attention=attention, linear=linear,
                     kv_cache=kv_cache, dtype=dtype or parameter.dtype, device=torch.device(device or parameter.device))


def _assemble(spec: ModelSpec, raw: dict[str, Tensor], *, source: str, attention: Any, linear: Any, kv_cache: Any,
              dtype: torch.dtype, device: torch.device) -> Any:
    """Model built on "meta" with the chosen components, then the checkpoint's tensors put in place."""
    from optkit.builder import build

    spec = spec.with_components(attention=attention, linear=linear, kv_cache=kv_cache)
    model = build(spec, dtype=dtype, device="meta", target_device=device)
    load_weights(model, raw, device=device, dtype=dtype, source=source)
    from optkit.inference.transform import prepare

    return prepare(model.eval())  # loaded for inference: the fast path (same weights, same state_dict)


# -- writing ------------------------------------------------------------------------------------
def save_pretrained(model: Any, directory: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """``config.json`` + safetensors in transformers' OPT layout (sharded with an index when large).

    The save replaces the checkpoint already in ``directory`` as a whole (see optkit.checkpoint_files):
    a crash or a full disk leaves the old checkpoint, the new one, or a directory that refuses to load,
    never a mix. Other files in the directory are left alone.
    """
    directory = Path(directory)
    fmt = format_for_spec(model.spec)
    config = fmt.config_from_spec(model.spec, model.dtype)
    base = model.spec.head.name == "base"
    tied = getattr(model.head, "tied", False)
    tensors = {}
    for key, tensor in model.state_dict().items():
        if tied and key == "head.weight":
            continue
        tensors[hf_key(fmt, key, model.head.checkpoint_prefix, base_model=base)] = _standalone(tensor)
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
    files[CONFIG_NAME] = lambda path: path.write_text(json.dumps(config, indent=2) + "\n")
    write_checkpoint(directory, files)
    return directory


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
