"""Tensor-parallel inference (optkit.parallel) in two real gloo processes on CPU, against one process.

Two processes are spawned once for the whole module (each with a deadline, a free port and its group torn
down, so a failure never hangs the suite); each builds every case with the same seed as the single-process
reference here, splits it with ``parallelize`` and saves its outputs. The tests compare: logits within 1e-5
(relative), generated tokens equal across ranks and to one process, each rank's KV cache holding its own
heads, and each rank holding its share of the parameter bytes. Planning errors need no process group and
are checked in this process.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import optkit
import optkit.inference
from optkit.interfaces import MLP, ShardStyle
from optkit.parallel import local_parameter_bytes, parallelize, planned_parameter_bytes, tensor_parallel_plan
from optkit.testing import add_plugin, fresh_registry
from tests.helpers import load_example_plugin
from tests.helpers.models import tiny_open_llama
from tests.helpers.ranks import spawn_ranks

WORLD = 2
DEADLINE_S = 150  # both processes, every case; a hang fails the test instead of the CI job
NEW_TOKENS = 5


# -- the cases: built identically here and in each rank ---------------------------------------------------
class ThirdPartyMLP(MLP):
    """An MLP a plugin might ship, with its own names, declaring its own split."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.expand, self.contract = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.contract(torch.tanh(self.expand(x)))

    def tp_plan(self) -> dict[str, ShardStyle]:
        return {"expand": "colwise", "contract": "rowwise"}

    def shard_local(self, tp_size: int) -> None:
        """Elementwise activation: nothing to adjust."""


class UndeclaredMLP(MLP):
    """An MLP with weights and no plan: parallelize must refuse it, naming it."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _opt(spec: str | dict, **components: Any) -> optkit.Model:
    torch.manual_seed(0)
    return optkit.build(spec, dtype=torch.float32, **components).eval()


def _third_party_mlp() -> optkit.Model:
    model = _opt("opt-tiny")
    torch.manual_seed(1)
    for layer in model.decoder.layers:
        layer.mlp = ThirdPartyMLP(64, 96)
    return model


def _prepared() -> optkit.Model:
    return optkit.inference.prepare(_opt("opt-tiny"))


CASES: dict[str, Callable[[], optkit.Model]] = {
    "opt-tiny": lambda: _opt("opt-tiny"),
    "opt-tiny-350m-style": lambda: _opt("opt-tiny-350m-style"),
    "opt-tiny-no-bias": lambda: _opt({"extends": "opt-tiny", "decoder": {"bias": False}}),
    "opt-tiny-sdpa": lambda: _opt("opt-tiny", attention="sdpa"),
    "opt-tiny-prepared": _prepared,
    "open-llama-tiny": tiny_open_llama,
    "open-llama-tiny-v2-style": lambda: _opt("open-llama-tiny-v2-style"),
    "third-party-mlp": _third_party_mlp,
    "head-base": lambda: _opt("opt-tiny", head="base"),
    "head-sequence-classification": lambda: _opt("opt-tiny", head="sequence_classification"),
    "head-question-answering": lambda: _opt("opt-tiny", head="question_answering"),
}
GENERATES = [name for name in CASES if not name.startswith("head-")]


def prompt() -> tuple[Tensor, Tensor]:
    """A left-padded batch of two."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def outputs(model: optkit.Model, name: str) -> dict[str, Any]:
    """Everything a case is compared on: forward outputs, cached heads, generated tokens."""
    ids, mask = prompt()
    labels = {"head-sequence-classification": torch.tensor([0, 1])}.get(name, ids if name in GENERATES else None)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, use_cache=name in GENERATES)
    result: dict[str, Any] = {key: getattr(out, key) for key in ("logits", "loss", "last_hidden_state",
                                                                 "start_logits", "end_logits")
                              if getattr(out, key, None) is not None}
    if name in GENERATES:
        result["cached_heads"] = out.past_key_values.keys[0].shape[1]
        result["greedy"] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    if name == "opt-tiny":
        result["last_logits"] = model(ids, attention_mask=mask, logits_to_keep=1).logits.detach()
        result["beam"] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=2)
        torch.manual_seed(5)  # the same seed on every rank: every rank draws the same tokens
        result["sampled"] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True,
                                           top_k=0)
    return result


