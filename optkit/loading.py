"""Loading checkpoints into models: build on the meta device, put each tensor in place, prepare for inference.

``optkit.checkpoints`` knows the files (reading, key names per family, saving); this room turns them
into a model, so it may use the builder and the inference transform while the files layer stays
importable from ``model.py`` (``Model.save_pretrained``) without an import cycle.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any, Mapping, Union

import torch
from torch import Tensor

from optkit.adapters import add_adapters_from_options, load_adapters
from optkit.builder import build, build_head
from optkit.checkpoint_files import (OPTKIT_SPEC_NAME, StoredTensor, capped, find_weights, index_weights,
                                     interrupted_hint, locked, read_json, read_tensors)
from optkit.checkpoints import (CONFIG_NAME, _file_namer, _to_canonical, config_dtype, resolve_checkpoint_dir,
                                spec_from_hf_config)
from optkit.errors import CheckpointError, InputError, brief_repr
from optkit.formats import format_for_spec
from optkit.generation_config import GENERATION_CONFIG_NAME, GenerationConfig
from optkit.inference.transform import prepare
from optkit.model import Model
from optkit.native_checkpoint import is_native, read_spec
from optkit.placement import dispatch
from optkit.spec import ModelSpec


Source = Union[Tensor, StoredTensor]  # a tensor in memory, or one still in its safetensors file


def load_weights(model: Model, raw: Mapping[str, Source], *, device: torch.device, dtype: torch.dtype,
                 source: str, native: bool = False) -> None:
    """Put checkpoint tensors into a model built on "meta"; one error lists every mismatch by its name in the file.

    Each tensor is read (or converted) on its own, straight to ``device`` and ``dtype``: one decoder layer
    is placed at a time, so int8 linears quantize as they land and no second copy of the model exists.
    """
    state = _checked_state(model, raw, device=device, dtype=dtype, source=source, native=native)
    for group in _by_layer(state):
        model.load_state_dict(_place(group, device, dtype), strict=False, assign=True)
    model.tie_weights()


def _checked_state(model: Model, raw: Mapping[str, Source], *, device: torch.device, dtype: torch.dtype,
                   source: str, native: bool = False) -> dict[str, Source]:
    """optkit key -> checkpoint tensor for every tensor the model needs, checked by name, shape and dtype
    (from the headers: nothing is read), with a fresh head where the checkpoint has none.
    ``native``: optkit's own format (optkit.native_checkpoint), whose keys are already optkit's."""
    if native:
        state, name = dict(raw), capped
    else:
        fmt = format_for_spec(model.spec, registry=model.registry)
        state, names = _to_canonical(fmt, raw, model.head.checkpoint_prefix)
        name = _file_namer(fmt, model, raw, names)
    expected = dict(model.state_dict())
    tied = model.head.tied
    misshaped = [f"{name(k)} (checkpoint {list(state[k].shape)}, model {list(expected[k].shape)})"
                 for k in expected if k in state and state[k].shape != expected[k].shape]
    not_float = [f"{name(k)} ({str(state[k].dtype).removeprefix('torch.')}, model needs floating point)"
                 for k in expected if k in state and expected[k].is_floating_point()
                 and not state[k].is_floating_point()]
    if tied:  # the token embedding is the LM head: a head tensor in the file must fit and equal it
        ties = ((OPTKIT_SPEC_NAME, ("head.params.tie_word_embeddings",)) if native else
                (CONFIG_NAME, fmt.tie_fields))
        _check_tied_head(model, state, misshaped + not_float, name, source, ties)
        state.pop("head.weight", None)
        expected.pop("head.weight", None)
    missing = [k for k in expected if k not in state]
    head_missing = [name(k) for k in missing if k.startswith("head.")]
    missing = [name(k) for k in missing if not k.startswith("head.")]
    unexpected = [name(k) for k in state if k not in expected]
    groups = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
              ("not floating point", not_float))
    if any(keys for _, keys in groups):
        lines = [f"checkpoint {source} does not fit the model its {OPTKIT_SPEC_NAME if native else CONFIG_NAME} "
                 "describes:"]
        for label, keys in groups:
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    if head_missing:
        state.update(_fresh_head_state(model, device, dtype))
        warnings.warn(f"{source} has no weights for the {model.spec.head.name} head "
                      f"({', '.join(head_missing)}): they are newly initialized; train them before use",
                      stacklevel=4)
    return state


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def _by_layer(state: dict[str, Source]) -> list[dict[str, Source]]:
    """Checkpoint tensors grouped per decoder layer (everything else in one group)."""
    groups: dict[str, dict[str, Source]] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        groups.setdefault(match[1] if match else "", {})[key] = tensor
    return list(groups.values())


def _place(group: dict[str, Source], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of ``group`` on ``device``, floating point ones in ``dtype``: read from their files, or moved."""
    placed = read_tensors({k: t for k, t in group.items() if isinstance(t, StoredTensor)}, device=device, dtype=dtype)
    for key, tensor in group.items():
        if isinstance(tensor, Tensor):
            placed[key] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
    return placed


