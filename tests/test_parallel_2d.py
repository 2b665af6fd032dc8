"""TP x FSDP training on a 2-D ("dp", "tp") mesh, in real gloo processes on CPU, against one process.

Two launches, each with a free port, a deadline and its group torn down: 4 spawned ranks (dp=2 x tp=2)
train a tiny OPT for 3 steps -- a copy of their step-2 DCP checkpoint is taken on the way --, a tiny
Open-Llama with gradient checkpointing for 2, and try the sizes that must be refused; then 2 spawned ranks
resume that copy under 1-D FSDP. This process trains the same runs plainly and compares: losses and
gradient norms within 1e-5 (relative), every rank's loss equal, the exported checkpoint equal in transformers
to the plainly trained model. A torchrun subprocess runs ``optkit train --tp-size 2``.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

import optkit
from optkit import training
from optkit.cli import main as cli_main
from optkit.errors import InputError
from optkit.parallel.fsdp import LATEST, SHARDED_DIR, ShardedTraining, clip_grad_norm_, sharded_training
from optkit.testing.tensor_parallel import free_port
from tests.helpers.ranks import spawn_ranks
from tests.helpers.tiny_training import PROBE, TINY, documents, llama_spec, spec, tokenizer, torchrun_train

DEADLINE_S = 120  # one launch, every rank
STEPS = 3
RUN = dict(steps=STEPS, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=3, save_every=2,
           eval_fraction=0.25, log_every=1000, weight_decay=0.1, grad_clip=1.0)  # the norms (~1.5) are clipped
TOL = 1e-5


def train(out: Path, **overrides: Any) -> training.TrainResult:
    model_spec = overrides.pop("spec", None) or spec()
    return training.train(model_spec, documents(), out_dir=out, tokenizer=tokenizer(), **{**RUN, **overrides})


def error_text(call: Callable[[], Any]) -> str:
    """The message of the InputError ``call`` raises (every rank raises the same), or 'no error'."""
    try:
        call()
    except InputError as exc:
        return str(exc)
    return "no error"


def relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


class Recorder:
    """Records what each training step did -- the batch rows this rank kept, the clipped gradient norm --
    by wrapping the functions ``optkit.training`` calls; the originals come back on exit."""

    def __init__(self, sharded: bool) -> None:
        self.rows: list[list[int]] = []
        self.norms: list[float] = []
        self.sharded = sharded

    def __enter__(self) -> "Recorder":
        self.real_slice, self.real_clip = ShardedTraining.local_batch, torch.nn.utils.clip_grad_norm_
        recorder = self

        def record_slice(self: ShardedTraining, batch: torch.Tensor, step_seed: int) -> torch.Tensor:
            local = recorder.real_slice(self, batch, step_seed)
            recorder.rows.append([i for i in range(batch.shape[0]) if any(torch.equal(batch[i], r) for r in local)])
            return local

        def record_norm(clip: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            def clipped(*args: Any, **kwargs: Any) -> torch.Tensor:
                norm = clip(*args, **kwargs)
                recorder.norms.append(norm.item())
                return norm
            return clipped

        ShardedTraining.local_batch = record_slice  # type: ignore[method-assign]
        if self.sharded:
            ShardedTraining.clip_grad_norm_ = staticmethod(record_norm(clip_grad_norm_))  # type: ignore[assignment]
        else:
            torch.nn.utils.clip_grad_norm_ = record_norm(self.real_clip)
        return self

    def __exit__(self, *exc: object) -> None:
        ShardedTraining.local_batch = self.real_slice  # type: ignore[method-assign]
        ShardedTraining.clip_grad_norm_ = staticmethod(clip_grad_norm_)  # type: ignore[assignment]
        torch.nn.utils.clip_grad_norm_ = self.real_clip


# -- the ranks ---------------------------------------------------------------------------------------
def _copy_at_step_2(work: Path) -> Callable[[], None]:
    """Wrap ShardedTraining.save so that rank 0 copies the run directory right after the step-2 checkpoint
    (the later save removes it); returns the function that undoes the wrap."""
    real_save = ShardedTraining.save

    def save(self: ShardedTraining, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
             out: Path) -> None:
        real_save(self, model, optimizer, scheduler, state, out)
        if state["step"] == 2 and self.is_main:
            shutil.copytree(out, work / "resume_1d")
        dist.barrier()

    ShardedTraining.save = save  # type: ignore[method-assign]
    return lambda: setattr(ShardedTraining, "save", real_save)


def _two_d(work: Path) -> dict[str, Any]:
    rank = dist.get_rank()
    undo = _copy_at_step_2(work)
    try:
        with Recorder(sharded=True) as seen:
            result = train(work / "two_d", tp_size=2)
    finally:
        undo()
    model = result.model
    q = model.get_parameter("decoder.layers.0.self_attn.q_proj.weight")  # split by TP, then by FSDP
    norm = model.get_parameter("decoder.layers.0.self_attn_layer_norm.weight")  # kept whole by TP
    with torch.no_grad():
        logits = model(PROBE).logits  # every rank runs the 2-D sharded forward pass
    return {"losses": result.losses, "norms": seen.norms, "logits": logits.tolist(),
            "q_mesh": list(q.device_mesh.mesh_dim_names), "q_share": q.to_local().numel() / q.numel(),
            "norm_mesh": list(norm.device_mesh.mesh_dim_names),
            "llama": train(work / "llama", steps=2, spec=llama_spec(), tp_size=2, gradient_checkpointing=True).losses,
            "odd_tp": error_text(lambda: train(work / "odd_tp", steps=1, tp_size=3)),
            "heads": error_text(lambda: train(work / "heads", steps=1, tp_size=4)),
            "odd_batch": error_text(lambda: train(work / "odd_batch", steps=1, batch_size=3, tp_size=2)),
            f"rows{rank}": seen.rows}


def _resume_1d(work: Path) -> dict[str, Any]:
    result = train(work / "resume_1d")  # fsdp=None, tp_size=None: 1-D FSDP over the 2 ranks
    return {"losses": result.losses, "resumed_from": result.resumed_from}


PHASES = {"two_d": (4, _two_d), "resume_1d": (2, _resume_1d)}


def launch(phase: str, work: Path) -> list[dict[str, Any]]:
    """Spawn the phase's ranks (at most DEADLINE_S, never hanging) and return each rank's result."""
    return spawn_ranks(__name__, phase, work, deadline_s=DEADLINE_S, label="2-D")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parallel_2d")


@pytest.fixture(scope="module")
def ranks(work: Path) -> dict[str, Any]:
    """Both launches' results; every rank of a launch must return the same (rank 0's are kept)."""
    four = launch("two_d", work)
    rows = [four[rank].pop(f"rows{rank}") for rank in range(4)]
    assert all(result == four[0] for result in four)  # losses, norms, logits, errors: equal on every rank
    resumed = launch("resume_1d", work)
    assert resumed[0] == resumed[1]
    return {**four[0], "rows": rows, "resumed": resumed[0]["losses"], "resumed_from": resumed[0]["resumed_from"]}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same run in this process, without a process group (plain training)."""
    with Recorder(sharded=False) as seen:
        result = train(tmp_path_factory.mktemp("single") / "run")
    with torch.no_grad():
        logits = result.model.eval()(PROBE).logits
    llama = train(tmp_path_factory.mktemp("single") / "llama", steps=2, spec=llama_spec(), gradient_checkpointing=True)
    return {"losses": result.losses, "norms": seen.norms, "logits": logits, "llama": llama.losses}


