"""The compiled decode step, kept on disk so that a second process does not compile it again.

torch.compile keeps its work in memory; inductor also keeps an on-disk cache (``TORCHINDUCTOR_CACHE_DIR``,
by default under /tmp, shared by everything the user compiles and emptied with /tmp). This module keeps
optkit's own copy in the user cache directory, one file per model fingerprint and shape bucket:

* torch's portable cache artifacts (``torch.compiler.save_cache_artifacts``: the AOTAutograd and
  FX-graph cache entries), which spare tracing through AOTAutograd and inductor's lowering, and
* the C++ kernels inductor built for the step on CPU (``*.so`` / ``*.cpp`` / ``*.py`` under its cache
  directory): torch 2.13's artifacts do not carry them, and the g++ builds are most of a CPU compile.

Dynamo's trace of the step still runs in every process (seconds, not the tens of seconds of a build).

Where: ``$OPTKIT_COMPILE_CACHE`` if it names a directory, else ``$XDG_CACHE_HOME/optkit/compile``, else
``~/.cache/optkit/compile``; ``OPTKIT_COMPILE_CACHE=0`` (or ``off`` / ``false`` / ``no``) turns it off.
An entry is a JSON header line (format, torch version, key, size and SHA-256 of the payload) and the
payload; it is written to a temporary file and renamed, so a reader never sees half a file. An entry
whose header does not parse, whose checksum or torch version does not match, or that torch refuses,
is deleted and rebuilt, never used; so is one that did not spare the compilation (a stale entry).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from optkit.inference.decode_graph import DecodeStep

log = logging.getLogger(__name__)

ENV = "OPTKIT_COMPILE_CACHE"
FORMAT = 1
MAGIC = "optkit-compile-cache"
OFF = {"0", "off", "false", "no"}
KERNEL_SUFFIXES = (".so", ".cpp", ".py", ".h")
# What happened in this process (the tests and `optkit bench` read it): loaded, saved, rebuilt, ...
stats: Counter[str] = Counter()


# -- where ---------------------------------------------------------------------------------------
def cache_directory() -> Path | None:
    """The directory entries live in, or None when ``OPTKIT_COMPILE_CACHE`` turns the cache off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value and value.lower() not in {"1", "on", "true", "yes"}:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "optkit" / "compile"


# -- what ----------------------------------------------------------------------------------------
@functools.cache
def compiler_version() -> str:
    """Changes with optkit's compile backend (its decompositions are part of what a kernel computes)."""
    backend = Path(__file__).with_name("compiled.py")  # read, not imported: compiled.py imports this module
    return hashlib.sha256(backend.read_bytes()).hexdigest()[:16]


def _modules_fingerprint(modules: list[torch.nn.Module]) -> str:
    """Structure, settings, shapes, dtypes and devices of the modules -- not their weights."""
    digest = hashlib.sha256()
    for root in modules:
        for name, module in root.named_modules():
            digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}:{module.extra_repr()}".encode())
            for pname, p in module.named_parameters(recurse=False):
                digest.update(f"{pname}:{tuple(p.shape)}:{p.dtype}:{p.device.type}".encode())
            for bname, b in module.named_buffers(recurse=False):
                digest.update(f"{bname}:{tuple(b.shape)}:{b.dtype}:{b.device.type}".encode())
    return digest.hexdigest()[:32]


def entry_key(decoder: torch.nn.Module, head: torch.nn.Module, batch_size: int, max_length: int) -> dict[str, Any]:
    """Everything a compiled step depends on: torch, python, optkit's backend, the model (spec, dtype,
    device, backend choices as modules) and the shape bucket."""
    return {"torch": torch.__version__, "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "backend": compiler_version(), "model": _modules_fingerprint([decoder, head]),
            "batch": int(batch_size), "length": int(max_length)}


def entry_path(key: dict[str, Any], directory: Path) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
    return directory / f"{name}.bin"


def has_entry(model: Any, batch_size: int, max_length: int) -> bool:
    """Whether a warm entry exists for this model and shape (``compile="auto"`` asks); no checksum read."""
    from optkit.inference.decode_graph import padded_length

    directory = cache_directory()
    if directory is None:
        return False
    key = entry_key(model.decoder, model.head, batch_size, padded_length(max_length, True))
    return entry_path(key, directory).is_file()