def _check_tied_head(model: Model, state: dict[str, Source], problems: list[str], name: Any, source: str,
                     ties: tuple[str, tuple[str, ...]]) -> None:
    """A tied model whose file also holds a head tensor: the file is only unambiguous when both are equal.

    Which of two different tensors a tied model would end up with is an accident of load order, so a
    head that differs from the token embedding is refused, naming the two ways to resolve it."""
    weight = getattr(model.head, "weight", None)
    embedding_key = next((key for key, param in model.named_parameters(remove_duplicate=False)
                          if weight is not None and param is weight and not key.startswith("head.")), None)
    if embedding_key is None or "head.weight" not in state or embedding_key not in state or problems:
        return
    stored = {key: state[key] for key in ("head.weight", embedding_key)}
    values = read_tensors({k: t for k, t in stored.items() if isinstance(t, StoredTensor)})
    head, embedding = (values.get(key, stored[key]) for key in ("head.weight", embedding_key))
    if not isinstance(head, Tensor) or not isinstance(embedding, Tensor) or head.shape != embedding.shape:
        return
    if not torch.equal(head.to(embedding.dtype), embedding):
        config_file, tie_fields = ties  # the file and fields that say "tied" (per format: OPT's, Open-Llama's)
        untie = " and ".join(f'"{field}": false' for field in tie_fields)
        raise CheckpointError(f"checkpoint {source}: its {config_file} ties the LM head to the token embedding "
                              f"({' / '.join(tie_fields)} true), but the file's {name('head.weight')} differs from "
                              f"{name(embedding_key)}, so which one the model uses would be a guess. Set {untie} "
                              f"in {config_file} to use the stored head, or delete {name('head.weight')} from the "
                              "file to use the embedding")


