"""FSDP2 training (optkit.parallel.fsdp) in real gloo processes on CPU, against single-process training.

Three phases, each with a free port and its group torn down: a 1-rank group in this process trains and
is interrupted (for 1 -> 2 resume); 2 spawned ranks (with a deadline, so a hang fails the test, not the CI
job) train straight, are interrupted and resume, resume the 1-rank checkpoint, train with gradient
checkpointing and with bf16; a 1-rank group here resumes a 2-rank checkpoint. A torchrun subprocess runs
``optkit train``. This process also trains the same settings plainly and compares: losses within 1e-5, a
resume bit-identical, the exported checkpoint equal in transformers.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
from optkit import training
from optkit.adapters import add_adapters
from optkit.cli import main as cli_main
from optkit.errors import CheckpointError, InputError
from optkit.parallel import export_checkpoint, shard_for_training
from optkit.parallel.fsdp import LATEST, SHARDED_DIR, ShardedTraining, sharded_training
from optkit.testing.tensor_parallel import free_port
from tests.helpers.ranks import spawn_ranks
from tests.helpers.tiny_training import PROBE, documents, llama_spec, spec, tokenizer, torchrun_train


DEADLINE_S = 150  # one launch, every rank
RUN = dict(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=3, eval_fraction=0.25,
           log_every=1000, weight_decay=0.1, resume=True)
TOL = 1e-5


class Interrupted(Exception):
    """Raised in place of a training step to stop a run after its checkpoint (a simulated crash)."""


def train(out: Path, **overrides: Any) -> training.TrainResult:
    model_spec = overrides.pop("spec", None) or spec()
    return training.train(model_spec, documents(), out_dir=out, tokenizer=tokenizer(), **{**RUN, **overrides})


def train_interrupted(out: Path, at_step: int, **overrides: Any) -> None:
    """Train until ``at_step`` starts (RUN saves every 3 steps, so the last checkpoint is step 3)."""
    real = training._train_step

    def crash(*args: Any, **kwargs: Any) -> Any:
        if args[5] == at_step:
            raise Interrupted
        return real(*args, **kwargs)

    training._train_step = crash
    try:
        train(out, **overrides)
    except Interrupted:
        pass
    finally:
        training._train_step = real


def error_text(call: Any) -> str:
    """The message of the InputError ``call`` raises (every rank raises the same), or 'no error'."""
    try:
        call()
    except InputError as exc:
        return str(exc)
    return "no error"


def group_sizes(model: torch.nn.Module) -> list[int]:
    return [len(group["params"]) for group in training.parameter_groups(model, 0.1)]


# -- the ranks ---------------------------------------------------------------------------------------
def _one_rank_first(work: Path) -> dict[str, Any]:
    train_interrupted(work / "one_to_two", at_step=4, fsdp=True)
    return {}


def _two_ranks(work: Path) -> dict[str, Any]:
    rank = dist.get_rank()
    rows: list[list[int]] = []
    real_slice = ShardedTraining.local_batch

    def record(self: ShardedTraining, batch: torch.Tensor, step_seed: int) -> torch.Tensor:
        local = real_slice(self, batch, step_seed)
        rows.append([i for i in range(batch.shape[0]) if any(torch.equal(batch[i], row) for row in local)])
        return local

    ShardedTraining.local_batch = record  # type: ignore[method-assign]
    try:
        straight = train(work / "straight")
    finally:
        ShardedTraining.local_batch = real_slice  # type: ignore[method-assign]
    with torch.no_grad():
        logits = straight.model(PROBE).logits  # every rank runs the sharded forward pass
    train_interrupted(work / "resumed", at_step=4)
    dist.barrier()
    if rank == 0:  # the last 1-rank phase resumes this copy of the step-3 checkpoint
        shutil.copytree(work / "resumed", work / "two_to_one")
    dist.barrier()
    resumed = train(work / "resumed")
    one_to_two = train(work / "one_to_two")
    checkpointed = train(work / "checkpointed", steps=3, gradient_checkpointing=True)
    bf16 = train(work / "bf16", steps=3, mixed_precision="bf16")
    llama = train(work / "llama", steps=3, spec=llama_spec())
    odd = error_text(lambda: train(work / "odd", steps=1, batch_size=3))
    twice = error_text(lambda: shard_for_training(straight.model))
    lora = optkit.build(spec())
    add_adapters(lora, r=2, alpha=4.0)
    adapters = error_text(lambda: training.train(lora, documents(), out_dir=work / "lora", tokenizer=tokenizer(),
                                                 **{**RUN, "steps": 1}))
    return {"twice": twice, "adapters": adapters, "straight": straight.losses, "resumed": resumed.losses,
            "resumed_from": resumed.resumed_from, "one_to_two": one_to_two.losses,
            "one_to_two_from": one_to_two.resumed_from,
            "checkpointed": checkpointed.losses, "bf16": bf16.losses, "odd_batch": odd, "llama": llama.losses,
            "groups": group_sizes(straight.model), "logits": logits.tolist(), f"rows{rank}": rows}


def _one_rank_last(work: Path) -> dict[str, Any]:
    two_to_one = train(work / "two_to_one")  # fsdp=None: one rank, but the out_dir holds a sharded checkpoint
    return {"two_to_one": two_to_one.losses, "two_to_one_from": two_to_one.resumed_from}


PHASES = {"one_rank_first": (1, _one_rank_first), "two_ranks": (2, _two_ranks), "one_rank_last": (1, _one_rank_last)}


def in_this_process(phase: str, work: Path) -> dict[str, Any]:
    """A 1-rank phase here, in a 1-rank gloo group that is always destroyed (no process to start)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        return PHASES[phase][1](work)
    finally:
        dist.destroy_process_group()