# -- equality with one process -----------------------------------------------------------------------
def test_dp2_x_tp2_trains_like_one_process(ranks, single):
    assert relative_difference(ranks["losses"], single["losses"]) <= TOL
    assert relative_difference(ranks["norms"], single["norms"]) <= TOL  # the clipped norm over both mesh dims
    assert min(single["norms"]) > RUN["grad_clip"]  # so clipping really acted on every step
    assert ranks["losses"][-1] < ranks["losses"][0]


def test_open_llama_with_gradient_checkpointing_trains_on_the_2d_mesh_like_one_process(ranks, single):
    assert relative_difference(ranks["llama"], single["llama"]) <= TOL


def test_parameters_are_split_over_both_mesh_dimensions(ranks):
    assert ranks["q_mesh"] == ["dp", "tp"] and ranks["q_share"] == 0.25  # TP halves, FSDP halves again
    assert ranks["norm_mesh"] == ["dp"]  # kept whole by TP: FSDP alone shards it


def test_batch_is_split_over_the_dp_ranks_only(ranks):
    halves = [[0, 1]] * STEPS, [[2, 3]] * STEPS
    assert ranks["rows"] == [halves[0], halves[0], halves[1], halves[1]]  # a tp group shares its rows


def test_exported_checkpoint_loads_in_transformers_like_the_single_process_model(ranks, single, work):
    from transformers import OPTForCausalLM

    hf = OPTForCausalLM.from_pretrained(work / "two_d").eval()
    with torch.no_grad():
        hf_logits = hf(PROBE).logits
    assert torch.allclose(hf_logits, single["logits"], rtol=TOL, atol=TOL)
    assert torch.allclose(torch.tensor(ranks["logits"]), single["logits"], rtol=TOL, atol=TOL)
    shards = {p.name for p in (work / "two_d" / SHARDED_DIR / "step-00000003").glob("*.distcp")}
    assert shards == {f"__{rank}_0.distcp" for rank in range(4)}


