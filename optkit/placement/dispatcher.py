"""``dispatch``: put a model's units on their devices and stream offloaded ones in per forward.

torch-native forward hooks, no Accelerate (docs/big-models.md says why):

* a unit on an accelerator, or on ``"cpu"`` when the cpu computes, is moved there and stays;
* a unit on ``"disk"`` is written to ``offload_folder/<unit>.safetensors`` (never pickled) and its
  tensors are replaced by meta tensors; a unit on ``"cpu"`` while an accelerator computes keeps its
  tensors in (pinned) host memory. Either is *streamed*: a forward pre-hook loads its tensors onto the
  compute device and the post-hook (always run) puts the meta tensors back, so a streamed unit holds
  memory on the compute device only while it runs. Streamed tensors are frozen (inference only);
* on CUDA the next streamed unit is prefetched on a side stream while the current one computes
  (:class:`Prefetcher`); elsewhere streaming is synchronous, as it was;
* every unit's pre-hook moves the activations it is called with (tensors, the ``AttentionMask``, head
  inputs) to the device it computes on, so the KV cache a layer fills lives there too;
* the input units stream for the whole decoder forward (``Decoder.forward`` reads the positional table
  directly, not through a module call); outputs come back to the device the inputs came from.

Afterwards ``model.device_map`` is the ``{unit: device}`` map in use and ``model.device`` is the device
inputs go to (the input units' compute device).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import tempfile
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from optkit.errors import InputError
from optkit.interfaces import Placement
from optkit.inference.attention import PreparedAttention
from optkit.model import Model
from optkit.placement.devices import Device, check_present, parse_device, torch_device
from optkit.placement.device_map import resolve_device_map
from optkit.placement.planner import Plan, plan
from optkit.placement.units import Group, Unit, placement_groups, placement_units, streamable_problem, unit_tensors

try:
    import fcntl
except ImportError:  # Windows: no flock, offload files are not locked
    fcntl = None  # type: ignore[assignment]

OFFLOAD_SUFFIX = ".safetensors"
OFFLOAD_METADATA = "optkit_unit"  # the unit an offload file holds, in its safetensors metadata
_PREFETCHERS: "weakref.WeakKeyDictionary[Model, Prefetcher]" = weakref.WeakKeyDictionary()


def is_dispatched(model: nn.Module) -> bool:
    return isinstance(model, Model) and model.placement is not None


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts, dataclasses) on ``device``; caches untouched."""
    if isinstance(value, Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {}
        for f in dataclasses.fields(value):
            if f.init:
                old = getattr(value, f.name)
                new = to_device(old, device)
                if new is not old:
                    changed[f.name] = new
        return dataclasses.replace(value, **changed) if changed else value
    return value


@dataclass
class _Slot:
    """One streamed tensor: every (owner module, attribute) holding it and where its bytes come from."""

    owners: list[tuple[nn.Module, str]]
    is_parameter: bool
    placeholder: Tensor
    host: Tensor | None = None  # a "cpu" unit streamed to an accelerator
    file: Path | None = None  # a "disk" unit
    key: str = ""
    lock: Any = None  # an open handle holding the flock on ``file`` while the model lives

    def set(self, value: Tensor) -> None:
        for owner, name in self.owners:
            (owner._parameters if self.is_parameter else owner._buffers)[name] = value


def _on_cuda(device: torch.device) -> bool:
    """Pinned memory and side streams only where CUDA really is."""
    return device.type == "cuda" and torch.cuda.is_available()


@dataclass
class _Stream:
    """The tensors of one streamed unit (or of the input units), loaded onto ``device`` and released."""

    device: torch.device
    slots: list[_Slot] = field(default_factory=list)

    def fetch(self) -> list[Tensor]:
        """Copies of the slots' tensors on ``device``, one per slot, issued on the current (CUDA) stream: from
        pinned host memory, or read from the offload file (pinned first on CUDA, so the copy is asynchronous)."""
        fetched: dict[int, Tensor] = {}
        by_file: dict[Path, list[int]] = {}
        for index, slot in enumerate(self.slots):
            if slot.file is None:
                fetched[index] = slot.host.to(self.device, non_blocking=True)
            else:
                by_file.setdefault(slot.file, []).append(index)
        pin = _on_cuda(self.device)
        for path, indices in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for index in indices:
                    tensor = f.get_tensor(self.slots[index].key)
                    fetched[index] = (tensor.pin_memory().to(self.device, non_blocking=True) if pin
                                      else tensor.to(self.device))
        return [fetched[index] for index in range(len(self.slots))]

    def install(self, tensors: list[Tensor]) -> None:
        for slot, tensor in zip(self.slots, tensors):
            slot.set(nn.Parameter(tensor, requires_grad=False) if slot.is_parameter else tensor)

    def load(self) -> None:
        self.install(self.fetch())

    def release(self) -> None:
        for slot in self.slots:
            slot.set(slot.placeholder)


@dataclass
class _Site:
    """Where streamed tensors come in: one hooked module (the decoder for the input units, else a unit)."""

    name: str
    streams: list[_Stream]


class Prefetcher:
    """Brings the next streamed unit's weights in while the current one computes.

    The sites (units that stream, in forward order) load in turn: when site ``k`` is about to run, its weights
    are taken from the prefetch (or fetched now if none is pending for it), then the copies of site ``k + 1``
    are issued. On CUDA they run on a side stream, from pinned host memory: the compute stream waits for the
    side stream (``wait_stream``) before using them and each tensor is marked as used there (``record_stream``),
    so the caching allocator reuses its memory only once the compute that read it is done; the post-hook
    drops the references (the release). Before issuing a prefetch the host waits for the compute of the units
    released since the previous one (an event each): the GPU queue is asynchronous, so without that wait the
    host would run ahead and prefetch every streamed unit of the forward while their predecessors' memory is
    still in use. The decoder's pre-hook starts the first site's prefetch, so resident layers before it hide its
    copy; nothing stays prefetched between forwards (the model's post-hook drops a prefetch no site took). At most
    two streamed units (plus the input units) are on the compute device, as the planner budgets.

    On the CPU (``side is None``) the same order runs synchronously: used only when asked for
    (``dispatch(..., prefetch=True)``), which tests the order without CUDA. ``trace`` (a list, when set)
    records ``("copy", site, start, end)`` and ``("compute", site, start, end)``: timed CUDA events (the copy's on
    the side stream, the compute's on the compute stream), or on the CPU ticks of a counter in host order.
    """

    def __init__(self, sites: list[_Site], device: torch.device):
        self.sites = sites
        self.index = {site.name: k for k, site in enumerate(sites)}
        self.device = device
        self.side = torch.cuda.Stream(device) if _on_cuda(device) else None
        self.pending: tuple[int, list[list[Tensor]]] | None = None
        self.trace: list[tuple[str, str, Any, Any]] | None = None
        self._ticks = 0
        self._released: list[Any] = []  # CUDA events: the compute of units released since the last prefetch

    def _mark(self, stream: Any = None) -> Any:
        """A point in time for ``trace``: a timed CUDA event recorded on ``stream`` (default: the current one),
        or on the CPU the next tick of a counter (the host's order is the order of the work)."""
        if self.side is None:
            self._ticks += 1
            return self._ticks
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def _prefetch(self, k: int) -> None:
        if k >= len(self.sites) or (self.pending is not None and self.pending[0] == k):
            return
        self.pending = None  # one not taken (a forward that skipped its site): freed, its copies never used
        for event in self._released:  # the host waits until released units' compute is done, so their memory
            event.synchronize()  # is free for this copy and the host never runs ahead by more than one unit
        self._released.clear()
        site = self.sites[k]
        timed = self.trace is not None
        if self.side is None:
            start = self._mark() if timed else None
            tensors = [stream.fetch() for stream in site.streams]
        else:
            with torch.cuda.stream(self.side):
                start = self._mark(self.side) if timed else None
                tensors = [stream.fetch() for stream in site.streams]
        if timed:
            self.trace.append(("copy", site.name, start, self._mark(self.side)))
        self.pending = (k, tensors)

    def begin(self) -> None:
        """A forward starts: prefetch the first site (the decoder's pre-hook, before any unit runs)."""
        self._prefetch(0)

    def acquire(self, name: str) -> None:
        """Site ``name`` is about to run: install its weights (prefetched or fetched now), prefetch the next."""
        k = self.index[name]
        site = self.sites[k]
        if self.pending is not None and self.pending[0] == k:
            tensors = self.pending[1]
            self.pending = None
            if self.side is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self.side)
                for group in tensors:
                    for tensor in group:
                        tensor.record_stream(current)
        else:
            tensors = [stream.fetch() for stream in site.streams]
        for stream, group in zip(site.streams, tensors):
            stream.install(group)
        self._prefetch(k + 1)
        if self.trace is not None:
            self.trace.append(("compute", name, self._mark(), None))

    def release(self, name: str) -> None:
        """Site ``name`` has run: its streams get their meta placeholders back (the memory goes with them)."""
        for stream in self.sites[self.index[name]].streams:
            stream.release()
        if self.side is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._released.append(done)
        if self.trace is not None:
            for i in range(len(self.trace) - 1, -1, -1):
                what, site, start, end = self.trace[i]
                if what == "compute" and site == name and end is None:
                    self.trace[i] = (what, site, start, self._mark())
                    break

    def finish(self) -> None:
        """The forward is over: a prefetch nobody took is dropped, so nothing streamed stays on the device."""
        self.pending = None


