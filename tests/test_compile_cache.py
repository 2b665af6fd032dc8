"""The compile cache (``optkit.inference.compile_cache``): where it lives, how it is switched off, that a
damaged or stale entry is rebuilt and never used, and -- end to end, in fresh processes -- that a second
process loads what the first one compiled (checked with inductor's cache counters, not with timing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from optkit.inference import compile_cache
from optkit.inference.compile_cache import CachedStep, cache_directory, entry_key, entry_path, read_entry, write_entry

ROOT = Path(__file__).resolve().parents[1]


# -- where -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "off", "false", "No"])
def test_env_var_turns_the_cache_off(monkeypatch, value):
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", value)
    assert cache_directory() is None


def test_env_var_path_and_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", str(tmp_path / "here"))
    assert cache_directory() == tmp_path / "here"
    monkeypatch.delenv("OPTKIT_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory() == tmp_path / "xdg" / "optkit" / "compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_directory() == Path.home() / ".cache" / "optkit" / "compile"


# -- the file ----------------------------------------------------------------------------------------
def tiny_key(batch=1, length=256):
    decoder, head = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    return entry_key(decoder, head, batch, length)


def test_key_follows_shape_dtype_and_structure_not_weights():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with torch.no_grad():
        b.weight.add_(1.0)
    head = torch.nn.LayerNorm(4)
    assert entry_key(a, head, 1, 256) == entry_key(b, head, 1, 256)  # weights do not count
    assert entry_key(a, head, 1, 256) != entry_key(a, head, 2, 256)
    assert entry_key(a, head, 1, 256) != entry_key(a, head, 1, 512)
    assert entry_key(a, head, 1, 256) != entry_key(a.double(), head, 1, 256)
    assert entry_key(a, head, 1, 256) != entry_key(a, torch.nn.LayerNorm(4, eps=1e-3), 1, 256)


def test_entry_round_trip(tmp_path):
    key = tiny_key()
    path = entry_path(key, tmp_path)
    write_entry(path, key, b"artifacts", {"ab/kernel.so": b"\x7fELF", "ab/kernel.cpp": b"int x;"})
    assert read_entry(path, key) == (b"artifacts", {"ab/kernel.so": b"\x7fELF", "ab/kernel.cpp": b"int x;"})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "garbage", "other_torch", "bad_kernel_name"])
def test_damaged_or_stale_entry_is_deleted_not_used(tmp_path, damage):
    key = tiny_key()
    path = entry_path(key, tmp_path)
    kernels = {"../escape.so": b"x"} if damage == "bad_kernel_name" else {"ab/k.so": b"x"}
    write_entry(path, key, b"artifacts-bytes", kernels)
    data = path.read_bytes()
    header, payload = data.split(b"\n", 1)
    if damage == "flip_payload":
        path.write_bytes(header + b"\n" + b"X" + payload[1:])
    elif damage == "truncate":
        path.write_bytes(data[:-3])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01 not json\n" + payload)
    elif damage == "other_torch":
        h = json.loads(header)
        h["torch"] = "1.0.0"
        path.write_bytes(json.dumps(h).encode() + b"\n" + payload)
    before = compile_cache.stats["rebuilt"]
    assert read_entry(path, key) is None
    assert not path.exists()
    assert compile_cache.stats["rebuilt"] == before + 1


class FakeStep:
    """What CachedStep reads from a DecodeStep."""

    def __init__(self, batch=1, length=256):
        self.decoder, self.head = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
        self.ids = torch.zeros(batch, 1, dtype=torch.long)
        self.visible = torch.zeros(batch, length, dtype=torch.bool)


@pytest.fixture
def fake_torch_cache(monkeypatch):
    """torch.compiler's save/load replaced by a recorder; no compilation runs."""
    calls = {"loaded": []}
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"ARTIFACTS", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: calls["loaded"].append(data))
    monkeypatch.setattr(compile_cache, "step_kernels", lambda start: {})
    return calls