def launch(phase: str, work: Path) -> list[dict[str, Any]]:
    """Spawn the phase's ranks (at most DEADLINE_S, never hanging) and return each rank's result."""
    return spawn_ranks(__name__, phase, work, deadline_s=DEADLINE_S, label="FSDP")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def ranks(work: Path) -> dict[str, Any]:
    """Every launch's results; the 2-rank results must agree across ranks (rank 0's are returned)."""
    in_this_process("one_rank_first", work)
    two = launch("two_ranks", work)
    rows = [two[0].pop("rows0"), two[1].pop("rows1")]
    assert two[0] == two[1]
    return {**two[0], "rows": rows, **in_this_process("one_rank_last", work)}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same runs in this process, without a process group (plain training)."""
    root = tmp_path_factory.mktemp("single")
    straight = train(root / "straight")
    return {"straight": straight.losses, "groups": group_sizes(straight.model),
            "checkpointed": train(root / "checkpointed", steps=3, gradient_checkpointing=True).losses,
            "bf16_reference": train(root / "bf16", steps=3).losses,
            "llama": train(root / "llama", steps=3, spec=llama_spec()).losses}


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# -- equality with one process -----------------------------------------------------------------------
def test_two_ranks_train_like_one_process(ranks, single):
    assert max_difference(ranks["straight"], single["straight"]) <= TOL
    assert ranks["rows"] == [[[0, 1]] * RUN["steps"], [[2, 3]] * RUN["steps"]]  # each rank its half of the batch
    assert ranks["straight"][-1] < ranks["straight"][0]  # it learns


def test_open_llama_trains_sharded_like_one_process(ranks, single):
    assert max_difference(ranks["llama"], single["llama"]) <= TOL
    assert ranks["llama"][-1] < ranks["llama"][0]


def test_optimizer_groups_and_gradient_checkpointing_behave_as_in_one_process(ranks, single):
    assert ranks["groups"] == single["groups"]  # decay on matrices only, on the sharded parameters too
    assert max_difference(ranks["checkpointed"], single["checkpointed"]) <= TOL


def test_bf16_mixed_precision_trains_close_to_fp32(ranks, single):
    assert ranks["bf16"] != single["bf16_reference"]  # bf16 compute really happened
    assert max_difference(ranks["bf16"], single["bf16_reference"]) <= 0.05


def test_batch_that_does_not_divide_over_the_ranks_is_refused(ranks):
    assert "batch_size 3" in ranks["odd_batch"] and "multiple of 2" in ranks["odd_batch"]


def test_sharding_twice_and_lora_under_fsdp_are_refused(ranks):
    assert "is already sharded (FSDP or tensor parallel); shard a plain model once" in ranks["twice"]
    assert "LoRA adapters cannot be trained sharded" in ranks["adapters"] and "one process" in ranks["adapters"]


# -- DCP checkpoints ---------------------------------------------------------------------------------
def test_resume_from_a_dcp_checkpoint_is_bit_identical(ranks, work):
    assert ranks["resumed_from"] == 3
    assert ranks["resumed"] == ranks["straight"]  # exact equality, not a tolerance
    root = work / "resumed" / SHARDED_DIR
    assert (root / LATEST).read_text().strip() == "step-00000006"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000006"]  # older ones removed
    assert {p.name for p in (root / "step-00000006").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}


def test_two_rank_checkpoint_resumes_on_one_rank(ranks, single):
    assert ranks["two_to_one_from"] == 3
    assert ranks["two_to_one"][:3] == ranks["straight"][:3]
    assert max_difference(ranks["two_to_one"], single["straight"]) <= TOL


def test_one_rank_checkpoint_resumes_on_two_ranks(ranks, single):
    assert ranks["one_to_two_from"] == 3
    assert max_difference(ranks["one_to_two"], single["straight"]) <= TOL


# -- export ------------------------------------------------------------------------------------------
def test_checkpoint_written_at_the_end_loads_in_transformers_with_equal_logits(ranks, work):
    from transformers import OPTForCausalLM

    hf = OPTForCausalLM.from_pretrained(work / "straight").eval()
    with torch.no_grad():
        hf_logits = hf(PROBE).logits
    assert torch.allclose(hf_logits, torch.tensor(ranks["logits"]), rtol=0, atol=TOL)


def test_optkit_export_writes_the_same_model(ranks, work, capsys):
    out = work / "exported"
    assert cli_main(["export", str(work / "straight"), str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    exported, final = optkit.from_pretrained(out).eval(), optkit.from_pretrained(work / "straight").eval()
    with torch.no_grad():
        assert torch.equal(exported(PROBE).logits, final(PROBE).logits)
    step_dir = work / "straight" / SHARDED_DIR / "step-00000006"
    assert export_checkpoint(step_dir, work / "exported-step") == work / "exported-step"
    assert export_checkpoint(step_dir.parent, work / "exported-dcp") == work / "exported-dcp"
    no_spec = work / "no-spec"
    shutil.copytree(step_dir, no_spec, ignore=shutil.ignore_patterns("spec.json"))
    with pytest.raises(CheckpointError, match="no-spec has no spec.json"):
        export_checkpoint(no_spec, work / "never")


# -- the command line under torchrun -----------------------------------------------------------------
def test_optkit_train_under_torchrun_shards_and_rank_0_alone_prints(tmp_path):
    done = torchrun_train(tmp_path, "--batch-size", "4", "--mixed-precision", "bf16", timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 2") == 1  # rank 0 alone prints
    assert (tmp_path / "run" / SHARDED_DIR / "step-00000002" / "__1_0.distcp").is_file()
    assert optkit.from_pretrained(tmp_path / "run").dtype == torch.float32  # bf16 compute, fp32 master weights


# -- errors (no process group needed) ----------------------------------------------------------------
def test_sharding_outside_a_process_group_names_torchrun():
    with pytest.raises(InputError, match="shard_for_training.*torchrun --standalone --nproc-per-node"):
        shard_for_training(optkit.build(spec()))
    with pytest.raises(InputError, match=r"train\(fsdp=True\).*torchrun"):
        sharded_training(True)
    assert sharded_training(None) is None and sharded_training(False) is None


@settings(max_examples=25, deadline=None)
@given(world=st.integers(1, 8), rows_per_rank=st.integers(1, 4), extra=st.integers(0, 7))
def test_ranks_slices_cover_the_global_batch_in_order(world, rows_per_rank, extra):
    batch = torch.arange(world * rows_per_rank + extra).unsqueeze(1).repeat(1, 3)
    ranks = [ShardedTraining(rank, world) for rank in range(world)]
    if extra % world:
        with pytest.raises(InputError, match=f"batch_size {batch.shape[0]} does not divide over {world} ranks"):
            ranks[0].local_batch(batch, step_seed=1)
        return
    slices = [r.local_batch(batch, step_seed=1) for r in ranks]
    assert all(len(part) == batch.shape[0] // world for part in slices)
    assert torch.equal(torch.cat(slices), batch)


def test_rank_0_keeps_the_single_process_dropout_stream_and_other_ranks_draw_their_own():
    batch = torch.zeros(4, 3, dtype=torch.long)
    draws = []
    for rank in (0, 1, None):
        torch.manual_seed(5)  # what the training step does before slicing
        if rank is not None:
            ShardedTraining(rank, 2).local_batch(batch, step_seed=5)
        draws.append(torch.rand(8))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_plain_training_refuses_to_start_over_beside_a_sharded_checkpoint(tmp_path):
    (tmp_path / SHARDED_DIR).mkdir()
    (tmp_path / SHARDED_DIR / LATEST).write_text("step-00000003\n")
    with pytest.raises(InputError, match="holds a sharded \\(DCP\\) checkpoint.*torchrun.*optkit export.*resume=False"):
        train(tmp_path)
    with pytest.raises(InputError, match="sharded"):
        train(tmp_path, fsdp=False)
    assert train(tmp_path, steps=1, resume=False).step == 1  # starting over is allowed when asked for


def test_unknown_mixed_precision_is_refused():
    with pytest.raises(InputError, match="mixed_precision='fp8'.*'fp32'.*'bf16'"):
        sharded_training(None, "fp8")  # type: ignore[arg-type]


def test_export_of_a_directory_without_dcp_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*holds no DCP checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / SHARDED_DIR).mkdir()
    (tmp_path / SHARDED_DIR / LATEST).write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match="step-00000009, which holds no complete DCP checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "out")
    assert cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) != 0
