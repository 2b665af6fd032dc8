"""The files of a checkpoint directory: each one read strictly, all of them written as one change.

Reading: ``config.json`` and index JSON, safetensors and ``torch.save`` zip files. Every problem is
one ``CheckpointError`` that names the file (and the field or tensor); an index may only name files
inside its own directory; a tensor stored twice, or stored where the index does not say, is refused.

Writing, and why the order matters. A save first writes and fsyncs every new file in a staging
folder inside the directory (``.optkit-tmp-<pid>-<hex>``: no loader looks into it), so a crash or a
full disk while writing leaves the old checkpoint untouched. Then, holding a lock on the directory:
``config.json`` moves aside first (from here on the directory fails to load, with a clear error,
in optkit and in transformers alike), the old weight files and indexes follow it, the new weight
files move in, and the new ``config.json`` moves in last: that one rename is the commit. A process
killed at any instant therefore leaves a directory that loads the complete old checkpoint, the
complete new one, or nothing. Files the loader would not read (README.md, tokenizer files, notes)
are never touched. The next save removes whatever a killed one left behind.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import reprlib
import secrets
import shutil
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from optkit.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

CONFIG_NAME = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
OPTKIT_SPEC_NAME = "optkit-spec.yaml"  # the spec of optkit's own format (optkit.native_checkpoint)
GENERATION_CONFIG_NAME = "generation_config.json"  # generate()'s defaults: belong to the weights they were saved with
STAGING_PREFIX = ".optkit-tmp-"
# Shard names transformers writes; such a file is a checkpoint's even when no index lists it any more.
SHARD_NAME = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|pytorch_model-\d{5}-of-\d{5}\.bin)$")
# Temporary files of earlier optkit versions, which wrote file by file (mkstemp: ".<name>.<8 chars>.tmp").
OLD_TEMP_NAME = re.compile(r"^\.(config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors)"
                           r"\.[a-z0-9_]{8}\.tmp$")
# torch.save's legacy (pre-zip) files start with this magic number, pickled as a long.
LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
SHOWN = 5  # examples quoted in one message
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120
_SHORT.maxlist = _SHORT.maxdict = SHOWN


def quoted(value: Any) -> str:
    """A piece of user data in a message, quoted and capped."""
    return _SHORT.repr(value)


def capped(name: str, limit: int = 200) -> str:
    """A name from a file in a message, unquoted and capped."""
    return name if len(name) <= limit else name[: limit - 3] + "..."


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else "")
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}".rstrip(": ")


# -- reading -----------------------------------------------------------------------------------------
def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; anything else (empty, not UTF-8, invalid, a list) names the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {_cause(exc)}") from None
    if not data.strip():
        raise CheckpointError(f"{path} is empty; {what} must be a JSON object: download or save it again")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                              f"{what} must be UTF-8 JSON") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                              "fix or replace the file") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}; {what} must be a JSON object {{...}}")
    return value


def inside(name: str) -> bool:
    """Whether a file name from an index stays inside the index's directory (and out of staging folders)."""
    posix = PurePosixPath(name.replace("\\", "/"))
    return (bool(name) and "\x00" not in name and not posix.is_absolute() and not PureWindowsPath(name).drive
            and ".." not in posix.parts and bool(posix.parts)
            and not posix.parts[0].startswith(STAGING_PREFIX))


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> shard file), every shard inside the directory."""
    data = read_json(index, what="a weight index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty object mapping tensor names to "
                              f"shard files, got {quoted(weight_map)}")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index}: weight_map[{quoted(key)}] must be a shard file name, got {quoted(name)}")
        if not inside(name):
            raise CheckpointError(f"{index}: weight_map[{quoted(key)}] = {quoted(name)} leaves the checkpoint "
                                  f"directory; an index may only name shard files inside {index.parent}")
    return weight_map


@dataclass(frozen=True)
class Weights:
    """The weight files of a checkpoint and, when sharded, the index that says which tensor is where."""

    directory: Path
    names: tuple[str, ...]
    index: str | None = None
    weight_map: dict[str, str] | None = None

    @property
    def files(self) -> list[Path]:
        return [self.directory / name for name in self.names]


def find_weights(directory: Path) -> Weights:
    """The weights a loader reads: an index first (safetensors, then pickle), then a single file."""
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        index = directory / index_name
        if index.is_file():
            weight_map = read_weight_map(index)
            names = tuple(sorted(set(weight_map.values())))
            missing = [name for name in names if not (directory / name).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing[:SHOWN])}"
                                      + (" ..." if len(missing) > SHOWN else "") + interrupted_hint(directory))
            return Weights(directory, names, index_name, weight_map)
    for name in (SAFETENSORS, PICKLE):
        if (directory / name).is_file():
            return Weights(directory, (name,))
    found = ", ".join(sorted(p.name for p in directory.iterdir() if not p.name.startswith(STAGING_PREFIX)))
    raise CheckpointError(f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PICKLE} or "
                          f"{PICKLE_INDEX}; found {found or 'nothing'}" + interrupted_hint(directory))


def interrupted_hint(directory: Path) -> str:
    """What to tell a user whose directory holds the leftovers of a killed save (empty when none)."""
    leftovers = sorted(p.name for p in directory.glob(STAGING_PREFIX + "*") if p.is_dir())
    if not leftovers:
        return ""
    return (f". An optkit save into this directory was interrupted ({leftovers[0]} is its leftover; the files of "
            f"the earlier checkpoint it had moved are in {leftovers[0]}/previous): save the checkpoint again")


def index_weights(weights: Weights, *, progress: bool = False) -> dict[str, Tensor | StoredTensor]:
    """Every tensor of the weight files, each stored exactly once and where the index says.

    Safetensors files are read by their headers only: each tensor is a :class:`StoredTensor` that
    :func:`read_tensors` reads later, a unit at a time, so no copy of the whole checkpoint is ever in memory.
    ``.bin`` files are loaded whole (``torch.load(mmap=True, weights_only=True)``): their tensors are real.
    """
    state: dict[str, Tensor | StoredTensor] = {}
    origin: dict[str, str] = {}
    for number, name in enumerate(weights.names, 1):
        file = weights.directory / name
        if progress:
            end = "\n" if number == len(weights.names) else ""
            print(f"\roptkit: reading weights {number}/{len(weights.names)} ({name})", end=end, file=sys.stderr,
                  flush=True)
        tensors = scan_safetensors(file) if file.suffix == ".safetensors" else read_pickle(file)
        for key, tensor in tensors.items():
            if key in origin:
                raise CheckpointError(f"tensor {quoted(key)} is stored twice, in {origin[key]} and in {name} (in "
                                      f"{weights.directory}); a checkpoint holds each tensor once: delete one copy "
                                      "or save the checkpoint again")
            origin[key], state[key] = name, tensor
    if weights.weight_map is not None:
        _check_index(weights, origin)
    return state


def read_weights(weights: Weights, *, progress: bool = False) -> dict[str, Tensor]:
    """Every tensor of the weight files in memory (:func:`index_weights`, then each one read)."""
    state = index_weights(weights, progress=progress)
    read = read_tensors({key: t for key, t in state.items() if isinstance(t, StoredTensor)})
    return {key: read.get(key, tensor) for key, tensor in state.items()}


def _check_index(weights: Weights, origin: dict[str, str]) -> None:
    """The index and the shards agree tensor by tensor (they disagree when shards of two saves mix)."""
    index, weight_map = weights.directory / str(weights.index), weights.weight_map or {}
    problems = [f"{quoted(key)} is in {name}, but the index lists it "
                + (f"in {quoted(weight_map[key])}" if key in weight_map else "nowhere")
                for key, name in origin.items() if weight_map.get(key) != name]
    problems += [f"{quoted(key)} is listed in {quoted(name)}, which has no such tensor"
                 for key, name in weight_map.items() if key not in origin]
    if problems:
        raise CheckpointError(f"{index} does not match its shard files ({len(problems)} tensor(s)): "
                              + "; ".join(problems[:SHOWN]) + (" ..." if len(problems) > SHOWN else "")
                              + ". The shards come from different saves: save or download the checkpoint again")


# safetensors' dtype names (the header's "dtype" field) -> torch dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                      "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, known by its shape and dtype until :func:`read_tensors` reads it."""

    file: Path
    key: str
    shape: torch.Size
    dtype: torch.dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def _unreadable(file: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{file} is not a readable safetensors file ({_cause(exc)}); it is truncated or "
                           "corrupt: download or save it again")


