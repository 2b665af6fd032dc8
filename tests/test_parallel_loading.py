"""Slice-wise loading: ``from_pretrained(path, tp_size=2)`` in two gloo processes reads only each rank's slices.

Two processes are spawned once (deadline, free port, group torn down). Each loads every checkpoint with
``tp_size=2`` and reports its outputs, the bytes the loader read (the reader instrumented), its parameter
bytes and, for a larger model, how far its peak resident set (VmHWM) grew while loading. The tests compare
with the same checkpoint loaded plainly in this process.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

import optkit
import optkit.parallel.loading as sliced
from optkit.parallel import local_parameter_bytes, planned_parameter_bytes
from optkit.parallel.loading import rank_slice
from tests.helpers.ranks import spawn_ranks

WORLD = 2
DEADLINE_S = 150
CHECKPOINTS: dict[str, Any] = {
    "opt-tiny": {"spec": "opt-tiny"},
    "opt-tiny-350m-style": {"spec": "opt-tiny-350m-style"},
    "opt-tiny-no-bias": {"spec": {"extends": "opt-tiny", "decoder": {"bias": False}}},
    "open-llama-tiny-v2-style": {"spec": "open-llama-tiny-v2-style"},
    "opt-tiny-fp16-file": {"spec": "opt-tiny", "dtype": torch.float16},  # read as fp16, landed as fp32
    "opt-tiny-classifier": {"spec": "opt-tiny", "head": "sequence_classification"},  # fresh head: rank 0's
}
# Large enough that the weights dominate the resident set: 8 layers of width 512, FFN 4096 (~180 MB fp32).
WIDE = {"extends": "opt-tiny", "decoder": {"hidden_size": 512, "ffn_dim": 4096, "num_layers": 8, "num_heads": 8,
                                           "vocab_size": 8192}}


def write_checkpoints(root: Path) -> None:
    for name, case in CHECKPOINTS.items():
        torch.manual_seed(0)
        optkit.build(case["spec"], dtype=case.get("dtype", torch.float32)).save_pretrained(root / name)
    torch.manual_seed(0)
    optkit.build(WIDE).save_pretrained(root / "wide")


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def outputs(model: optkit.Model) -> dict[str, Any]:
    ids, mask = prompt()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    result = {"logits": out.logits}
    if model.spec.head.name == "causal_lm":
        result["greedy"] = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    return result


# -- the ranks -------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Make VmHWM start again from the current resident set (Linux: 5 > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _counting_reader(counter: dict[str, int]):
    original = sliced.read_local

    def read_local(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        local = original(*args, **kwargs)
        counter["bytes"] += sum(t.numel() * t.element_size() for t in local.values())
        return local

    return read_local


def _load_every_checkpoint(root: Path) -> dict[str, Any]:
    """One rank: every checkpoint loaded split, what it read and holds, and how far loading the wide one grew
    the resident set."""
    results: dict[str, Any] = {}
    counter = {"bytes": 0}
    sliced.read_local = _counting_reader(counter)
    for name, case in CHECKPOINTS.items():
        counter["bytes"] = 0
        model = optkit.from_pretrained(root / name, tp_size=WORLD, head=case.get("head", "causal_lm"))
        results[name] = {**outputs(model), "read": counter["bytes"], "bytes": local_parameter_bytes(model),
                         "fc1": model.decoder.layers[0].mlp.fc1.weight.to_local().clone()
                         if name == "opt-tiny" else None}
    del model
    _reset_peak()
    before = _status_bytes("VmRSS")
    wide = optkit.from_pretrained(root / "wide", tp_size=WORLD)
    results["wide"] = {"growth": _status_bytes("VmHWM") - before, "bytes": local_parameter_bytes(wide),
                       "split": sum(isinstance(p, DTensor) for p in wide.parameters())}
    return results


PHASES = {"load": (WORLD, _load_every_checkpoint)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp-load")
    write_checkpoints(path)
    return path


@pytest.fixture(scope="module")
def ranks(root) -> list[dict[str, Any]]:
    return spawn_ranks(__name__, "load", root, deadline_s=DEADLINE_S, label="tensor-parallel loading", tensors=True)


@pytest.fixture(scope="module")
def single(root) -> dict[str, optkit.Model]:
    return {name: optkit.from_pretrained(root / name, head=case.get("head", "causal_lm"))
            for name, case in CHECKPOINTS.items()}


# -- the tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_sliced_loading_gives_the_outputs_of_one_process(ranks, single, root, name):
    want = outputs(single[name])
    for rank in ranks:
        got = rank[name]
        if CHECKPOINTS[name].get("head") is None:  # a fresh head is random: equal across ranks, not to here
            assert (got["logits"] - want["logits"]).abs().max() <= 1e-5 * want["logits"].abs().max()
            assert torch.equal(got["greedy"], want["greedy"])
        else:
            assert torch.equal(got["logits"], ranks[0][name]["logits"])


def test_each_rank_holds_its_own_slice(ranks, single):
    full = single["opt-tiny"].decoder.layers[0].mlp.fc1.weight.detach()
    for number, rank in enumerate(ranks):
        assert torch.equal(rank["opt-tiny"]["fc1"], full[rank_slice(full.shape, 0, number, WORLD)])


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_each_rank_reads_and_holds_only_its_share(ranks, single, name):
    model = single[name]
    share = planned_parameter_bytes(optkit.build(model.spec, device="meta"), WORLD)
    whole = sum(p.numel() * 4 for p in model.parameters())
    for rank in ranks:
        assert abs(rank[name]["bytes"] - share) <= 0.05 * share
        # the reader returned this rank's slices and the replicated tensors (a tied table once), nothing more
        assert rank[name]["read"] <= 1.05 * share < 0.75 * whole


def test_peak_resident_memory_grows_by_about_the_share_while_loading(ranks, root):
    checkpoint = sum(f.stat().st_size for f in (root / "wide").glob("*.safetensors"))
    for rank in ranks:
        assert rank["wide"]["split"] > 0
        assert rank["wide"]["bytes"] < 0.52 * checkpoint
        # loading the whole checkpoint and splitting afterwards would grow by >= the checkpoint's size
        assert rank["wide"]["growth"] < 0.7 * checkpoint, (rank["wide"]["growth"], checkpoint)


def test_outside_a_process_group_nothing_is_read_and_the_error_gives_the_command(root, monkeypatch):
    monkeypatch.setattr(sliced, "read_local", lambda *a, **k: pytest.fail("read before the group was checked"))
    with pytest.raises(optkit.InputError, match="needs a process group: launch with torchrun --standalone "
                                                "--nproc-per-node 2 "):
        optkit.from_pretrained(root / "opt-tiny", tp_size=2)


def test_a_size_that_does_not_divide_is_refused_before_loading(root):
    with pytest.raises(optkit.InputError, match="tp_size 3 does not divide the 4 attention heads.*valid tp_size "
                                                "for this model: 1, 2, 4"):
        optkit.from_pretrained(root / "opt-tiny", tp_size=3)


# -- optkit run under torchrun -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    from tests.helpers import make_text_model_dir

    return make_text_model_dir(tmp_path_factory.mktemp("text-model"))


RUN_ARGS = ("--max-new-tokens", "8", "--do-sample", "--top-k", "0", "--temperature", "1.3", "--seed", "11")


def _optkit_run(*launcher: str, model: Path, stdin: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "optkit.cli", "run", "--model", str(model), *RUN_ARGS],
                          input=stdin, capture_output=True, text=True, timeout=150, env=env)


def test_optkit_run_under_torchrun_prints_once_what_one_process_prints(text_model, capsys, monkeypatch):
    from optkit.cli import main

    prompts = "Hello world\nthe quick brown fox\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(prompts.encode())))
    assert main(["run", "--model", str(text_model), *RUN_ARGS]) == 0
    single = capsys.readouterr().out
    split = _optkit_run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        model=text_model, stdin=prompts)
    assert split.returncode == 0, split.stderr[-2000:]
    assert len(single.splitlines()) == 2
    assert split.stdout == single  # rank 0 alone printed; the seed and prompts came from it


def test_tp_size_outside_torchrun_names_the_command(text_model, capsys, monkeypatch):
    from optkit.cli import main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--model", str(text_model), "--prompt", "Hello", "--tp-size", "2"]) == 2
    error = capsys.readouterr().err
    assert "InputError" not in error and "--tp-size 2" in error
    assert "torchrun --standalone --nproc-per-node 2 -m optkit.cli run --tp-size 2" in error
