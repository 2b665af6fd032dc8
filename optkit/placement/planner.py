"""``optkit.plan``: where every unit of a model would go, what each device holds, and whether it fits.

Nothing is allocated: presets and specs are built on the meta device (shapes and dtypes only), so
opt-175b plans in a couple of seconds on a laptop. The rules (Accelerate's, see docs/big-models.md):

* devices fill in order -- accelerators by index, then ``"cpu"``, then ``"disk"`` (only devices named in
  ``max_memory``; without it, every accelerator's and the host's free memory minus 10%, and an unbounded disk);
* a unit is never split and units that share a device (input units, tied weights) move together;
* a unit kept on ``"cpu"`` while an accelerator computes, or on ``"disk"``, is *streamed*: it computes on
  the compute device (the first accelerator, else the cpu), which keeps room for the streamed input units
  plus the largest other streamed unit (the two largest on an accelerator, where the next one is prefetched
  while the current one computes), and holds the KV cache of every streamed layer;
* each layer's KV cache (``2 x batch x kv_heads x max_length x head_dim`` at the compute dtype) lives where
  the layer computes. Activations are not budgeted (they are transient; leave headroom).

``"balanced"`` (= ``"auto"``, as in transformers) gives every accelerator the same number of layers (±1)
when the whole model fits on the accelerators, else fills in order like ``"sequential"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from optkit.errors import CheckpointError, CheckpointNotFoundError, InputError
from optkit.model import Model
from optkit.placement.device_map import resolve_device_map
from optkit.placement.devices import Device, device_order, format_size, parse_max_memory
from optkit.placement.units import DTYPES, INT8, Group, Unit, placement_groups, placement_units
from optkit.spec import ModelSpec

STRATEGIES = ("auto", "balanced", "sequential")
PREFETCH_UNITS = 2  # streamed units on an accelerator at once: the one computing and the next, prefetched


@dataclass(frozen=True)
class DevicePlan:
    """What one device holds: the units whose weights live there, and the bytes of each kind."""

    device: Device
    modules: tuple[str, ...]
    weight_bytes: int
    kv_cache_bytes: int  # caches of the layers that compute here
    streaming_bytes: int  # room for the units streamed in to compute here (0 unless this is the compute device)
    budget_bytes: int | None  # from max_memory; None = unbounded

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.streaming_bytes

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.total_bytes <= self.budget_bytes


@dataclass(frozen=True)
class Plan:
    """The planner's answer: per device what it holds and whether it fits, and the ``device_map``."""

    model: str
    dtype: str
    batch: int
    max_length: int
    compute_device: Device
    devices: tuple[DevicePlan, ...]
    device_map: dict[str, Device]

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    @property
    def weight_bytes(self) -> int:
        return sum(d.weight_bytes for d in self.devices)

    def require_fit(self) -> "Plan":
        """This plan, or an InputError naming each device that is over its budget and by how much."""
        over = [d for d in self.devices if not d.fits]
        if over:
            details = "; ".join(f"{d.device!r} needs {format_size(d.total_bytes)} of {format_size(d.budget_bytes or 0)}"
                                for d in over)
            raise InputError(f"{self.model} in {self.dtype} does not fit: {details}; raise max_memory there, "
                             "add 'disk' to max_memory, or lower batch/max_length")
        return self

    def __str__(self) -> str:
        lines = [f"{self.model}  dtype={self.dtype}  batch={self.batch}  max_length={self.max_length}  "
                 f"compute on {self.compute_device!r}"]
        lines.append(f"{'device':>8} {'weights':>12} {'kv cache':>12} {'streaming':>12} {'budget':>12}  fits  modules")
        for d in self.devices:
            budget = "unbounded" if d.budget_bytes is None else format_size(d.budget_bytes)
            lines.append(f"{d.device!r:>8} {format_size(d.weight_bytes):>12} {format_size(d.kv_cache_bytes):>12} "
                         f"{format_size(d.streaming_bytes):>12} {budget:>12}  {'yes' if d.fits else 'NO':<4}  "
                         f"{_ranges(d.modules)}")
        lines.append(f"total weights {format_size(self.weight_bytes)}; "
                     f"{'fits' if self.fits else 'does NOT fit'}")
        return "\n".join(lines)


