"""Checkpoints are trustworthy: a save replaces the old one whole or not at all; loading is contained and strict.

Every error case asserts the error type and that the message names the thing at fault (file, key, field).
The crash tests kill saving processes with SIGKILL (each subprocess under a timeout) and load what is left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import optkit
from optkit.checkpoint_files import STAGING_PREFIX, inside, read_safetensors
from optkit.checkpoints import _shard, save_pretrained, spec_from_hf_config
from optkit.errors import CheckpointError
from optkit.formats.opt import CONFIG_TYPES as OPT_CONFIG_TYPES

# generation_config.json is not among them: it belongs to the weights (a save replaces it, as transformers' does)
USER_FILES = {"README.md": "# my model\n", "notes.txt": "keep me\n", "tokenizer.json": "{}",
              "extra/eval.md": "results\n"}
TIMEOUT = 240  # seconds, per subprocess


def tiny(seed: int, dropout: float = 0.1):
    """opt-tiny with its own weights; the dropout tells two configs apart."""
    spec = optkit.load_spec("opt-tiny").to_dict()
    spec["decoder"]["dropout"] = dropout
    torch.manual_seed(seed)
    return optkit.build(spec)


def same(a, b) -> bool:
    """Same config (dropout) and bit-identical weights."""
    sa, sb = a.state_dict(), b.state_dict()
    return (a.spec.decoder.dropout == b.spec.decoder.dropout and sa.keys() == sb.keys()
            and all(torch.equal(sa[k], sb[k]) for k in sa))


def write_user_files(directory: Path) -> None:
    for name, text in USER_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def assert_user_files(directory: Path) -> None:
    for name, text in USER_FILES.items():
        assert (directory / name).read_text() == text, name


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def shard_bytes_for(model, shards: int) -> int:
    """A max_shard_bytes that splits this model into exactly ``shards`` files (a tied head is saved once)."""
    tensors = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    for limit in range(20_000, 1_000_000, 1_000):
        if len(_shard(tensors, limit)) == shards:
            return limit
    raise AssertionError(f"no shard size gives {shards} shards")


def saved(tmp_path: Path, name: str = "ckpt", seed: int = 1, **kwargs) -> Path:
    return save_pretrained(tiny(seed), tmp_path / name, **kwargs)


# == 1. saves never mix or shadow weights ===============================================================
def _old_layouts(directory: Path, old, layout: str) -> None:
    """The earlier save, in each layout a loader reads."""
    state = {k: v.contiguous() for k, v in load_file(str(save_pretrained(old, directory / "_src") / "model.safetensors"
                                                            )).items()}
    shutil.copy(directory / "_src" / "config.json", directory / "config.json")
    shutil.rmtree(directory / "_src")
    keys = sorted(state)
    halves = {"00001": keys[:20], "00002": keys[20:]}
    if layout == "safetensors-sharded":
        save_pretrained(old, directory, max_shard_bytes=100_000)
    elif layout == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif layout == "bin-sharded":
        weight_map = {}
        for number, part in halves.items():
            name = f"pytorch_model-{number}-of-00002.bin"
            torch.save({k: state[k] for k in part}, directory / name)
            weight_map.update({k: name for k in part})
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_pretrained(old, directory)


@pytest.mark.parametrize("new_shards", [1, 3])
@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin", "bin-sharded", "single"])
def test_a_save_replaces_every_weight_file_of_the_earlier_save(tmp_path, layout, new_shards):
    old, new = tiny(1, 0.1), tiny(2, 0.2)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    _old_layouts(directory, old, layout)
    write_user_files(directory)
    assert same(optkit.from_pretrained(directory), old)
    save_pretrained(new, directory, max_shard_bytes=shard_bytes_for(new, new_shards))
    assert same(optkit.from_pretrained(directory), new)  # the new save is what loads
    expected = {"config.json", *USER_FILES}
    expected |= {"model.safetensors"} if new_shards == 1 else {
        "model.safetensors.index.json", *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))}
    assert set(snapshot(directory)) == expected  # nothing of the earlier save is left; the user's files are
    assert_user_files(directory)


def test_a_save_never_touches_files_an_earlier_index_names_outside_its_weights(tmp_path):
    directory = saved(tmp_path, max_shard_bytes=150_000)
    (tmp_path / "outside.safetensors").write_bytes(b"not mine to delete")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"].update({"x": "notes.txt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    write_user_files(directory)
    save_pretrained(tiny(2), directory)
    assert_user_files(directory)  # notes.txt stays although the old index listed it
    index["weight_map"].update({"y": "../outside.safetensors"})
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    save_pretrained(tiny(3), directory)
    assert (tmp_path / "outside.safetensors").read_bytes() == b"not mine to delete"
    assert_user_files(directory)


def test_transformers_reads_the_replacing_save(tmp_path):
    transformers = pytest.importorskip("transformers")
    old, new = tiny(1), tiny(2)
    directory = save_pretrained(old, tmp_path / "ckpt", max_shard_bytes=100_000)
    save_pretrained(new, directory)
    hf = transformers.OPTForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(3, 512, (1, 9))
    with torch.no_grad():
        assert (hf(ids).logits - new.eval()(ids).logits).abs().max() <= 1e-5


# -- killed saves (SIGKILL) --------------------------------------------------------------------------
CRASH_SCRIPT = r'''
import json, os, random, shutil, signal, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import optkit, safetensors.torch
from optkit.checkpoints import save_pretrained

root, mode, old_bytes, new_bytes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
user_files = json.loads(sys.argv[5])

def tiny(seed, dropout):
    spec = optkit.load_spec("opt-tiny").to_dict()
    spec["decoder"]["dropout"] = dropout
    torch.manual_seed(seed)
    return optkit.build(spec)

old, new = tiny(1, 0.1), tiny(2, 0.2)
save_pretrained(old, root / "old", max_shard_bytes=old_bytes)
save_pretrained(new, root / "new", max_shard_bytes=new_bytes)

def fresh(target):
    shutil.copytree(root / "old", target)
    for name, text in user_files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)

def instrument(kill_at):
    """SIGKILL this process at its kill_at-th file-system step (a write is cut in half first)."""
    count = [0]
    def step(partial=None):
        count[0] += 1
        if count[0] == kill_at:
            if partial:
                partial()
            os.kill(os.getpid(), signal.SIGKILL)
    for name in ("replace", "rename", "unlink", "rmdir", "mkdir", "fsync"):
        real = getattr(os, name)
        setattr(os, name, lambda *a, _real=real, **k: (step(), _real(*a, **k))[1])
    real_save = safetensors.torch.save_file
    def save_file(tensors, path, metadata=None):
        def half():
            real_save(tensors, path, metadata=metadata)
            os.truncate(path, os.path.getsize(path) // 2)
        step(half)
        return real_save(tensors, path, metadata=metadata)
    safetensors.torch.save_file = save_file
    real_write = Path.write_text
    def write_text(self, data, *a, **k):
        step(lambda: real_write(self, data[: len(data) // 2]))
        return real_write(self, data, *a, **k)
    Path.write_text = write_text

def wait(pid, seconds=60):
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            sys.exit("a saving child hung")
        time.sleep(0.002)

runs = []
if mode == "every-step":
    for kill_at in range(1, 1000):
        target = root / f"kill-{kill_at:03d}"
        fresh(target)
        pid = os.fork()
        if pid == 0:
            instrument(kill_at)
            save_pretrained(new, target, max_shard_bytes=new_bytes)
            os._exit(0)
        status = wait(pid)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if not killed and os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"saving child failed at step {kill_at}: {status}")
        runs.append({"dir": str(target), "killed": killed})
        if not killed:
            break
else:  # "random-time": an outside SIGKILL at arbitrary instants of saves that alternate old and new
    rng = random.Random(13)
    target = root / "alternating"
    fresh(target)
    for number in range(8):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.write(write, b"go")
            for i in range(10_000):
                save_pretrained(new if i % 2 == 0 else old, target, max_shard_bytes=(new_bytes, old_bytes)[i % 2])
            os._exit(0)
        os.close(write)
        os.read(read, 2)
        os.close(read)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        wait(pid)
        shutil.copytree(target, root / f"snapshot-{number}", symlinks=True)
        runs.append({"dir": str(root / f"snapshot-{number}"), "killed": True})
print(json.dumps(runs))
'''


def run_crash_script(tmp_path: Path, mode: str, old_bytes: int, new_bytes: int) -> list[dict]:
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), mode, str(old_bytes), str(new_bytes),
                             json.dumps(USER_FILES)], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def outcome(directory: Path, old, new) -> str:
    """'old' or 'new' when the directory loads one of them whole, 'refused' when it fails clearly."""
    try:
        loaded = optkit.from_pretrained(directory)
    except CheckpointError as exc:
        assert "interrupted" in str(exc) and str(directory) in str(exc), str(exc)
        return "refused"
    if same(loaded, old):
        return "old"
    assert same(loaded, new), f"{directory} loads a mix of the old and the new checkpoint"
    return "new"


@pytest.mark.parametrize("old_bytes,new_bytes", [(150_000, 150_000), (150_000, 10**9), (10**9, 150_000)],
                         ids=["sharded-to-same-shard-names", "sharded-to-single", "single-to-sharded"])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, old_bytes, new_bytes):
    runs = run_crash_script(tmp_path, "every-step", old_bytes, new_bytes)
    old, new = optkit.from_pretrained(tmp_path / "old"), optkit.from_pretrained(tmp_path / "new")
    outcomes = []
    for run in runs:
        directory = Path(run["dir"])
        assert_user_files(directory)
        outcomes.append(outcome(directory, old, new))
        save_pretrained(new, directory, max_shard_bytes=new_bytes)  # the next save cleans up after the killed one
        assert set(snapshot(directory)) == set(snapshot(tmp_path / "new")) | set(USER_FILES)
        assert not [p for p in directory.iterdir() if p.name.startswith((STAGING_PREFIX, "."))]
    assert [run["killed"] for run in runs] == [True] * (len(runs) - 1) + [False]
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "refused" in outcomes
    first_new = outcomes.index("new")  # old ... (refused ...) new ...: never back
    assert set(outcomes[:first_new]) <= {"old", "refused"} and set(outcomes[first_new:]) == {"new"}


def test_saves_killed_at_random_instants_leave_a_whole_checkpoint(tmp_path):
    runs = run_crash_script(tmp_path, "random-time", 150_000, 10**9)
    old, new = optkit.from_pretrained(tmp_path / "old"), optkit.from_pretrained(tmp_path / "new")
    for run in runs:
        assert_user_files(Path(run["dir"]))
        outcome(Path(run["dir"]), old, new)


# -- disk full and other write errors ------------------------------------------------------------------
@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_disk_full_on_the_4th_of_8_shards_keeps_the_old_checkpoint_and_names_the_file(tmp_path, monkeypatch, failing):
    old, new = tiny(1), tiny(2)
    eight = shard_bytes_for(new, 8)
    directory = save_pretrained(old, tmp_path / "ckpt", max_shard_bytes=shard_bytes_for(old, 3))
    write_user_files(directory)
    before = snapshot(directory)
    calls = []

    def full_disk_on_4th(real):
        def wrapper(*args, **kwargs):
            calls.append(args)
            if len(calls) == 4:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return wrapper

    import safetensors.torch

    if failing == "write":
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk_on_4th(safetensors.torch.save_file))
    else:
        monkeypatch.setattr(os, "fsync", full_disk_on_4th(os.fsync))
    with pytest.raises(CheckpointError) as info:
        save_pretrained(new, directory, max_shard_bytes=eight)
    message = str(info.value)
    assert str(directory / "model-00004-of-00008.safetensors") in message and "No space left on device" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(directory) == before  # byte for byte; no temporary file left behind
    assert same(optkit.from_pretrained(directory), old)


FILE_TOO_LARGE_SCRIPT = r'''
import resource, sys, torch
torch.set_num_threads(1)
import optkit
from optkit.errors import CheckpointError
torch.manual_seed(2)
model = optkit.build("opt-tiny")
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # writes past 100 kB fail: EFBIG, as on a full quota
try:
    model.save_pretrained(sys.argv[1])
except CheckpointError as exc:
    print(exc)
else:
    sys.exit("the save did not fail")
'''


def test_a_real_file_too_large_error_names_the_file_and_keeps_the_old_checkpoint(tmp_path):
    old = tiny(1)
    directory = save_pretrained(old, tmp_path / "ckpt")
    before = snapshot(directory)
    result = subprocess.run([sys.executable, "-c", FILE_TOO_LARGE_SCRIPT, str(directory)], capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"cannot write {directory / 'model.safetensors'}" in result.stdout and "File too large" in result.stdout
    assert snapshot(directory) == before
    assert same(optkit.from_pretrained(directory), old)


def test_a_rename_failing_mid_swap_is_undone(tmp_path, monkeypatch):
    old, new = tiny(1), tiny(2)
    directory = save_pretrained(old, tmp_path / "ckpt", max_shard_bytes=150_000)
    write_user_files(directory)
    before = snapshot(directory)
    real = os.replace
    failures = 0
    for fail_at in range(1, 100):
        calls: list = []

        def replace(src, dst, *args, fail_at=fail_at, calls=calls, **kwargs):
            calls.append(dst)
            if len(calls) == fail_at:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        try:
            save_pretrained(new, directory, max_shard_bytes=100_000)
        except CheckpointError as exc:
            failures += 1
            assert "Permission denied" in str(exc) and f"cannot move {directory}" in str(exc)
            assert snapshot(directory) == before, fail_at
        else:
            break
        finally:
            monkeypatch.setattr(os, "replace", real)
    assert failures == len(calls) >= 8  # every rename of a save (old files out, new ones in) failed once
    assert same(optkit.from_pretrained(directory), new)


def test_saving_into_a_file_path_names_it(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=f"cannot create the checkpoint directory {tmp_path / 'file'}"):
        save_pretrained(tiny(1), tmp_path / "file")


def test_leftovers_of_a_killed_save_are_never_loaded_and_the_next_save_removes_them(tmp_path):
    old, new = tiny(1), tiny(2)
    directory = save_pretrained(old, tmp_path / "ckpt")
    leftover = directory / f"{STAGING_PREFIX}999999-deadbeef"
    save_pretrained(new, leftover)  # a complete but uncommitted save
    (directory / ".model.safetensors.a1b2c3d4.tmp").write_bytes(b"half a file")  # optkit < 0.2's temp files
    assert same(optkit.from_pretrained(directory), old)
    save_pretrained(new, directory)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]


def test_an_interrupted_save_is_named_when_the_directory_does_not_load(tmp_path):
    directory = tmp_path / "ckpt"
    (directory / f"{STAGING_PREFIX}4242-cafe" / "previous").mkdir(parents=True)
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    assert f"{directory} has no config.json" in str(info.value)
    assert f"save into this directory was interrupted ({STAGING_PREFIX}4242-cafe" in str(info.value)


def test_two_concurrent_saves_into_one_directory_do_not_mix(tmp_path):
    a, b = tiny(1, 0.1), tiny(2, 0.2)
    directory = save_pretrained(a, tmp_path / "ckpt")
    errors = []

    def save(model, shard_bytes):
        try:
            for _ in range(5):
                save_pretrained(model, directory, max_shard_bytes=shard_bytes)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(a, 100_000)), threading.Thread(target=save, args=(b, 10**9))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    assert not errors
    loaded = optkit.from_pretrained(directory)
    assert same(loaded, a) or same(loaded, b)


def test_a_load_during_saves_sees_one_whole_checkpoint(tmp_path):
    a, b = tiny(1, 0.1), tiny(2, 0.2)
    directory = save_pretrained(a, tmp_path / "ckpt", max_shard_bytes=100_000)
    stop, errors = threading.Event(), []

    def save_alternately():
        try:
            while not stop.is_set():
                save_pretrained(b, directory)
                save_pretrained(a, directory, max_shard_bytes=100_000)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    saver = threading.Thread(target=save_alternately)
    saver.start()
    try:
        loads = [optkit.from_pretrained(directory) for _ in range(6)]  # never refused, never a mix
    finally:
        stop.set()
        saver.join(timeout=TIMEOUT)
    assert not errors and all(same(m, a) or same(m, b) for m in loads)


# == 2. loading is contained and strict =================================================================
def sharded(tmp_path: Path) -> Path:
    return save_pretrained(tiny(1), tmp_path / "ckpt", max_shard_bytes=150_000)


def rewrite_index(directory: Path, change) -> dict:
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))
    return index


@pytest.mark.parametrize("outside", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors",
                                     f"{STAGING_PREFIX}1-ab/model.safetensors"])
def test_an_index_naming_a_file_outside_the_directory_is_refused(tmp_path, outside):
    directory = sharded(tmp_path)
    key = "model.decoder.final_layer_norm.weight"
    save_file({key: torch.ones(64)}, str(tmp_path / "outside.safetensors"))
    rewrite_index(directory, lambda weight_map: weight_map.update({key: outside}))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    message = str(info.value)
    assert str(directory / "model.safetensors.index.json") in message and repr(outside) in message
    assert "leaves the checkpoint directory" in message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("ab./\\:~C") + ["..", STAGING_PREFIX]), max_size=10).map("".join))
def test_a_name_counted_inside_stays_inside(name):
    root = "/ckpt/dir"
    if inside(name):
        resolved = os.path.normpath(os.path.join(root, name.replace("\\", "/")))
        assert resolved.startswith(root + "/") and not resolved[len(root) + 1:].startswith(STAGING_PREFIX)


def test_a_tensor_stored_in_two_shards_is_refused_by_its_name(tmp_path):
    directory = sharded(tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    key = next(k for k, v in index["weight_map"].items() if v == first)
    extra = load_file(str(directory / second))
    extra[key] = torch.zeros(1)
    save_file(extra, str(directory / second))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    assert f"tensor '{key}' is stored twice, in {first} and in {second}" in str(info.value)


def test_shards_that_disagree_with_their_index_are_refused(tmp_path):
    directory = sharded(tmp_path)
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    first, second = [name for name in sorted(set(weight_map.values())) if list(weight_map.values()).count(name) > 1][:2]
    key = next(k for k, v in weight_map.items() if v == first)
    rewrite_index(directory, lambda weight_map: weight_map.update({key: second, "model.decoder.ghost": second}))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    message = str(info.value)
    assert str(directory / "model.safetensors.index.json") in message and "does not match its shard files" in message
    assert f"'{key}' is in {first}, but the index lists it in '{second}'" in message
    assert f"'model.decoder.ghost' is listed in '{second}', which has no such tensor" in message


def test_the_same_tensor_with_and_without_the_model_prefix_is_refused(tmp_path):
    directory = saved(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    state["decoder.final_layer_norm.bias"] = state["model.decoder.final_layer_norm.bias"].clone()
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'decoder.final_layer_norm.bias' and "
                                              "'model.decoder.final_layer_norm.bias' are the same tensor"):
        optkit.from_pretrained(directory)


def test_a_misshaped_lm_head_in_a_tied_checkpoint_is_refused(tmp_path):
    directory = saved(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    state["lm_head.weight"] = torch.zeros(512, 32)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mis-shaped \(1\): lm_head.weight \(checkpoint \[512, 32\], "
                                              r"model \[512, 64\]\)"):
        optkit.from_pretrained(directory)
    state["lm_head.weight"] = torch.zeros(512, 64)  # the right shape but other values: ambiguous, refused
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.decoder.embed_tokens.weight"):
        optkit.from_pretrained(directory)
    state["lm_head.weight"] = state["model.decoder.embed_tokens.weight"].clone()  # a copy of the embedding loads
    save_file(state, str(directory / "model.safetensors"))
    assert optkit.from_pretrained(directory).head.weight.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_or_bool_tensors_where_floats_belong_are_refused_by_name(tmp_path, dtype):
    directory = saved(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    key = "model.decoder.layers.1.fc2.weight"
    state[key] = torch.ones(64, 128, dtype=dtype)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    assert f"not floating point (1): {key} ({str(dtype).removeprefix('torch.')}" in str(info.value)


def _safetensors_damage(data: bytes) -> dict[str, bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10**9]
    bad_offsets = json.dumps(header).encode()
    return {"truncated": data[: len(data) - 100], "empty": b"",
            "bad header": data[:8] + b"{" * length + data[8 + length:],
            "absurd header length": struct.pack("<Q", 2**62) + data[8:],
            "offsets past the end": struct.pack("<Q", len(bad_offsets)) + bad_offsets + data[8 + length:]}


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad header", "absurd header length", "offsets past the end"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_corrupt_safetensors_file_is_named(tmp_path, damage, layout):
    directory = sharded(tmp_path) if layout == "sharded" else saved(tmp_path)
    file = sorted(directory.glob("*.safetensors"))[-1]
    file.write_bytes(_safetensors_damage(file.read_bytes())[damage])
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    assert f"{file} is not a readable safetensors file" in str(info.value)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_any_damage_to_a_safetensors_file_loads_or_names_the_file(tmp_path_factory, cut, flips):
    directory = tmp_path_factory.mktemp("fuzz")
    file = directory / "model.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}, str(file))
    data = bytearray(file.read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    file.write_bytes(bytes(data[: len(data) - cut % len(data)] if cut else data))
    try:
        tensors = read_safetensors(file)
    except CheckpointError as exc:
        assert f"{file} is not a readable safetensors file" in str(exc)
    else:
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def _bin_directory(tmp_path: Path, content) -> Path:
    directory = saved(tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    path = directory / "pytorch_model.bin"
    if callable(content):
        content(state, path)
    else:
        path.write_bytes(content)
    return directory


@pytest.mark.parametrize("content,expected", [
    (b"", "is not a torch.save zip archive (it is empty, truncated or corrupt)"),
    (b"garbage" * 10, "is not a torch.save zip archive"),
    (lambda state, path: (torch.save(state, path), path.write_bytes(path.read_bytes()[:-300])),
     "is not a torch.save zip archive"),
    (lambda state, path: torch.save({"state_dict": state}, path), "entry 'state_dict' is a dict, not a tensor"),
], ids=["empty", "garbage", "truncated", "nested"])
def test_a_corrupt_bin_file_is_named(tmp_path, content, expected):
    directory = _bin_directory(tmp_path, content)
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    assert str(directory / "pytorch_model.bin") in str(info.value) and expected in str(info.value)


def test_a_legacy_torch_save_file_is_refused_with_how_to_convert(tmp_path):
    directory = _bin_directory(tmp_path, lambda state, path: torch.save(state, path,
                                                                        _use_new_zipfile_serialization=False))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    message = str(info.value)
    assert f"{directory / 'pytorch_model.bin'} is in torch.save's legacy format" in message
    assert "torch.save(torch.load(p, weights_only=True), p)" in message and "unpickle" not in message
    command = message.split('python -c "')[1].split('"')[0]  # the conversion it suggests works
    subprocess.run([sys.executable, "-c", command], cwd=directory, check=True, timeout=TIMEOUT)
    assert optkit.from_pretrained(directory).spec.decoder.hidden_size == 64


BAD_JSON = {"invalid": (b'{"model_type": "opt",', "is not valid JSON (Expecting property name enclosed in double "
                                                   "quotes at line 1 column 22)"),
            "empty": (b"  \n", "is empty"),
            "a list": (b'["opt"]', "holds a JSON list"),
            "not UTF-8": ('{"model_type": "opt", "x": "é"}'.encode("latin-1"), "is not UTF-8 text (byte 0xe9")}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
@pytest.mark.parametrize("name, checkpoint", [("config.json", saved), ("model.safetensors.index.json", sharded)],
                         ids=["config", "index"])
def test_a_bad_json_file_is_named(tmp_path, case, name, checkpoint):
    directory = checkpoint(tmp_path)
    content, expected = BAD_JSON[case]
    (directory / name).write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    assert f"{directory / name} {expected}" in str(info.value)


@pytest.mark.parametrize("index,expected", [
    ({}, "field 'weight_map' must be a non-empty object"),
    ({"weight_map": ["model-00001-of-00003.safetensors"]}, "field 'weight_map' must be a non-empty object"),
    ({"weight_map": {"model.decoder.final_layer_norm.bias": 3}}, "weight_map['model.decoder.final_layer_norm.bias'] "
                                                                 "must be a shard file name, got 3"),
])
def test_an_index_with_wrong_types_names_the_field(tmp_path, index, expected):
    directory = sharded(tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    assert f"{directory / 'model.safetensors.index.json'}: {expected}" in str(info.value)


@pytest.mark.parametrize("field,value,expected", [
    ("hidden_size", "64", "field 'hidden_size' must be an integer, got \"64\""),
    ("num_hidden_layers", 2.0, "field 'num_hidden_layers' must be an integer, got 2.0"),
    ("do_layer_norm_before", "yes", "field 'do_layer_norm_before' must be true or false, got \"yes\""),
    ("tie_word_embeddings", 0, "field 'tie_word_embeddings' must be true or false, got 0"),
    ("dropout", True, "field 'dropout' must be a number, got true"),
    ("pad_token_id", [1], "field 'pad_token_id' must be an integer or null, got [1]"),
    ("model_type", ["opt"], "model_type is ['opt']; optkit loads"),
])
def test_config_fields_of_the_wrong_type_are_named(tmp_path, field, value, expected):
    directory = saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    assert f"{directory / 'config.json'}: {expected}" in str(info.value)


WRONG_KIND = {int: st.one_of(st.text(max_size=5), st.booleans(), st.floats(allow_nan=False)),
              float: st.one_of(st.text(max_size=5), st.booleans(), st.none()),
              bool: st.one_of(st.text(max_size=5), st.integers(), st.none()),
              str: st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=2))}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), field=st.sampled_from(sorted(OPT_CONFIG_TYPES)))
def test_any_wrongly_typed_opt_field_is_refused_by_name(data, field):
    kinds = OPT_CONFIG_TYPES[field]
    value = data.draw(WRONG_KIND[kinds[0]].filter(lambda v: not (v is None and None in kinds)))
    with pytest.raises(CheckpointError, match=f"config.json: .*field '{field}' must be"):
        spec_from_hf_config({"model_type": "opt", field: value}, source="ckpt/config.json")


def test_open_llama_config_fields_of_the_wrong_type_are_named():
    with pytest.raises(CheckpointError, match="field 'use_stable_embedding' must be true or false, got \"no\""):
        spec_from_hf_config({"model_type": "open-llama", "use_stable_embedding": "no"}, source="config.json")


@pytest.mark.parametrize("field,value", [("torch_dtype", "float99"), ("torch_dtype", "Tensor"), ("torch_dtype", 16),
                                         ("torch_dtype", "int8"), ("dtype", "complex64")])
def test_a_bad_torch_dtype_with_dtype_auto_is_named(tmp_path, field, value):
    directory = saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.pop("torch_dtype")
    (directory / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory, dtype="auto")
    assert f"{directory / 'config.json'}: field '{field}' is {value!r}, not a floating-point dtype" in str(info.value)
    assert optkit.from_pretrained(directory).dtype == torch.float32  # without "auto" the field is not used


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_mismatches_are_named_as_the_file_names_them(tmp_path, prefix):
    directory = saved(tmp_path)
    state = {k.removeprefix("model.") if not prefix else k: v
             for k, v in load_file(str(directory / "model.safetensors")).items()}
    del state[f"{prefix}decoder.layers.1.fc2.weight"]
    state[f"{prefix}decoder.layers.0.fc1.weight"] = torch.zeros(3, 3)
    state[f"{prefix}decoder.layers.0.mlp.extra"] = torch.zeros(1)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    message = str(info.value)
    assert f"missing (1): {prefix}decoder.layers.1.fc2.weight" in message
    assert f"unexpected (1): {prefix}decoder.layers.0.mlp.extra" in message
    assert f"mis-shaped (1): {prefix}decoder.layers.0.fc1.weight (checkpoint [3, 3], model [128, 64])" in message
    assert ".mlp.fc" not in message  # optkit's module paths never show


def test_pickle_payloads_are_still_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("ran",))

    directory = _bin_directory(tmp_path, lambda state, path: torch.save({**state, "x": Exploit()}, path))
    with pytest.raises(CheckpointError, match=f"cannot read {directory / 'pytorch_model.bin'} with weights_only=True"):
        optkit.from_pretrained(directory)