# -- the file --------------------------------------------------------------------------------------
def write_entry(path: Path, key: dict[str, Any], artifacts: bytes, kernels: dict[str, bytes]) -> None:
    """Header line + payload (artifacts, then each kernel file), written atomically."""
    payload = artifacts + b"".join(kernels.values())
    header = {"magic": MAGIC, "format": FORMAT, "torch": torch.__version__, "key": key,
              "artifacts": len(artifacts), "kernels": [[name, len(data)] for name, data in kernels.items()],
              "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n" + payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_entry(path: Path, key: dict[str, Any]) -> tuple[bytes, dict[str, bytes]] | None:
    """(artifacts, kernels) of a sound entry for ``key``; None when there is none. A damaged or stale
    entry is deleted (and counted in ``stats["rebuilt"]``), never returned."""
    try:
        data = path.read_bytes()
    except OSError:  # none there, or the directory is unusable (then saving says so)
        return None
    problem = _entry_problem(data, key)
    if problem is None:
        header_line, payload = data.split(b"\n", 1)
        header = json.loads(header_line)
        artifacts, offset, kernels = payload[:header["artifacts"]], header["artifacts"], {}
        for name, size in header["kernels"]:
            kernels[name] = payload[offset:offset + size]
            offset += size
        return artifacts, kernels
    log.warning("optkit compile cache: %s is %s; deleting it, the step compiles afresh", path, problem)
    discard(path)
    return None


def _entry_problem(data: bytes, key: dict[str, Any]) -> str | None:
    """What is wrong with an entry's bytes (None: nothing)."""
    header_line, newline, payload = data.partition(b"\n")
    try:
        header = json.loads(header_line)
    except ValueError:
        return "not an optkit compile-cache entry (unreadable header)"
    if not newline or not isinstance(header, dict) or header.get("magic") != MAGIC:
        return "not an optkit compile-cache entry"
    if header.get("format") != FORMAT or header.get("torch") != torch.__version__ or header.get("key") != key:
        return f"stale (format {header.get('format')}, torch {header.get('torch')})"
    if len(payload) != header.get("size") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        return "corrupted (checksum mismatch)"
    kernels = header.get("kernels")
    if not isinstance(kernels, list) or not all(_safe_kernel_name(k[0]) for k in kernels):
        return "corrupted (bad kernel list)"
    return None


def discard(path: Path) -> None:
    stats["rebuilt"] += 1
    path.unlink(missing_ok=True)


# -- inductor's kernels --------------------------------------------------------------------------
def _inductor_directory() -> Path | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # another torch layout: the artifacts alone still spare the lowering
        return None
    return Path(cache_dir())


def _safe_kernel_name(name: Any) -> bool:
    return (isinstance(name, str) and name.endswith(KERNEL_SUFFIXES) and not name.startswith(("/", "\\"))
            and ".." not in Path(name).parts)


def step_kernels(start: float) -> dict[str, bytes]:
    """The C++ kernels of the compilation that began at ``start``, by path under inductor's cache directory.

    Inductor builds each fused kernel as its own ``.so`` (in worker processes) and the step's wrapper
    as one more, which this process loads: those written since ``start`` and those mapped into this
    process (``/proc/self/maps``, Linux) are kept, each ``.so`` with its ``.cpp``. Kernels another
    process built earlier into inductor's own cache are not copied (they are still there for the next
    process, unless /tmp is emptied -- then that process builds them again).
    """
    root = _inductor_directory()
    if root is None or not root.is_dir():
        return {}
    root = root.resolve()
    libraries = {path for path in root.rglob("*.so") if path.stat().st_mtime >= start}
    libraries |= {path for path in _mapped_libraries() if root in path.parents}
    found = {}
    for library in libraries:
        for file in (library, library.with_suffix(".cpp")):
            if file.is_file():
                found[file.relative_to(root).as_posix()] = file.read_bytes()
    return found


def _mapped_libraries() -> set[Path]:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {Path(fields[5]) for fields in (line.split(maxsplit=5) for line in maps.splitlines())
            if len(fields) == 6 and fields[5].endswith(".so")}


def restore_kernels(kernels: dict[str, bytes]) -> None:
    """Put the kernels back where inductor looks for them (files already there are left alone)."""
    root = _inductor_directory()
    if root is None:
        return
    for name, data in kernels.items():
        target = root / name
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)


# -- the hook --------------------------------------------------------------------------------------
def _compile_misses() -> int:
    """How many graphs inductor has compiled from scratch in this process (its cache's miss counter)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_bypass"]


class CachedStep:
    """A compiled decode-step function that loads its compilation from disk before the first call per
    model and shape, and saves it after a call that compiled (see the module docstring)."""

    def __init__(self, compiled: Callable[[DecodeStep], Any]):
        self.compiled = compiled
        self._lock = threading.Lock()
        self._done: set[str] = set()

    def __call__(self, step: DecodeStep) -> Any:
        if getattr(step, "_compile_cache_done", False):
            return self.compiled(step)
        with self._lock:  # one first call at a time: the step compiles here
            result = self._first_call(step)
        step._compile_cache_done = True
        return result

    def _first_call(self, step: DecodeStep) -> Any:
        directory = cache_directory()
        if directory is None:
            stats["disabled"] += 1
            return self.compiled(step)
        key = entry_key(step.decoder, step.head, step.ids.shape[0], step.visible.shape[1])
        path = entry_path(key, directory)
        if path.name in self._done:
            return self.compiled(step)
        loaded = self._load(path, key)
        misses, start = _compile_misses(), time.time() - 2  # file times can be coarse
        result = self.compiled(step)
        compiled_afresh = _compile_misses() > misses
        if loaded and compiled_afresh:  # the entry did not spare the compilation: stale, replace it
            log.warning("optkit compile cache: %s did not match this step; replacing it", path)
            discard(path)
        if compiled_afresh or not loaded:
            self._save(path, key, start)
        self._done.add(path.name)
        return result

    def _load(self, path: Path, key: dict[str, Any]) -> bool:
        entry = read_entry(path, key)
        if entry is None:
            stats["missing"] += 1
            return False
        artifacts, kernels = entry
        try:
            restore_kernels(kernels)
            torch.compiler.load_cache_artifacts(artifacts)
        except Exception as exc:  # noqa: BLE001 - a sound file torch cannot read is rebuilt, not fatal
            log.warning("optkit compile cache: torch could not load %s (%s: %s); rebuilding it", path,
                        type(exc).__name__, exc)
            discard(path)
            return False
        stats["loaded"] += 1
        log.info("optkit compile cache: loaded %s", path)
        return True

    def _save(self, path: Path, key: dict[str, Any], start: float) -> None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:  # nothing cacheable was compiled (e.g. inductor bypassed its cache)
            stats["uncacheable"] += 1
            return
        try:
            write_entry(path, key, saved[0], step_kernels(start))
        except OSError as exc:  # a read-only home must not stop generation
            log.warning("optkit compile cache: could not write %s (%s); set %s=0 to turn the cache off", path,
                        exc, ENV)
            return
        stats["saved"] += 1
        log.info("optkit compile cache: saved %s", path)