# -- the ranks -------------------------------------------------------------------------------------------
def _error_text(call: Callable[[], Any]) -> str:
    try:
        call()
    except optkit.InputError as error:
        return f"InputError: {error}"
    except Exception as error:  # reported, so the test shows what was raised instead
        return f"{type(error).__name__}: {error}"
    return "no error"


def _every_case(out_dir: Path) -> dict[str, Any]:
    """One rank's outputs for every case, split over the group, and the errors a split inside it raises."""
    results: dict[str, Any] = {}
    for name, build in CASES.items():
        model = build()
        parallelize(model)
        results[name] = {**outputs(model, name), "bytes": local_parameter_bytes(model),
                         "prepared": optkit.inference.is_prepared(model)}
    results["errors"] = {
        "world_mismatch": _error_text(lambda: parallelize(_opt("opt-tiny"), tp_size=3)),
        "twice": _error_text(lambda: parallelize(parallelize(_opt("opt-tiny")))),
    }
    return results


PHASES = {"tp": (WORLD, _every_case)}


def run_ranks(out_dir: Path) -> list[dict[str, Any]]:
    """Spawn the ranks (at most DEADLINE_S, never hanging) and return each rank's results."""
    return spawn_ranks(__name__, "tp", out_dir, deadline_s=DEADLINE_S, label="tensor-parallel", tensors=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    return run_ranks(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    """The same cases in this one process, unsplit."""
    results = {}
    for name, build in CASES.items():
        model = build()
        results[name] = {**outputs(model, name), "model": model}
    return results


def relative_error(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# -- equal to one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_split_outputs_equal_one_process_on_every_rank(ranks, single, name):
    for rank in ranks:
        for key in ("logits", "last_hidden_state", "start_logits", "end_logits", "loss", "last_logits"):
            if key in single[name]:
                assert rank[name][key].shape == single[name][key].shape, key
                assert relative_error(rank[name][key], single[name][key]) <= 1e-5, f"{name} {key}"


@pytest.mark.parametrize("name", GENERATES)
def test_generated_tokens_equal_across_ranks_and_one_process(ranks, single, name):
    keys = ["greedy"] + (["beam", "sampled"] if name == "opt-tiny" else [])
    for key in keys:
        assert torch.equal(ranks[0][name][key], ranks[1][name][key]), f"ranks diverge in {key}"
        assert torch.equal(ranks[0][name][key], single[name][key]), f"{key} differs from one process"


@pytest.mark.parametrize("name", GENERATES)
def test_each_rank_caches_only_its_own_heads(ranks, single, name):
    assert single[name]["cached_heads"] == 4
    assert [rank[name]["cached_heads"] for rank in ranks] == [4 // WORLD] * WORLD


def test_a_prepared_model_is_restored_before_it_is_split(ranks, single):
    assert optkit.inference.is_prepared(single["opt-tiny-prepared"]["model"])
    assert not any(rank["opt-tiny-prepared"]["prepared"] for rank in ranks)


# -- memory: each rank holds its share ------------------------------------------------------------------
SPLIT_WHOLE = ("q_proj.", "k_proj.", "v_proj.", "fc1.", "gate_proj.", "up_proj.", "expand.")  # weight and bias
SPLIT_WEIGHT = ("out_proj.weight", "fc2.weight", "down_proj.weight", "contract.weight", "embed_tokens.weight",
                "head.weight")  # row-split weights (their bias is whole) and vocabulary tables


def expected_share(model: optkit.Model) -> int:
    """Bytes one of WORLD ranks should hold: split tensors / WORLD, the rest whole (tied tables once)."""
    total = 0
    for name, param in model.named_parameters():  # a tied table appears once
        split = any(part in name for part in SPLIT_WHOLE) or name.endswith(SPLIT_WEIGHT)
        total += param.numel() * param.element_size() // (WORLD if split else 1)
    return total


@pytest.mark.parametrize("name", ["opt-tiny", "opt-tiny-350m-style", "open-llama-tiny", "open-llama-tiny-v2-style",
                                  "third-party-mlp", "opt-tiny-prepared"])
def test_each_rank_holds_its_share_of_the_parameter_bytes(ranks, single, name):
    model = single[name]["model"]
    assert local_parameter_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters())
    want = expected_share(model)
    assert want < 0.6 * local_parameter_bytes(model)
    assert [rank[name]["bytes"] for rank in ranks] == [want] * WORLD
    assert planned_parameter_bytes(model, WORLD) == want  # what docs/distributed.md's table is computed with


# -- errors ---------------------------------------------------------------------------------------------
def test_inside_a_group_a_tp_size_other_than_the_world_size_names_both(ranks):
    for rank in ranks:
        message = rank["errors"]["world_mismatch"]
        assert message.startswith("InputError: tp_size 3 but the process group has 2 ranks")
        assert "torchrun --standalone --nproc-per-node 3" in message and "mesh=" in message


def test_splitting_twice_is_refused(ranks):
    assert all(rank["errors"]["twice"].startswith("InputError: this model is already split") for rank in ranks)


@pytest.mark.parametrize("tp_size", [None, 2])
def test_outside_a_process_group_the_error_gives_the_torchrun_command(tp_size):
    assert not dist.is_initialized()
    with pytest.raises(optkit.InputError, match=f"torchrun --standalone --nproc-per-node {tp_size or 2} "):
        parallelize(_opt("opt-tiny"), tp_size=tp_size)


def test_a_component_with_weights_and_no_plan_is_named_with_what_to_declare():
    model = _opt("opt-tiny")
    for layer in model.decoder.layers:
        layer.mlp = UndeclaredMLP(64)
    with pytest.raises(optkit.InputError) as error:
        parallelize(model, tp_size=2)
    message = str(error.value)
    assert "UndeclaredMLP at 'decoder.layers.0.mlp' (and 1 more) holds proj.weight, proj.bias" in message
    assert "TensorParallel" in message and "tp_plan()" in message and "shard_local(tp_size)" in message


def test_a_third_party_block_without_a_plan_is_named():
    registry = fresh_registry()
    add_plugin(load_example_plugin("parallel_gqa_family/optkit_parallel_gqa", "optkit_parallel_gqa"), registry)
    spec = {"family": "parallel-gqa", "head": "causal_lm",
            "decoder": {"vocab_size": 96, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_dim": 48,
                        "max_positions": 64, "block": {"name": "parallel_gqa", "params": {"num_kv_heads": 2}}}}
    model = optkit.build(spec, registry=registry)
    with pytest.raises(optkit.InputError, match=r"ParallelBlock at 'decoder.layers.0' \(and 1 more\) holds"):
        tensor_parallel_plan(model, 2)


def test_a_linear_backend_that_cannot_be_split_is_named_with_the_fix():
    with pytest.raises(optkit.InputError, match="'decoder.layers.0.self_attn.q_proj' is a OneDNNLinear.*"
                                                "linear='torch'"):
        tensor_parallel_plan(_opt("opt-tiny", linear="onednn"), 2)


def test_a_declared_style_or_name_that_does_not_exist_is_named():
    model = _opt("opt-tiny")
    model.decoder.layers[0].mlp.tp_plan = lambda: {"fc1": "columnwise", "fc2": "rowwise"}
    with pytest.raises(optkit.InputError, match="FeedForward at 'decoder.layers.0.mlp' declares tensor-parallel "
                                                "style 'columnwise' for 'fc1'"):
        tensor_parallel_plan(model, 2)
    model.decoder.layers[0].mlp.tp_plan = lambda: {"fc3": "colwise"}
    with pytest.raises(optkit.InputError, match="'fc3', which is not one of its sub-modules"):
        tensor_parallel_plan(model, 2)


@settings(max_examples=12, deadline=None)
@given(tp_size=st.integers(1, 40))
def test_tp_size_must_divide_heads_widths_and_vocabulary(tp_size):
    """opt-tiny: 4 heads, widths 64 and 128, 512 tokens -- 1, 2 and 4 split it, nothing else does."""
    model = _opt("opt-tiny")
    if tp_size in (1, 2, 4):
        assert tensor_parallel_plan(model, tp_size).tp_size == tp_size
    else:
        with pytest.raises(optkit.InputError, match=f"tp_size {tp_size} does not divide the .*valid tp_size for "
                                                    "this model: 1, 2, 4$"):
            tensor_parallel_plan(model, tp_size)


def test_a_vocabulary_that_does_not_split_names_its_size_and_says_it_is_not_padded():
    with pytest.raises(optkit.InputError, match="tp_size 2 does not divide the vocabulary of 501 rows in "
                                                "'decoder.embed_tokens'.*valid tp_size for this model: 1 "
                                                "-- optkit does not pad"):
        tensor_parallel_plan(_opt({"extends": "opt-tiny", "decoder": {"vocab_size": 501}}), 2)


@pytest.mark.parametrize("tp_size", [0, -2, 2.0, True, "2"])
def test_tp_size_must_be_a_positive_integer(tp_size):
    with pytest.raises(optkit.InputError, match="tp_size must be a positive integer"):
        tensor_parallel_plan(_opt("opt-tiny"), tp_size)


def test_from_pretrained_tp_size_outside_a_process_group_says_how_to_launch(tmp_path):
    optkit.build("opt-tiny").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(optkit.InputError, match="torchrun --standalone --nproc-per-node 2"):
        optkit.from_pretrained(tmp_path / "ckpt", tp_size=2)
    with pytest.raises(optkit.InputError, match="cannot be combined"):
        optkit.from_pretrained(tmp_path / "ckpt", tp_size=2, device_map="auto")


def test_the_docs_memory_table_is_the_computed_one():
    from optkit.parallel.memory_table import markdown_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    shown = docs.split("<!-- tp-memory-table -->\n", 1)[1].split("\n<!-- /tp-memory-table -->", 1)[0]
    assert shown == markdown_table(), "regenerate it: python -m optkit.parallel.memory_table"


def test_int8_counts_a_byte_per_weight_and_a_scale_per_row_held():
    model = optkit.build("opt-tiny", device="meta")
    fc1, fc2 = model.decoder.layers[0].mlp.fc1, model.decoder.layers[0].mlp.fc2
    whole = planned_parameter_bytes(model, 1, "int8")
    split = planned_parameter_bytes(model, 2, "int8")
    assert whole - split >= fc1.weight.numel() // 2 + fc1.out_features // 2 * 4 + fc2.weight.numel() // 2
    assert planned_parameter_bytes(model, 2, "float16") == planned_parameter_bytes(model, 2, None) // 2


# -- the conformance kit's tensor-parallel check ---------------------------------------------------------
def test_the_example_third_party_attention_plugin_passes_the_tensor_parallel_check():
    from optkit.testing import check_tensor_parallel

    plugin = load_example_plugin("third_party_attention_plugin/optkit_chunked_attention", "optkit_chunked_attention")
    check_tensor_parallel({"extends": "opt-tiny", "decoder": {"attention": {"name": "chunked",
                                                                            "params": {"chunk_size": 3}}}},
                          plugins=[plugin], timeout=120)


def _undeclared_mlp_model() -> optkit.Model:
    model = _opt("opt-tiny")
    for layer in model.decoder.layers:
        layer.mlp = UndeclaredMLP(64)
    return model


def test_the_tensor_parallel_check_names_a_component_without_a_plan_before_spawning():
    from optkit.testing import check_tensor_parallel

    with pytest.raises(optkit.InputError, match="UndeclaredMLP at 'decoder.layers.0.mlp'.*Implement "
                                                "optkit.interfaces.TensorParallel"):
        check_tensor_parallel(_undeclared_mlp_model, timeout=5)


def test_importing_the_launcher_does_not_import_fsdp_dcp_or_dtensor():
    """Every ``optkit run`` imports optkit.parallel.launch; the package's lazy exports keep it cheap."""
    code = ("import sys, optkit.parallel.launch, optkit.parallel as p\n"
            "heavy = ('optkit.parallel.fsdp', 'optkit.parallel.tensor_parallel', 'torch.distributed.fsdp',\n"
            "         'torch.distributed.checkpoint', 'torch.distributed.tensor')\n"
            "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
            "print(p.tensor_parallel_plan.__module__, 'tensor_parallel_plan' in vars(p))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "optkit.parallel.plan True"]


@pytest.mark.parametrize("package", ["optkit", "optkit.parallel", "optkit.inference"])
def test_a_name_a_package_does_not_export_is_an_attribute_error_naming_the_package(package):
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match=f"^module '{package}' has no attribute 'no_such_name'$"):
        getattr(module, "no_such_name")