def test_2d_checkpoint_resumes_under_1d_fsdp_on_2_ranks(ranks, single, work):
    assert (work / "resume_1d" / SHARDED_DIR / LATEST).read_text().strip() == "step-00000003"
    assert ranks["resumed_from"] == 2
    assert ranks["resumed"][:2] == ranks["losses"][:2]  # the 2-D run's, from its trainer state
    assert relative_difference(ranks["resumed"], single["losses"]) <= TOL  # step 3 on the 1-D mesh


# -- sizes that cannot work --------------------------------------------------------------------------
def test_tp_size_that_does_not_divide_the_world_is_refused(ranks):
    assert "tp_size 3 does not divide the world size 4" in ranks["odd_tp"]
    assert "valid tp_size for 4 ranks: 1, 2, 4" in ranks["odd_tp"]


def test_tp_size_the_model_cannot_split_and_a_batch_the_dp_ranks_cannot_share_are_refused(ranks):
    assert "tp_size 4 does not divide the 2 attention heads" in ranks["heads"]
    assert "valid tp_size for this model: 1, 2" in ranks["heads"]
    assert "batch_size 3 does not divide over 2 data-parallel groups (4 ranks / tp_size 2)" in ranks["odd_batch"]


def test_tp_size_outside_torchrun_names_the_command(tmp_path):
    with pytest.raises(InputError, match=r"tp_size=2 .*torchrun --standalone --nproc-per-node 4 -m optkit.cli "
                                         r"train --tp-size 2"):
        train(tmp_path / "run", tp_size=2)
    with pytest.raises(InputError, match="tp_size=2 trains on a TP x FSDP 2-D mesh, which fsdp=False turns off"):
        sharded_training(False, tp_size=2)
    with pytest.raises(InputError, match="tp_size must be a positive integer.*got 0"):
        sharded_training(None, tp_size=0)
    assert sharded_training(None, tp_size=1) is None  # one rank per tp group: plain training here
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything was trained


def test_optkit_train_tp_size_outside_torchrun_fails_with_the_command(tmp_path, capsys):
    code = cli_main(["train", "--spec", "opt-tiny", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                     "--tp-size", "2"])
    assert code != 0
    assert "--tp-size 2" in capsys.readouterr().err


def test_optkit_train_tp_size_under_torchrun(tmp_path):
    """The command line on a 1 x 2 mesh (tp=2, dp=1): a real torchrun, rank 0 alone prints."""
    done = torchrun_train(tmp_path, "--batch-size", "2", "--tp-size", "2", timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 2") == 1
    assert (tmp_path / "run" / SHARDED_DIR / "step-00000002" / "__1_0.distcp").is_file()
    assert optkit.from_pretrained(tmp_path / "run").spec.decoder.hidden_size == TINY["hidden_size"]


def test_shard_for_training_refuses_a_mesh_it_cannot_read(tmp_path):
    """In a 1-rank group here: a 2-D mesh must be named ("dp", "tp"), and tp_size must match its "tp" size."""
    from torch.distributed.device_mesh import init_device_mesh

    from optkit.parallel import shard_for_training

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        unnamed = init_device_mesh("cpu", (1, 1), mesh_dim_names=("rows", "cols"))
        with pytest.raises(InputError, match=r"2-D named \('dp', 'tp'\), got 2-D with names \('rows', 'cols'\)"):
            shard_for_training(optkit.build(spec()), mesh=unnamed)
        flat = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
        with pytest.raises(InputError, match="tp_size 2 does not match the mesh's 1-rank 'tp' dimension"):
            shard_for_training(optkit.build(spec()), mesh=flat, tp_size=2)
    finally:
        dist.destroy_process_group()