def test_cached_step_saves_then_a_new_one_loads(monkeypatch, tmp_path, fake_torch_cache):
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", str(tmp_path))
    compile_cache.stats.clear()
    step = FakeStep()
    assert CachedStep(lambda s: "logits")(step) == "logits"
    assert compile_cache.stats["saved"] == 1 and len(list(tmp_path.glob("*.bin"))) == 1
    CachedStep(lambda s: "logits")(FakeStep())  # another process's first call: loads
    assert fake_torch_cache["loaded"] == [b"ARTIFACTS"] and compile_cache.stats["loaded"] == 1


def test_cached_step_rebuilds_a_corrupted_entry(monkeypatch, tmp_path, fake_torch_cache):
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", str(tmp_path))
    CachedStep(lambda s: 0)(FakeStep())
    (entry,) = tmp_path.glob("*.bin")
    entry.write_bytes(entry.read_bytes()[:-2] + b"!!")
    compile_cache.stats.clear()
    CachedStep(lambda s: 0)(FakeStep())
    assert fake_torch_cache["loaded"] == []  # never handed to torch
    assert compile_cache.stats["rebuilt"] == 1 and compile_cache.stats["saved"] == 1
    assert read_entry(entry, entry_key(FakeStep().decoder, FakeStep().head, 1, 256)) is not None


def test_cached_step_replaces_an_entry_torch_refuses(monkeypatch, tmp_path, fake_torch_cache):
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", str(tmp_path))
    CachedStep(lambda s: 0)(FakeStep())

    def refuse(data):
        raise RuntimeError("unpickling failed")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", refuse)
    compile_cache.stats.clear()
    CachedStep(lambda s: 0)(FakeStep())
    assert compile_cache.stats["rebuilt"] == 1 and compile_cache.stats["saved"] == 1


def test_env_var_off_writes_nothing(monkeypatch, tmp_path, fake_torch_cache):
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compile_cache.stats.clear()
    CachedStep(lambda s: 0)(FakeStep())
    assert compile_cache.stats["disabled"] == 1 and not any(tmp_path.rglob("*"))


def test_only_the_first_call_per_step_touches_the_disk(monkeypatch, tmp_path, fake_torch_cache):
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", str(tmp_path))
    compile_cache.stats.clear()
    cached, step = CachedStep(lambda s: 1), FakeStep()
    for _ in range(5):
        cached(step)
    assert sum(compile_cache.stats.values()) == 2  # one "missing", one "saved"


def test_unwritable_directory_does_not_stop_generation(monkeypatch, tmp_path, fake_torch_cache):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", str(blocker / "cache"))
    assert CachedStep(lambda s: 7)(FakeStep()) == 7


# -- end to end: two fresh processes -----------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, torch, optkit, optkit.inference
    from optkit.inference import compile_cache
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = optkit.inference.prepare(optkit.build("opt-tiny").eval())
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, compile=True)
    ref = model.generate(ids, max_new_tokens=4, min_new_tokens=4, decode_graph=False)
    print(json.dumps({"stats": dict(compile_cache.stats), "same": bool(torch.equal(out, ref)),
                      "inductor": dict(counters["inductor"])}))
""")


def run_child(cache: Path, inductor: Path) -> dict:
    """A fresh process with its own, empty inductor directory: anything it does not compile came from us."""
    env = dict(os.environ, OPTKIT_COMPILE_CACHE=str(cache), TORCHINDUCTOR_CACHE_DIR=str(inductor))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) on CPU needs a C++ compiler (g++ or c++)")
def test_second_process_loads_the_compilation(tmp_path):
    cache = tmp_path / "optkit-cache"
    first = run_child(cache, tmp_path / "inductor-1")
    assert first["same"] and first["stats"].get("saved") == 1
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1  # it compiled
    (entry,) = cache.glob("*.bin")
    header = json.loads(entry.read_bytes().split(b"\n", 1)[0])
    assert any(name.endswith(".so") for name, _ in header["kernels"])  # the C++ kernels travel too

    second = run_child(cache, tmp_path / "inductor-2")
    assert second["same"] and second["stats"].get("loaded") == 1 and "saved" not in second["stats"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0  # nothing compiled afresh

    entry.write_bytes(entry.read_bytes()[:-10] + b"corrupted!")
    third = run_child(cache, tmp_path / "inductor-3")
    assert third["same"] and third["stats"].get("rebuilt") == 1 and third["stats"].get("saved") == 1
    assert read_entry(entry, header["key"]) is not None  # rebuilt sound