def scan_safetensors(file: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file from its header (validated by ``safe_open``); no data is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            found = {}
            for key in handle.keys():
                part = handle.get_slice(key)
                found[key] = (part.get_shape(), part.get_dtype())
                del part
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends, whatever the damage
        raise _unreadable(file, exc) from None
    unknown = next(((key, kind) for key, (_, kind) in found.items() if kind not in SAFETENSORS_DTYPES), None)
    if unknown is not None:
        raise CheckpointError(f"{file}: tensor {quoted(unknown[0])} has dtype {quoted(unknown[1])}, which optkit "
                              f"does not read ({', '.join(SAFETENSORS_DTYPES)}); convert the checkpoint")
    return {key: StoredTensor(file, key, torch.Size(shape), SAFETENSORS_DTYPES[kind])
            for key, (shape, kind) in found.items()}


def read_tensors(stored: dict[str, StoredTensor], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The ``stored`` tensors (name -> StoredTensor) on ``device``, floating point ones in ``dtype`` (default:
    the file's), each file opened once for them all.

    ``safe_open`` maps the file and ``get_tensor`` returns a view of the mapping: a tensor wanted on the CPU
    in its file's dtype stays that view (no copy; the mapping lives as long as such a tensor does), any
    other is copied straight into a new tensor on ``device`` in ``dtype``, and the view dropped at once. A
    loader calling this for one unit at a time holds about one unit in memory.
    """
    from safetensors import safe_open

    device = torch.device(device)
    by_file: dict[Path, list[str]] = {}
    for name, tensor in stored.items():
        by_file.setdefault(tensor.file, []).append(name)
    result: dict[str, Tensor] = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    view = handle.get_tensor(stored[name].key)
                    wanted = dtype if dtype is not None and view.is_floating_point() else view.dtype
                    if device.type == "cpu" and wanted == view.dtype:
                        result[name] = view
                    else:
                        result[name] = torch.empty(view.shape, dtype=wanted, device=device).copy_(view)
                    del view
        except Exception as exc:  # noqa: BLE001 - the file changed or broke since its header was read
            raise _unreadable(file, exc) from None
    return result


def read_tensor(stored: StoredTensor, *, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> Tensor:
    """One stored tensor (see :func:`read_tensors`)."""
    return read_tensors({stored.key: stored}, device=device, dtype=dtype)[stored.key]


def read_safetensors(file: Path) -> dict[str, Tensor]:
    """All tensors of one safetensors file; a damaged file is named, never a bare SafetensorError."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends, whatever the damage
        raise _unreadable(file, exc) from None


def read_pickle(file: Path) -> dict[str, Tensor]:
    """A ``torch.save`` zip file of tensors, read with ``weights_only=True`` (never arbitrary objects)."""
    if not zipfile.is_zipfile(file):
        with open(file, "rb") as handle:
            head = handle.read(64)
        if LEGACY_MAGIC in head:
            raise CheckpointError(
                f"{file} is in torch.save's legacy format (before torch 1.6, not a zip archive), which optkit does "
                "not read. Convert it once, where you trust the file: python -c \"import torch; "
                f"p = '{file.name}'; torch.save(torch.load(p, weights_only=True), p)\" (rewrites it as a zip "
                "archive), or save it as safetensors")
        raise CheckpointError(f"{file} is not a torch.save zip archive (it is empty, truncated or corrupt): "
                              "download or save it again")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"cannot read {file} with weights_only=True ({_cause(exc)}); optkit refuses to "
                              "unpickle arbitrary objects: convert it to safetensors") from None
    except Exception as exc:  # noqa: BLE001 - a damaged zip archive
        raise CheckpointError(f"{file} is truncated or corrupt ({_cause(exc)}): download or save it again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict (tensor names -> tensors)")
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, Tensor):
            raise CheckpointError(f"{file}: entry {quoted(key)} is a {type(tensor).__name__}, not a tensor; a "
                                  "checkpoint holds a flat state dict (tensor names -> tensors)")
    return state


# -- writing -----------------------------------------------------------------------------------------
Writer = Callable[[Path], None]


def write_checkpoint(directory: Path, files: dict[str, Writer]) -> None:
    """Replace the checkpoint in ``directory`` by ``files`` (name -> writer), all or nothing.

    ``files`` must contain ``config.json``: it is the commit. Errors name the file and the cause.
    """
    if CONFIG_NAME not in files:
        raise ValueError(f"write_checkpoint needs {CONFIG_NAME}: it is the commit")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the checkpoint directory {directory}: {_cause(exc)}") from exc
    with locked(directory):
        if (directory / CONFIG_NAME).is_file():  # else a killed save's folder holds the only copy of the old files
            remove_leftovers(directory)
        staging = directory / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
        except OSError as exc:
            raise CheckpointError(f"cannot write into {directory}: {_cause(exc)}") from exc
        live = _lock(staging, exclusive=True)  # held until the end: marks the staging folder as a live save's
    try:
        try:
            for name, write in files.items():
                _write_staged(directory, staging, name, write)
            _fsync(staging, is_dir=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with locked(directory):  # loaders wait for the swap, so none of them sees it half done
            _swap_in(directory, staging, list(files))
            remove_leftovers(directory)  # committed: what earlier killed saves left is now superseded
    finally:
        if live is not None:
            os.close(live)


def _write_staged(directory: Path, staging: Path, name: str, write: Writer) -> None:
    path = staging / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        _fsync(path)
    except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError ("File too large (os error 27)"), ...
        raise CheckpointError(f"cannot write {directory / name}: {_cause(exc)}; nothing was replaced, "
                              f"{directory} still holds what it held before the save") from exc


def _swap_in(directory: Path, staging: Path, names: list[str]) -> None:
    """Move the staged files in: old config out first, new config in last (see the module doc)."""
    previous = staging / "previous"
    replaced = {name for name in names if (directory / name).is_file()}  # e.g. a trainer state: undoable too
    old = sorted(set(checkpoint_files_in(directory)) | replaced, key=lambda name: name != CONFIG_NAME)
    new = sorted(names, key=lambda name: (name == CONFIG_NAME, name in (SAFETENSORS, SAFETENSORS_INDEX)))
    aside: list[str] = []
    placed: list[str] = []
    moving = ""
    try:
        for moving in old:  # config.json first: from here on the directory does not load
            (previous / moving).parent.mkdir(parents=True, exist_ok=True)
            os.replace(directory / moving, previous / moving)
            aside.append(moving)
        _fsync(directory, is_dir=True)
        for moving in new:  # config.json last: the commit
            (directory / moving).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / moving, directory / moving)
            placed.append(moving)
    except BaseException as exc:
        if _undo(directory, previous, aside, placed):
            shutil.rmtree(staging, ignore_errors=True)
            state = f"the save was undone and {directory} holds what it held before"
        else:
            state = f"the save could not be undone: the earlier checkpoint's files are in {previous}"
        if isinstance(exc, Exception):
            raise CheckpointError(f"cannot move {directory / moving} during the save: {_cause(exc)}; {state}"
                                  ) from exc
        raise
    _fsync(directory, is_dir=True)
    shutil.rmtree(staging, ignore_errors=True)


def _undo(directory: Path, previous: Path, aside: list[str], placed: list[str]) -> bool:
    """After a failed move: take the new files out, put the old ones back; whether all of that worked."""
    restored = True
    for name in reversed(placed):
        try:
            os.unlink(directory / name)
        except OSError:
            restored = False
    for name in reversed(aside):
        try:
            os.replace(previous / name, directory / name)
        except OSError:
            restored = False
    return restored


def checkpoint_files_in(directory: Path) -> list[str]:
    """The files of the checkpoint now in ``directory`` that a new save supersedes.

    That is config.json, the weight files and indexes a loader would read (also those of an index
    that is no longer the one read), shard files with transformers' names, the spec of optkit's own format
    and generation_config.json (generate's defaults, which a save without settings must not inherit from
    the model saved there before: transformers' save_pretrained rewrites it too). Nothing else.
    """
    names = {CONFIG_NAME, SAFETENSORS, SAFETENSORS_INDEX, PICKLE, PICKLE_INDEX, OPTKIT_SPEC_NAME,
             GENERATION_CONFIG_NAME}
    for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
        try:
            names |= {n for n in read_weight_map(directory / index).values() if n.endswith((".safetensors", ".bin"))}
        except CheckpointError:  # absent or unreadable: it lists nothing
            pass
    names |= {p.name for p in directory.iterdir() if SHARD_NAME.match(p.name)}
    return sorted(n for n in names if (directory / n).is_file() or (directory / n).is_symlink())


def remove_leftovers(directory: Path) -> None:
    """Delete the staging folders and temporary files of saves that were killed (callers hold the lock)."""
    for path in directory.iterdir():
        if path.name.startswith(STAGING_PREFIX) and path.is_dir() and not path.is_symlink() and not _is_live(path):
            shutil.rmtree(path, ignore_errors=True)
        elif OLD_TEMP_NAME.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


@contextmanager
def locked(directory: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold a lock on a directory while the block runs: exclusive for a save's swap, shared for a load.

    Best effort: where flock does not exist (Windows) or fails (some network filesystems) the block
    runs unlocked; crash safety does not depend on it, only concurrent saves and loads do.
    """
    fd = _lock(directory, exclusive=not shared)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def _lock(path: Path, *, exclusive: bool, wait: bool = True) -> int | None:
    """A descriptor holding an flock on ``path``; None where flock is unavailable, failed, or (wait=False) busy."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _is_live(staging: Path) -> bool:
    """Whether a running save holds this staging folder (it keeps an flock on it until it ends)."""
    if fcntl is None:
        return False
    fd = _lock(staging, exclusive=True, wait=False)
    if fd is None:
        return True
    os.close(fd)
    return False


def _fsync(path: Path, *, is_dir: bool = False) -> None:
    """Flush a file's data, or a directory's entries, to the disk (so no rename exposes a file not yet written).

    A file's fsync error counts (a full disk may only show here); a directory's is ignored, as some
    filesystems cannot fsync one.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if not is_dir:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)