def _check_offload_folder(folder: str | Path | None, disk_units: list[str]) -> Path | None:
    """The offload folder, created and proven writable before any weight is moved or written."""
    if not disk_units:
        return None if folder is None else Path(folder)
    if folder is None:
        more = f" and {len(disk_units) - 1} more unit(s)" if len(disk_units) > 1 else ""
        raise InputError(f"device_map puts {disk_units[0]}{more} on 'disk'; "
                         "pass offload_folder= (a writable directory for their safetensors files)")
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".optkit-write-probe-"):
            pass
    except OSError as error:
        raise InputError(f"offload_folder '{str(path)[:200]}' is not writable ({error.strerror or error}); "
                         "pass a directory you can write to") from None
    for unit in disk_units:
        _check_offload_file(path / f"{unit}{OFFLOAD_SUFFIX}", unit)
    return path


def _check_offload_file(path: Path, unit: str) -> None:
    """A unit's offload file may be replaced only when optkit wrote it for this unit and no live model streams
    from it: overwriting a loaded model's file would make it compute with other weights, silently."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file() or _offload_unit_of(path) != unit:
        raise InputError(f"offload_folder '{str(path.parent)[:200]}' already holds {path.name}, which optkit did "
                         f"not write for unit {unit}; pass another offload_folder, or move that file away")
    handle = _hold(path)
    if handle is None:
        gc.collect()  # a model nobody references any more may still hold it until collected
        handle = _hold(path)
    if handle is None:
        raise InputError(f"offload_folder '{str(path.parent)[:200]}': {path.name} belongs to a model that is still "
                         "loaded and streams its weights from it; pass another offload_folder (one per loaded model), or "
                         "drop that model first (del model)")
    handle.close()


def _offload_unit_of(path: Path) -> str | None:
    """The unit an optkit offload file says it holds (its header's metadata; the data may be cut short)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size)) if 0 < size <= 100_000_000 else {}
        unit = (header.get("__metadata__") or {}).get(OFFLOAD_METADATA)
    except (OSError, ValueError, AttributeError):
        return None
    return unit if isinstance(unit, str) else None


def _hold(path: Path) -> Any:
    """An open handle with an exclusive flock on ``path`` (released when the handle is closed or collected);
    None when another handle holds one. Unlocked where flock is unavailable (best effort)."""
    handle = open(path, "rb")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError:  # a filesystem without flock
        pass
    return handle


def _host_copy(tensor: Tensor, pin: bool) -> Tensor:
    host = tensor.detach().to("cpu")
    return host.pin_memory() if pin and torch.cuda.is_available() else host


def _write_unit(unit: Unit, folder: Path, skip: set[int]) -> dict[int, tuple[Path, str]]:
    """Write the tensors of ``unit`` (each once; not those in ``skip``) to its safetensors file; where each is."""
    path = folder / f"{unit.name}{OFFLOAD_SUFFIX}"
    names = {module: name for name, module in unit.module.named_modules()}
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    located: dict[int, tuple[Path, str]] = {}
    for owner, attribute, tensor in unit_tensors(unit.module):
        if id(tensor) in skip or id(tensor) in located:
            continue
        key = f"{names[owner]}.{attribute}" if names[owner] else attribute
        data = tensor.detach().to("cpu").contiguous()
        storage = data.untyped_storage().data_ptr()
        if storage in storages:  # views of one buffer (stacked q/k/v): safetensors wants separate storage
            data = data.clone()
        storages.add(data.untyped_storage().data_ptr())
        tensors[key] = data
        located[id(tensor)] = (path, key)
    if tensors:
        save_file(tensors, str(path), metadata={"format": "pt", OFFLOAD_METADATA: unit.name})
    return located


def _check_weights_present(units: list[Unit], known: Mapping[int, Any] | None = None) -> None:
    """Every tensor of ``units`` has its weights (meta ones are refused, except ``known`` placeholders)."""
    for unit in units:
        for owner, attribute, tensor in unit_tensors(unit.module):
            if tensor.device.type == "meta" and id(tensor) not in (known or {}):
                raise InputError(f"'{unit.name}' has meta tensors (e.g. {attribute} of {type(owner).__name__}): "
                                 "the model has no weights yet; load the checkpoint before dispatching it")


def _resolve(model: Model, device_map: Plan | Mapping[str, Any] | str, groups: list[Group],
             max_memory: dict[Any, Any] | None) -> dict[str, Device]:
    if isinstance(device_map, Plan):
        device_map = device_map.device_map
    if isinstance(device_map, str):
        dtype = str(model.dtype).removeprefix("torch.")
        return plan(model, dtype=dtype, max_memory=max_memory, device_map=device_map).require_fit().device_map
    return resolve_device_map(model, device_map, groups)


def dispatch(model: Model, device_map: Plan | Mapping[str, Any] | str, *, offload_folder: str | Path | None = None,
             compute_device: Any = None, max_memory: dict[Any, Any] | None = None,
             load_unit: Callable[[str, torch.device], None] | None = None, prefetch: bool | None = None) -> Model:
    """Place ``model``'s units as ``device_map`` says (a dict, a :class:`Plan`, or a strategy planned with
    ``max_memory``) and hook streamed ones; returns the same model, with ``model.device_map`` set.

    ``compute_device``: where streamed units compute (default: the first accelerator in the map, else cpu).
    ``load_unit(name, device)``: for a model built on "meta", puts unit ``name``'s weights on ``device``
    just before the unit is placed, in forward order (its own device; the cpu for a streamed unit, which
    is then written to the offload folder or kept). ``optkit.loading`` reads a checkpoint this way, one unit
    at a time; resident units then get stacked q/k/v where that pays (as ``optkit.inference.prepare``).
    ``prefetch``: bring the next streamed unit in while the current one computes (:class:`Prefetcher`);
    default: when the compute device is CUDA (on a side stream, from pinned memory).
    """
    if is_dispatched(model):
        raise InputError("this model is already dispatched (model.device_map is set); build or load it again "
                         "to place it differently")
    groups = placement_groups(model, dtype="float32", batch=1, max_length=1)
    resolved = _resolve(model, device_map, groups, max_memory)
    for unit_name, device in resolved.items():
        check_present(device, what=f"device_map['{unit_name}']")
    accelerators = [d for d in resolved.values() if isinstance(d, int)]
    compute = parse_device(compute_device, what="compute_device") if compute_device is not None else \
        (min(accelerators) if accelerators else "cpu")
    if compute == "disk":
        raise InputError("compute_device 'disk' cannot compute; use an accelerator index or 'cpu'")
    check_present(compute, what="compute_device")
    units = placement_units(model)  # forward order
    streamed = [u for u in units if resolved[u.name] == "disk" or (resolved[u.name] == "cpu" and compute != "cpu")]
    for unit in streamed:
        problem = streamable_problem(unit)
        if problem is not None:
            raise InputError(f"'{unit.name}' cannot be streamed from {resolved[unit.name]!r}: {problem}; "
                             "place it on the compute device instead")
    if load_unit is None:
        _check_weights_present(units)
    folder = _check_offload_folder(offload_folder, [u.name for u in units if resolved[u.name] == "disk"])

    compute_torch = torch_device(compute)
    streams = _place(model, units, resolved, set(u.name for u in streamed), compute_torch, folder, load_unit)
    first = units[0]  # the input units (or whatever runs first) decide where inputs go
    input_device = compute_torch if first.name in streams else torch_device(resolved[first.name])
    use_prefetch = _on_cuda(compute_torch) if prefetch is None else bool(prefetch)
    handles, prefetcher = _hook(model, units, resolved, streams, compute_torch, input_device, use_prefetch)
    if prefetcher is not None:
        _PREFETCHERS[model] = prefetcher
    if model.inference_session is not None:
        model.inference_session.clear()  # kept graphs captured the old placement
    computes = {unit.name: compute_torch if unit.name in streams else torch_device(resolved[unit.name])
                for unit in units}
    model.placement = Placement(device_map={unit.name: resolved[unit.name] for unit in units},
                                input_device=input_device, hooks=handles, compute_devices=computes)
    return model


def _place(model: Model, units: list[Unit], resolved: Mapping[str, Device], streamed: set[str],
           compute: torch.device, folder: Path | None,
           load_unit: Callable[[str, torch.device], None] | None) -> dict[str, _Stream]:
    """Unit by unit in forward order: load it (when ``load_unit``), move a resident unit to its device, or
    write / keep a streamed one and swap in meta tensors at once (so its memory is freed before the next
    unit loads). Returns the streams of the streamed units."""
    streams: dict[str, _Stream] = {}
    slot_of: dict[int, _Slot] = {}  # id(placeholder) -> its slot: a tensor shared with an earlier streamed unit
    for unit in units:
        device = resolved[unit.name]
        if load_unit is not None:
            load_unit(unit.name, torch.device("cpu") if unit.name in streamed else torch_device(device))
            _check_weights_present([unit], known=slot_of)
        if unit.name not in streamed:
            unit.module.to(torch_device(device))
            if load_unit is not None:
                _stack_where_it_pays(unit)
            continue
        streams[unit.name] = _stream_unit(model, unit, device, compute, folder, slot_of)
    return streams


def _stack_where_it_pays(unit: Unit) -> None:
    for module in unit.module.modules():
        if isinstance(module, PreparedAttention):
            module.stack_projections()


def _stream_unit(model: Model, unit: Unit, device: Device, compute: torch.device, folder: Path | None,
                 slot_of: dict[int, _Slot]) -> _Stream:
    """The unit's tensors written to its file ("disk") or kept in host memory, every holder (also in other
    units: a tied head) given a meta placeholder; the stream that brings them back per forward."""
    stream = _Stream(compute)
    fresh: dict[int, Tensor] = {}
    for _, _, tensor in unit_tensors(unit.module):
        if id(tensor) in slot_of:
            if slot_of[id(tensor)] not in stream.slots:
                stream.slots.append(slot_of[id(tensor)])
        else:
            fresh.setdefault(id(tensor), tensor)
    located = _write_unit(unit, folder, skip=set(slot_of)) if device == "disk" else {}
    lock = _hold(next(iter(located.values()))[0]) if located else None  # marks the file as this model's
    owners_of = _owners(model, set(fresh))
    for key, tensor in fresh.items():
        holders = owners_of[key]
        placeholder = torch.empty_like(tensor, device="meta")
        if holders[0][2]:
            placeholder = nn.Parameter(placeholder, requires_grad=False)
        slot = _Slot(owners=[(m, n) for m, n, _ in holders], is_parameter=holders[0][2], placeholder=placeholder)
        if device == "disk":
            slot.file, slot.key = located[key]
            slot.lock = lock
        else:
            slot.host = _host_copy(tensor, pin=_on_cuda(compute))
        stream.slots.append(slot)
        slot_of[id(placeholder)] = slot
    stream.release()
    for module in unit.module.modules():
        if isinstance(module, PreparedAttention):
            _ = module.stacked  # notices q/k/v left the stacked buffer and drops it (frees its memory)
    return stream


def _owners(model: Model, ids: set[int]) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """(module, attribute, is_parameter) of every holder of the tensors in ``ids``, anywhere in the model."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for owner in model.modules():
        for name, p in owner._parameters.items():
            if p is not None and id(p) in ids:
                owners.setdefault(id(p), []).append((owner, name, True))
        for name, b in owner._buffers.items():
            if b is not None and id(b) in ids:
                owners.setdefault(id(b), []).append((owner, name, False))
    return owners


def _hook(model: Model, units: list[Unit], resolved: Mapping[str, Device], streams: Mapping[str, _Stream],
          compute: torch.device, input_device: torch.device,
          prefetch: bool) -> tuple[list[torch.utils.hooks.RemovableHandle], Prefetcher | None]:
    """Move activations into each unit, stream what is streamed (prefetching the next streamed unit when
    ``prefetch``), and bring outputs back to the inputs' device."""
    input_streams = [streams[u.name] for u in units if u.role == "input" and u.name in streams]
    sites = [_Site("decoder", input_streams)] if input_streams else []
    sites += [_Site(u.name, [streams[u.name]]) for u in units if u.role != "input" and u.name in streams]
    prefetcher = Prefetcher(sites, compute) if prefetch and sites else None
    handles = _hooks_on(model.decoder, input_device, "decoder" if input_streams else None, sites, prefetcher,
                        starts_forward=True)
    for unit in units:
        if unit.role == "input":
            continue
        device = compute if unit.name in streams else torch_device(resolved[unit.name])
        handles += _hooks_on(unit.module, device, unit.name if unit.name in streams else None, sites, prefetcher)

    def outputs_to_inputs(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        return to_device(output, input_device)

    handles.append(model.register_forward_hook(outputs_to_inputs, with_kwargs=True))
    if prefetcher is not None:
        handles.append(model.register_forward_hook(lambda *_: prefetcher.finish(), always_call=True))
    return handles, prefetcher


def _hooks_on(module: nn.Module, device: torch.device, site: str | None, sites: list[_Site],
              prefetcher: Prefetcher | None, starts_forward: bool = False) -> list[Any]:
    """The pre-hook moves the inputs to ``device`` and brings in the weights of ``site`` (when it streams);
    the post-hook (run even if the forward raises) releases them."""
    streams = next((s.streams for s in sites if s.name == site), [])

    def before(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if prefetcher is None:
            for stream in streams:
                stream.load()
        elif site is not None:
            prefetcher.acquire(site)
        elif starts_forward:
            prefetcher.begin()
        return to_device(args, device), to_device(kwargs, device)

    def after(*_: Any) -> None:
        if prefetcher is not None:
            prefetcher.release(site)
            return
        for stream in streams:
            stream.release()

    handles = [module.register_forward_pre_hook(before, with_kwargs=True)]
    if streams:
        handles.append(module.register_forward_hook(after, always_call=True))
    return handles


def prefetcher_of(model: Model) -> Prefetcher | None:
    """The prefetcher of a dispatched model (None: no streamed unit, or prefetch off), e.g. to set its ``trace``."""
    return _PREFETCHERS.get(model)