def _ranges(names: tuple[str, ...]) -> str:
    """``decoder.layers.0-31`` instead of 32 names."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(f"decoder.layers.{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
            run.clear()

    for name in names:
        if name.startswith("decoder.layers."):
            index = int(name.rsplit(".", 1)[1])
            if run and index != run[-1] + 1:  # a gap: layers 0, 2, 3 are "0, 2-3", not "0-3"
                flush()
            run.append(index)
        else:
            flush()
            out.append(name)
    flush()
    return ", ".join(out) or "-"


def _dtype_name(dtype: str | torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InputError(f"dtype {str(dtype)[:50]!r} cannot be planned; use one of {', '.join(DTYPES)}")
    return name


def _checkpoint_directory(source: object) -> Path | None:
    """The checkpoint directory ``source`` names (a local directory, ``"optkit-default"``, or a Hub id already
    in the Hugging Face cache), or None for a preset, alias or spec file. Planning never downloads."""
    from optkit.bundled import bundled_directory
    from optkit.checkpoints import resolve_checkpoint_dir
    from optkit.presets import canonical_preset_name

    if not isinstance(source, (str, os.PathLike)):
        return None
    text = os.fspath(source)
    bundled = bundled_directory(text)
    if bundled is not None or Path(text).expanduser().is_dir():
        return bundled or Path(text).expanduser()
    if canonical_preset_name(text) is not None or Path(text).exists() or text.endswith((".yaml", ".yml")):
        return None
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        return None  # not a Hub id: load_spec says what it is not
    try:
        return resolve_checkpoint_dir(text, local_files_only=True)
    except CheckpointNotFoundError:
        raise InputError(f"{_short(text)!r} is not a preset, a spec file or a checkpoint directory, and not in the "
                         "Hugging Face cache; planning never downloads: fetch its config first "
                         f"(hf download {_short(text)} config.json) or pass the checkpoint directory") from None


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


def _checkpoint_spec(directory: Path) -> tuple[ModelSpec, str]:
    """The spec a checkpoint's config.json describes and its dtype name; no weight file is opened."""
    from optkit.checkpoint_files import CONFIG_NAME, read_json
    from optkit.checkpoints import config_dtype, spec_from_hf_config

    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{_short(str(directory))} has no {CONFIG_NAME}; a checkpoint directory needs one to "
                              "be planned")
    config = read_json(config_path, what=CONFIG_NAME)
    from optkit.native_checkpoint import is_native, read_spec

    if is_native(config):  # optkit's own format: the saved spec, checked against the plugins loaded now
        spec = read_spec(directory, config)
    else:
        spec = spec_from_hf_config(config, source=str(config_path))
    dtype = str(config_dtype(config, source=str(config_path))).removeprefix("torch.")
    return spec, dtype


def _meta_model(source: ModelSpec | str | os.PathLike | dict[str, Any] | Model,
                dtype: str | None) -> tuple[Model, str]:
    """The model to plan (built on meta unless given) and the dtype to count: ``dtype``, else the checkpoint's
    (or the built model's) own, else float16; int8 whenever the spec's linear is int8."""
    if isinstance(source, Model):
        return source, dtype or str(source.dtype).removeprefix("torch.")
    from optkit import registry
    from optkit.builder import build
    from optkit.spec import load_spec

    directory = _checkpoint_directory(source)
    if directory is not None:
        spec, own_dtype = _checkpoint_spec(directory)
        dtype = _dtype_name(dtype or own_dtype)
    else:
        spec = source if isinstance(source, ModelSpec) else load_spec(source, registry=registry)
        dtype = dtype or "float16"
    if spec.decoder.linear.name == INT8:
        dtype = INT8
    # Shapes do not depend on the linear backend (LinearFactory's contract), so plain torch linears
    # stand in for any backend and nothing backend-specific is imported to plan.
    return build(spec, device="meta", dtype=DTYPES[dtype], linear="torch"), dtype


def _is_streamed(device: Device, compute: Device) -> bool:
    return device == "disk" or (device == "cpu" and compute != "cpu")