def _fresh_head_state(model: Model, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """A new head's tensors on ``device``; those it shaped after the still empty ("meta") token embedding, e.g.
    an untied LM head, are given values as optkit's heads initialise theirs (normal, std ``init_std``)."""
    head = build_head(model, device, dtype)
    state = {}
    for key, value in head.state_dict().items():
        if value.is_meta:
            value = torch.empty(value.shape, device=device, dtype=dtype).normal_(0.0, model.spec.decoder.init_std)
        state[f"head.{key}"] = value.to(dtype)
    return state


def _load_dispatched(model: Model, raw: Mapping[str, Source], *, source: str, dtype: torch.dtype, device_map: Any,
                     max_memory: dict[Any, Any] | None, offload_folder: str | os.PathLike | None,
                     native: bool = False) -> Model:
    """A model built on "meta", loaded unit by unit straight where ``device_map`` puts it.

    ``dispatch`` asks for each unit's weights in forward order on the device they land on (the unit's
    own, or the CPU for a streamed unit, which it then writes to the offload folder or keeps): host
    memory holds one unit at a time, never the model.
    """
    state = _checked_state(model, raw, device=torch.device("cpu"), dtype=dtype, source=source, native=native)

    def load_unit(unit: str, device: torch.device) -> None:
        group = {k: state.pop(k) for k in [k for k in state if k.startswith(unit + ".")]}
        model.load_state_dict(_place(group, device, dtype), strict=False, assign=True)
        model.tie_weights()

    return dispatch(model, device_map, max_memory=max_memory, offload_folder=offload_folder, load_unit=load_unit)


def from_pretrained(path_or_id: str | os.PathLike, *, head: str | None = None, attention: Any = None,
                    linear: Any = None, kv_cache: Any = None, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, num_labels: int | None = None,
                    revision: str | None = None, local_files_only: bool | None = None,
                    progress: bool | None = None, device_map: Any = None, max_memory: dict[Any, Any] | None = None,
                    offload_folder: str | os.PathLike | None = None, adapters: dict[str, Any] | None = None,
                    adapter: str | os.PathLike | None = None, tp_size: int | None = None,
                    torch_dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
                    low_cpu_mem_usage: bool | None = None) -> Model:
    """Load an OPT checkpoint (directory or Hub id) into an optkit model, or one in optkit's own format.

    ``head``: the task head (default: ``causal_lm``; for optkit's own format, the saved one). optkit's own
    format (optkit.native_checkpoint) is rebuilt from its spec with the plugins its manifest names.

    ``dtype=None`` loads float32 (as transformers 4.x); ``dtype="auto"`` uses the
    checkpoint's ``torch_dtype``. ``progress`` (default: when stderr is a terminal) reports each weight file.
    ``device_map`` ("auto", "balanced", "sequential" or {module prefix: device}) with ``max_memory`` and
    ``offload_folder`` spreads the model over devices, CPU and disk (see docs/big-models.md).

    Nothing is read twice or all at once: the model is built on "meta" and each safetensors tensor is read
    from its shard into its final device and dtype. With a ``device_map`` each unit is loaded straight where
    the map puts it (disk units go to the offload folder's files), so host memory holds about one unit.
    ``.bin`` checkpoints are loaded whole first (memory-mapped), then placed the same way.

    ``adapters={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}`` adds fresh LoRA adapters (only
    they train); ``adapter=DIR`` loads a PEFT adapter directory (see docs/adapters.md).
    ``tp_size=N`` splits the loaded model over the N ranks of the process group torchrun started (tensor
    parallelism, see docs/distributed.md): each rank reads only its own slice of every split tensor.

    transformers' keywords are aliases: ``torch_dtype`` of ``dtype``, ``attn_implementation`` ("eager", "sdpa",
    "flash_attention_2") of ``attention``; ``low_cpu_mem_usage`` is accepted and changes nothing (optkit always
    loads tensor by tensor onto a model built on "meta"). The checkpoint's ``generation_config.json``, when
    present, becomes ``model.generation_config``: the defaults of ``generate``, pipelines and ``optkit run``.
    """
    dtype, attention = transformers_aliases(dtype, torch_dtype, attention, attn_implementation, low_cpu_mem_usage)
    device = _checked_device(device)
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise InputError(f"num_labels={brief_repr(num_labels)}: must be a positive int (the classification head's "
                         "number of labels), or None to read it from config.json")
    if tp_size is not None and (device_map is not None or adapters is not None or adapter is not None):
        raise InputError("tp_size cannot be combined with device_map or adapters yet; pass one of them")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise InputError("max_memory and offload_folder place a model only with device_map=...; "
                         "pass device_map='auto' (or a map)")
    if device_map is not None and (adapters is not None or adapter is not None):
        raise InputError("adapters with a device_map are not supported yet: load without device_map, or merge the "
                         "adapter into a checkpoint first (optkit.adapters.merge_and_unload, then save_pretrained)")
    directory = resolve_checkpoint_dir(path_or_id, revision=revision, local_files_only=local_files_only)
    config_path = directory / CONFIG_NAME
    with locked(directory, shared=True):  # a save into this directory waits until every tensor is read
        if not config_path.is_file():
            raise CheckpointError(f"{directory} has no {CONFIG_NAME}; an OPT checkpoint needs one"
                                  + interrupted_hint(directory))
        config = read_json(config_path, what=CONFIG_NAME)
        native = is_native(config)
        if native:  # the components the caller picks need not be the saved ones' plugins
            chosen = {"attention": attention, "linear": linear, "kv_cache": kv_cache}
            spec = read_spec(directory, config, head=head, num_labels=num_labels, chosen=chosen)
        else:
            spec = spec_from_hf_config(config, head=head or "causal_lm", num_labels=num_labels,
                                       source=str(config_path))
        generation_config = read_generation_config(directory)
        if dtype == "auto":
            dtype = config_dtype(config, source=str(config_path))
        raw = index_weights(find_weights(directory), progress=sys.stderr.isatty() if progress is None else progress)
        model = _meta_model(spec, attention=attention, linear=linear, kv_cache=kv_cache, dtype=dtype or torch.float32,
                            device=torch.device(device or "cpu"))
        if generation_config is not None:
            model.generation_config = generation_config
        if tp_size is not None:  # each rank reads only its own slice of every split tensor
            from optkit.parallel.loading import load_split  # torch.distributed's tensor modules: imported when used

            state = _checked_state(model, raw, device=torch.device(device or "cpu"), dtype=model.dtype,
                                   source=str(path_or_id), native=native)
            return load_split(model.eval(), state, tp_size, device=torch.device(device or "cpu"))
        if device_map is None:
            load_weights(model, raw, device=torch.device(device or "cpu"), dtype=model.dtype, source=str(path_or_id),
                         native=native)
            return _with_adapters(prepare(model.eval()), adapters, adapter)  # the fast path: same weights and keys
        # q/k/v are stacked where it pays once each resident unit has landed (dispatch does it); streamed ones never
        prepare(model.eval(), stack_projections=False)
        return _load_dispatched(model, raw, source=str(path_or_id), dtype=model.dtype, device_map=device_map,
                                max_memory=max_memory, offload_folder=offload_folder, native=native)


def _checked_device(device: Any) -> torch.device | None:
    """``device`` as a torch.device (None stays None); anything torch cannot parse is an InputError naming it."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device={brief_repr(device)} is not a torch device; use 'cpu', 'cuda', 'cuda:1' (or a "
                         "torch.device)") from None


ATTN_IMPLEMENTATIONS = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash"}


def transformers_aliases(dtype: Any, torch_dtype: Any, attention: Any, attn_implementation: Any,
                         low_cpu_mem_usage: Any) -> tuple[Any, Any]:
    """(dtype, attention) from optkit's keywords or transformers' names for them (one of each pair)."""
    if torch_dtype is not None and dtype is not None:
        raise InputError("pass dtype or torch_dtype (transformers' name for it), not both")
    if attn_implementation is not None and attention is not None:
        raise InputError("pass attention or attn_implementation (transformers' name for it), not both")
    if low_cpu_mem_usage not in (None, True, False):
        raise InputError(f"low_cpu_mem_usage={low_cpu_mem_usage!r}: must be True, False or None")
    dtype = torch_dtype if dtype is None else dtype
    if isinstance(dtype, str) and dtype != "auto":
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype) or not named.is_floating_point:
            raise InputError(f"dtype={dtype[:40]!r} is not a floating torch dtype; use 'float32', 'float16', "
                             "'bfloat16', 'auto' or a torch.dtype")
        dtype = named
    if attn_implementation is not None:
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise InputError(f"attn_implementation={str(attn_implementation)[:40]!r}: optkit maps "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)}; for other kernels pass attention=<backend name> "
                             "(optkit info lists them)")
        attention = ATTN_IMPLEMENTATIONS[attn_implementation]
    return dtype, attention


def read_generation_config(directory: Any) -> GenerationConfig | None:
    """The checkpoint's generation_config.json (None when it has none); a bad file is a CheckpointError."""
    path = directory / GENERATION_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return GenerationConfig.from_file(path)
    except InputError as exc:
        raise CheckpointError(str(exc)) from None


def _with_adapters(model: Model, adapters: dict[str, Any] | None, adapter: str | os.PathLike | None) -> Model:
    if adapters is not None:
        add_adapters_from_options(model, adapters)
    if adapter is not None:
        load_adapters(model, adapter)
    return model


def from_transformers(hf_model: Any, *, head: str = "causal_lm", attention: Any = None, linear: Any = None,
                      kv_cache: Any = None, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      num_labels: int | None = None) -> Model:
    """An optkit model from a loaded transformers model (OPT; Open-Llama where that transformers version still
    has it), without a round trip to disk.

    Tensors that already have the wanted device and dtype (by default the transformers model's) are
    shared, not copied: both models then read the same memory, so later in-place changes show in both.
    """
    name = type(hf_model).__name__
    spec = spec_from_hf_config(hf_model.config.to_dict(), head=head, num_labels=num_labels, source=f"{name}.config")
    parameter = next(hf_model.parameters())
    device = torch.device(device or parameter.device)
    model = _meta_model(spec, attention=attention, linear=linear, kv_cache=kv_cache,
                        dtype=dtype or parameter.dtype, device=device)
    load_weights(model, hf_model.state_dict(), device=device, dtype=model.dtype, source=name)
    hf_generation = getattr(hf_model, "generation_config", None)
    if hf_generation is not None:  # its generate() defaults come along, as its generation_config.json would
        model.generation_config = GenerationConfig.from_dict(hf_generation.to_diff_dict(),
                                                             source=f"{name}.generation_config")
    return prepare(model.eval())


def _meta_model(spec: ModelSpec, *, attention: Any, linear: Any, kv_cache: Any, dtype: torch.dtype,
                device: torch.device) -> Model:
    """The model built on "meta" with the chosen components, for ``device``; the checkpoint fills it."""
    spec = spec.with_components(attention=attention, linear=linear, kv_cache=kv_cache)
    return build(spec, dtype=dtype, device="meta", target_device=device)