def _compute_device(devices: list[Device]) -> Device:
    accelerators = [d for d in devices if isinstance(d, int)]
    return min(accelerators) if accelerators else "cpu"


def account(groups: list[Group], resolved: Mapping[str, Device], budgets: Mapping[Device, int | None],
            compute: Device) -> tuple[DevicePlan, ...]:
    """Per device: weights kept there, KV caches and streaming room where units compute."""
    devices = sorted(set(budgets) | set(resolved.values()) | {compute}, key=device_order)
    modules: dict[Device, list[Unit]] = {d: [] for d in devices}
    weights = dict.fromkeys(devices, 0)
    kv = dict.fromkeys(devices, 0)
    streamed_input, streamed_other = 0, []
    for group in groups:
        device = resolved[group.names[0]]
        modules[device] += group.units
        weights[device] += group.weight_bytes
        if _is_streamed(device, compute):
            kv[compute] += group.kv_cache_bytes
            if group.units[0].role == "input":
                streamed_input = group.weight_bytes
            else:
                streamed_other.append(group.weight_bytes)
        else:
            kv[device] += group.kv_cache_bytes
    streaming = dict.fromkeys(devices, 0)
    # An accelerator holds the unit computing and the next one, prefetched meanwhile (dispatcher.Prefetcher)
    in_flight = PREFETCH_UNITS if isinstance(compute, int) else 1
    streaming[compute] = streamed_input + sum(sorted(streamed_other, reverse=True)[:in_flight])
    plans = [DevicePlan(d, tuple(u.name for u in sorted(modules[d], key=lambda u: u.position)), weights[d], kv[d],
                        streaming[d], budgets.get(d)) for d in devices]
    return tuple(p for p in plans if p.modules or p.device in budgets or p.total_bytes)


def _fill_in_order(groups: list[Group], budgets: Mapping[Device, int | None], compute: Device) -> dict[str, Device]:
    """Sequential fill; the compute device keeps room for what streams in (recomputed until stable)."""
    devices = list(budgets)
    reserve = 0
    while True:
        used = dict.fromkeys(devices, 0)
        used[compute] = reserve
        resolved: dict[str, Device] = {}
        index = 0
        for group in groups:
            while True:
                device = devices[index]
                cost = group.weight_bytes + (0 if _is_streamed(device, compute) else group.kv_cache_bytes)
                budget = budgets[device]
                if budget is None or used[device] + cost <= budget or index == len(devices) - 1:
                    break
                index += 1
            used[device] += cost
            resolved.update(dict.fromkeys(group.names, device))
        plans = account(groups, resolved, budgets, compute)
        streamed_kv = sum(g.kv_cache_bytes for g in groups if _is_streamed(resolved[g.names[0]], compute))
        needed = next(p.streaming_bytes for p in plans if p.device == compute) + streamed_kv
        if needed <= reserve:
            return resolved
        reserve = needed


def _balance(groups: list[Group], budgets: Mapping[Device, int | None], compute: Device,
             sequential: dict[str, Device]) -> dict[str, Device]:
    """The same number of layers (±1) on every accelerator, when the model fits on them; else ``sequential``."""
    accelerators = [d for d in budgets if isinstance(d, int)]
    if len(accelerators) < 2 or any(not isinstance(d, int) for d in sequential.values()):
        return sequential
    layers = [g for g in groups if g.is_layer]
    share, extra = divmod(len(layers), len(accelerators))
    counts = [share + (i < extra) for i in range(len(accelerators))]
    owners = [acc for acc, count in zip(accelerators, counts) for _ in range(count)]
    resolved: dict[str, Device] = {}
    layer_index = 0
    for group in groups:
        if group.is_layer:
            device = owners[layer_index]
            layer_index += 1
        else:
            device = accelerators[0] if layer_index == 0 else owners[layer_index - 1]
        resolved.update(dict.fromkeys(group.names, device))
    if all(p.fits for p in account(groups, resolved, budgets, compute)):
        return resolved
    return sequential


def _check_one_layer_fits(groups: list[Group], budgets: Mapping[Device, int | None], compute: Device) -> None:
    """Some device where layers compute must hold one whole layer (weights + its KV cache)."""
    layers = [g for g in groups if g.is_layer]
    if not layers:
        return
    largest = max(layers, key=lambda g: g.weight_bytes + g.kv_cache_bytes)
    need = largest.weight_bytes + largest.kv_cache_bytes
    computing = {d: b for d, b in budgets.items() if d != "disk"}
    if any(b is None or b >= need for b in computing.values()):
        return
    inputs = groups[0].weight_bytes if groups[0].units[0].role == "input" else 0
    total_kv = sum(g.kv_cache_bytes for g in groups)
    in_flight = PREFETCH_UNITS if isinstance(compute, int) else 1
    others = sorted((g.weight_bytes for g in groups if g is not groups[0]), reverse=True)
    smallest = inputs + sum(others[:in_flight]) + total_kv
    total = sum(g.weight_bytes for g in groups)
    sizes = ", ".join(f"{d!r}: {format_size(b)}" for d, b in computing.items()) or "none"
    raise InputError(
        f"max_memory is too small for even one decoder layer: '{largest.names[0]}' needs "
        f"{format_size(need, round_up=True)} (weights {format_size(largest.weight_bytes)} + KV cache "
        f"{format_size(largest.kv_cache_bytes)}) and no device that computes has that much ({sizes}); "
        f"the smallest max_memory that works streams every unit from disk: "
        f"{{{compute!r}: '{format_size(smallest, round_up=True)}', 'disk': '{format_size(total, round_up=True)}'}}")


def plan(model: ModelSpec | str | os.PathLike | dict[str, Any] | Model, *, dtype: str | torch.dtype | None = None,
         max_memory: dict[Any, int | float | str] | None = None, batch: int = 1, max_length: int | None = None,
         device_map: str | Mapping[str, Any] = "auto") -> Plan:
    """Where each unit of ``model`` goes, and what fits. ``model``: a preset name or alias, a spec (mapping,
    ``ModelSpec``, YAML path), a checkpoint directory (or a Hub id already in the Hugging Face cache: only its
    config.json is read, never a weight) or a built model.

    ``dtype``: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"int8"`` (projection weights 1 byte per element
    plus one fp32 scale per output row; embeddings, norms, biases and the KV cache in float16). Default: a
    checkpoint's own dtype (its ``torch_dtype``), a built model's dtype, else float16.
    ``max_memory``: ``{0: "70GiB", "cpu": "100GiB", "disk": "1TiB"}`` (GiB = 2**30 bytes, GB = 10**9); the
    devices named are the ones used. ``device_map``: a strategy, or an explicit map to account for.
    """
    dtype = None if dtype is None else _dtype_name(dtype)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise InputError(f"batch must be a positive int, got {str(batch)[:50]}")
    built, dtype = _meta_model(model, dtype)
    positions = built.spec.decoder.max_positions
    length = positions if max_length is None else max_length
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise InputError(f"max_length must be a positive int, got {str(max_length)[:50]}")
    if length > positions:  # generation refuses such a sequence, so its KV cache would be budgeted for nothing
        raise InputError(f"max_length {length} is more than the model's max_positions {positions} (the longest "
                         f"sequence it runs); plan with max_length <= {positions}")
    groups = placement_groups(built, dtype=dtype, batch=batch, max_length=length)
    budgets = parse_max_memory(max_memory)
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            raise InputError(f"device_map {device_map[:50]!r} is not a strategy; use one of {', '.join(STRATEGIES)} "
                             "or a dict {module_prefix: device}")
        compute = _compute_device([d for d, b in budgets.items() if b != 0])  # max_memory {0: 0}: 0 is unused
        _check_one_layer_fits(groups, budgets, compute)
        resolved = _fill_in_order(groups, budgets, compute)
        if device_map != "sequential":
            resolved = _balance(groups, budgets, compute, resolved)
    else:
        resolved = resolve_device_map(built, device_map, groups)
    resolved = {u.name: resolved[u.name] for u in placement_units(built)}  # forward order
    # dispatch computes on the map's first accelerator (else the cpu): account for that one, not the one planned for
    compute = _compute_device(list(resolved.values()))
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
    return Plan(model=name, dtype=dtype, batch=batch, max_length=length, compute_device=compute,
                devices=account(groups, resolved, budgets, compute), device_map=resolved)
