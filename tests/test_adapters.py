"""LoRA adapters (optkit.adapters): the math, freezing, merging, switching, and PEFT's files both ways.

PEFT itself is the oracle for the file format: an adapter PEFT made on transformers' OPT loads in optkit
with the same logits, and one optkit saved loads in PEFT with the same logits (fp32, <= 1e-5).
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import optkit
from optkit.adapters import (AdapterConfigWarning, LoRALinear, active_adapter, adapter_names, adapter_parameters,
                             add_adapters, add_adapters_from_options, load_adapters, merge_adapters, merge_and_unload, save_adapters,
                             set_adapter, target_names, unload_adapters, unmerge_adapters)
from optkit.adapters.attach import checkpoint_path, lora_modules
from optkit.inference import is_prepared, prepare, restore
from tests.helpers import base_hash, batch, hf_model, tiny_open_llama

ATOL = 1e-5
OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def tiny_opt() -> optkit.Model:
    torch.manual_seed(0)
    return optkit.build("opt-tiny").eval()


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Non-zero B (a fresh adapter is the identity, which would hide any mistake in the delta)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=g) * std)


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


# -- the math ---------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(r=st.integers(1, 6), alpha=st.floats(0.5, 32), rslora=st.booleans(), rows=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_lora_linear_adds_scaled_low_rank_delta(r, alpha, rslora, rows, seed):
    torch.manual_seed(seed)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, r, alpha, use_rslora=rslora)
    x = torch.randn(rows, 5, 12)
    assert torch.equal(layer(x), base(x))  # B starts at zero: a fresh adapter changes nothing
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (r, 12) and b.shape == (7, r)
    bound = 1 / math.sqrt(12)  # Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT
    assert a.abs().max() <= bound and a.std() > 0
    with torch.no_grad():
        b.normal_()
    scale = alpha / (math.sqrt(r) if rslora else r)
    expected = base(x) + (x @ a.T @ b.T) * scale
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_dropout_acts_on_the_adapter_branch_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), 4, 8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_fresh_adapters_leave_the_model_unchanged():
    model = tiny_opt()
    ids, mask = batch(seed=1)
    before = logits(model, ids, mask)
    add_adapters(model, r=4, alpha=16, target_modules="all-linear")
    assert torch.equal(logits(model, ids, mask), before)
    assert len([m for m in model.modules() if isinstance(m, LoRALinear)]) == 6 * model.spec.decoder.num_layers
    assert not any(m.training for m in model.modules())  # wrappers follow the model's eval mode (dropout off)


def test_target_names_are_the_checkpoints_and_unknown_ones_are_listed():
    model = tiny_opt()
    assert target_names(model) == OPT_TARGETS
    assert target_names(tiny_open_llama()) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]
    with pytest.raises(optkit.InputError, match=r"unknown name\(s\) \['o_proj'\].*q_proj, k_proj, v_proj, "
                                                r"out_proj, fc1, fc2"):
        add_adapters(model, r=2, alpha=4, target_modules=["q_proj", "o_proj"])
    assert adapter_names(model) == []  # refused before anything changed
    with pytest.raises(optkit.InputError, match="r must be a positive integer"):
        add_adapters(model, r=0, alpha=4)


def test_options_mapping_is_checked_key_by_key():
    model = tiny_opt()
    with pytest.raises(optkit.InputError, match=r"adapters: unknown key\(s\) \['lora_r'\]; missing r \(keys: r, alpha"):
        add_adapters_from_options(model, {"lora_r": 8, "alpha": 16})
    add_adapters_from_options(model, {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "name": "x"})
    assert adapter_names(model) == ["x"] and model.decoder.layers[1].self_attn.v_proj.settings["x"].scale == 2.0


# -- freezing and training --------------------------------------------------------------------------------
def test_only_adapters_train_and_the_base_stays_bit_identical():
    model = tiny_opt()
    add_adapters(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "fc2"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) and trainable
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    before_base, before_adapters = base_hash(model), {n: p.clone() for n, p in adapter_parameters(model).items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, _ = batch(seed=2)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert base_hash(model) == before_base
    assert all(not torch.equal(p, before_adapters[n]) for n, p in adapter_parameters(model).items())


# -- merging ----------------------------------------------------------------------------------------------
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_the_weights():
    model = tiny_opt()
    add_adapters(model, r=4, alpha=8, target_modules=["q_proj", "fc1"], use_rslora=True)
    randomize_adapters(model)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    ids, mask = batch(seed=3)
    unmerged = logits(model, ids, mask)
    merge_adapters(model)
    assert (logits(model, ids, mask) - unmerged).abs().max() <= ATOL
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert len(changed) == 2 * model.spec.decoder.num_layers
    unmerge_adapters(model)
    # (W + d) - d in float32: equal within one rounding of |W| + |d| per element, not always bit for bit.
    for name, param in model.named_parameters():
        if name in weights:
            module = model.get_submodule(name.removesuffix(".base.weight"))
            bound = 2 * torch.finfo(torch.float32).eps * (weights[name].abs() + module.delta_weight("default").abs())
            assert ((param - weights[name]).abs() <= bound).all(), name
    assert (logits(model, ids, mask) - unmerged).abs().max() <= ATOL


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(tmp_path):
    model = tiny_opt()
    add_adapters(model, r=2, alpha=4, target_modules=["v_proj", "out_proj"])
    randomize_adapters(model)
    ids, mask = batch(seed=4)
    adapted = logits(model, ids, mask)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (logits(model, ids, mask) - adapted).abs().max() <= ATOL
    model.save_pretrained(tmp_path)  # a plain checkpoint again
    assert (logits(optkit.from_pretrained(tmp_path), ids, mask) - adapted).abs().max() <= ATOL


class DenseOnlyLinear(nn.Module):
    """A third party's linear that keeps its weight privately and offers it through MergeableLinear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._w = nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._w.T

    def dense_weight(self) -> torch.Tensor:
        return self._w.detach().clone()

    def set_dense_weight(self, weight: torch.Tensor) -> None:
        self._w.data = weight


class OpaqueLinear(DenseOnlyLinear):
    """The same without the contract: an adapter still runs on it, but may not merge into it."""

    dense_weight = set_dense_weight = None  # type: ignore[assignment]


def test_merge_uses_the_mergeable_contract_and_refuses_other_bases_with_the_reason():
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    layer = LoRALinear(DenseOnlyLinear(6, 5), 3, 6)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged == "default" and torch.allclose(layer(x), unmerged, atol=1e-5)
    opaque = LoRALinear(OpaqueLinear(6, 5), 3, 6)
    with pytest.raises(optkit.InputError, match="OpaqueLinear does not implement optkit.interfaces.MergeableLinear"):
        opaque.merge()
    assert opaque.merged is None


int8_reasons = optkit.registry.get("linear", "int8").unavailable_reasons("cpu", torch.float32)


@pytest.mark.skipif(bool(int8_reasons), reason=f"int8 linear unavailable: {int8_reasons}")
def test_int8_base_trains_adapters_and_refuses_to_merge():
    torch.manual_seed(0)
    model = optkit.build("opt-tiny", linear="int8").eval()
    ids, _ = batch(seed=5)
    before = logits(model, ids)
    add_adapters(model, r=4, alpha=8)
    assert torch.equal(logits(model, ids), before)
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(adapter_parameters(model)) and any(g.abs().sum() > 0 for g in grads.values())
    randomize_adapters(model)
    model.eval()
    adapted = logits(model, ids)
    with pytest.raises(optkit.InputError, match=r"cannot merge adapter 'default' into decoder\.layers\.0\.self_attn"
                                                r"\.q_proj: its base Int8Linear does not implement"):
        merge_adapters(model)
    assert torch.equal(logits(model, ids), adapted)  # refused as a whole: nothing was merged


# -- several adapters -------------------------------------------------------------------------------------
def test_named_adapters_switch_like_peft():
    model = tiny_opt()
    ids, mask = batch(seed=6)
    base = logits(model, ids, mask)
    add_adapters(model, r=2, alpha=4, name="a")
    randomize_adapters(model, seed=1)
    add_adapters(model, r=3, alpha=3, target_modules=["fc1"], name="b")
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "a"  # added, not activated
    assert all(p.requires_grad for p in adapter_parameters(model, "b").values())
    randomize_adapters(model, seed=2)  # both now random
    with_a = logits(model, ids, mask)
    set_adapter(model, "b")
    with_b = logits(model, ids, mask)
    set_adapter(model, None)
    assert torch.equal(logits(model, ids, mask), base)
    set_adapter(model, "a")
    assert torch.equal(logits(model, ids, mask), with_a)
    assert (with_a - with_b).abs().max() > 1e-3 and (with_a - base).abs().max() > 1e-3
    with pytest.raises(optkit.InputError, match=r"no adapter named 'c' on this model \(adapters: a, b\)"):
        set_adapter(model, "c")
    with pytest.raises(optkit.InputError, match="already has an adapter named 'a'"):
        add_adapters(model, r=2, alpha=4, name="a")
    merge_adapters(model)
    with pytest.raises(optkit.InputError, match="adapter 'a' is merged into the weights; call unmerge_adapters"):
        set_adapter(model, "b")


def test_several_adapters_save_in_peft_folders_and_load_back(tmp_path):
    model = tiny_opt()
    add_adapters(model, r=2, alpha=4)
    add_adapters(model, r=4, alpha=2, target_modules=["fc2", "k_proj"], name="other")
    randomize_adapters(model)
    ids, mask = batch(seed=7)
    expected = {}
    for name in ("default", "other"):
        set_adapter(model, name)
        expected[name] = logits(model, ids, mask)
    save_adapters(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "other" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["target_modules"] == ["fc2", "k_proj"]
    fresh = tiny_opt()
    load_adapters(fresh, tmp_path)
    load_adapters(fresh, tmp_path / "other", name="other")
    for name in ("default", "other"):
        set_adapter(fresh, name)
        assert torch.equal(logits(fresh, ids, mask), expected[name])


# -- files ------------------------------------------------------------------------------------------------
def test_save_load_round_trip_holds_only_the_adapter(tmp_path):
    model = tiny_opt()
    add_adapters(model, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "fc1"])
    randomize_adapters(model)
    ids, mask = batch(seed=8)
    expected = logits(model, ids, mask)
    save_adapters(model, tmp_path, base_model_name_or_path="facebook/opt-125m")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["target_modules"] == ["fc1", "q_proj", "v_proj"] and config["use_rslora"] is False
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.decoder.layers.1.fc1.lora_B.weight" in keys  # OPT's file names, not mlp.fc1
    assert len(keys) == 2 * 3 * model.spec.decoder.num_layers
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 64 * 1024  # kilobytes, not the model
    fresh = tiny_opt()
    load_adapters(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids, mask), expected)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference, like PEFT
    trainable = load_adapters(tiny_opt(), tmp_path, trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(adapter_parameters(trainable))


def test_open_llama_adapters_use_its_checkpoint_names(tmp_path):
    model = tiny_open_llama()
    add_adapters(model, r=2, alpha=4, target_modules=["o_proj", "gate_proj"])
    randomize_adapters(model)
    ids = torch.randint(3, 128, (2, 6))
    expected = logits(model, ids)
    save_adapters(model, tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight" in keys
    fresh = tiny_open_llama()
    load_adapters(fresh, tmp_path)
    assert torch.equal(logits(fresh, ids), expected)


def saved_adapter(tmp_path):
    model = tiny_opt()
    add_adapters(model, r=4, alpha=8)
    save_adapters(model, tmp_path)
    return tmp_path


def rewrite_config(directory, **fields):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "use_dora = True is not supported by optkit"),
    ("bias", "all", "bias = 'all' is not supported by optkit"),
    ("rank_pattern", {"q_proj": 8}, "rank_pattern = {'q_proj': 8} is not supported"),
    ("init_lora_weights", "pissa", "init_lora_weights = 'pissa' is not supported"),
    ("peft_type", "IA3", "peft_type is 'IA3'; optkit reads LoRA adapters"),
    ("brand_new_option", 3, "field 'brand_new_option' = 3 is unknown to optkit; it is refused rather than ignored"),
    ("r", 0, "r must be a positive integer"),
])
def test_config_fields_optkit_cannot_honour_are_refused_by_name(tmp_path, field, value, message):
    rewrite_config(saved_adapter(tmp_path), **{field: value})
    model = tiny_opt()
    with pytest.raises(optkit.CheckpointError, match="adapter_config.json: .*" + re.escape(message)):
        load_adapters(model, tmp_path)
    assert adapter_names(model) == []


def test_unknown_empty_config_fields_are_ignored_with_a_warning(tmp_path):
    rewrite_config(saved_adapter(tmp_path), future_option=None)
    with pytest.warns(AdapterConfigWarning, match="ignored fields optkit does not know, all empty: future_option"):
        load_adapters(tiny_opt(), tmp_path)


def test_bad_tensors_are_named_as_in_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = saved_adapter(tmp_path)
    file = directory / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.decoder.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({**tensors, key: torch.zeros(64, 5)}, file)
    with pytest.raises(optkit.CheckpointError, match=rf"tensor '{key}' has shape \(64, 5\).*\(64, 4\) \(r=4\)"):
        load_adapters(tiny_opt(), directory)
    save_file({k: v for k, v in tensors.items() if k != key}, file)
    with pytest.raises(optkit.CheckpointError, match=rf"tensor '{key}' is missing"):
        load_adapters(tiny_opt(), directory)
    stray = "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file({**tensors, stray: torch.zeros(64)}, file)
    with pytest.raises(optkit.CheckpointError, match=f"tensor '{stray}' is not one optkit can load"):
        load_adapters(tiny_opt(), directory)
    rewrite_config(directory, target_modules=["q_proj"])
    save_file(tensors, file)
    with pytest.raises(optkit.CheckpointError, match="has tensors for 'model.decoder.layers.0.self_attn.v_proj', "
                                                     "which target_modules"):
        load_adapters(tiny_opt(), directory)
    with pytest.raises(optkit.CheckpointNotFoundError, match="adapter_config.json does not exist"):
        load_adapters(tiny_opt(), tmp_path / "nowhere")


def test_adapters_on_a_prepared_model_are_never_bypassed_by_stacked_projections():
    torch.manual_seed(0)
    model = prepare(optkit.build("opt-tiny", linear="onednn").eval())
    if not model.decoder.layers[0].self_attn.stacked:
        pytest.fail("the oneDNN model should stack q/k/v when prepared")
    add_adapters(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    randomize_adapters(model)
    assert is_prepared(model) and not model.decoder.layers[0].self_attn.stacked
    ids, mask = batch(seed=9)
    prepared = logits(model, ids, mask)
    assert (logits(restore(model), ids, mask) - prepared).abs().max() <= ATOL
    merge_adapters(model)  # in place on the oneDNN weights: their packed copies must follow
    assert (logits(model, ids, mask) - prepared).abs().max() <= ATOL
    unmerge_adapters(model)
    assert model.generate(ids[:1], max_new_tokens=3).shape == (1, ids.shape[1] + 3)



onednn_reasons = optkit.registry.get("linear", "onednn").unavailable_reasons("cpu", torch.float32)


def onednn_prepared() -> optkit.Model:
    torch.manual_seed(0)
    return prepare(optkit.build("opt-tiny", linear="onednn", dtype=torch.float32).eval())


@pytest.mark.skipif(bool(onednn_reasons), reason=f"oneDNN linear unavailable on this machine: {onednn_reasons}")
@pytest.mark.parametrize("take_off", ["unload", "merge_unmerge_unload", "merge_and_unload"])
def test_taking_adapters_off_a_stacking_backend_stacks_q_k_v_again(take_off):
    never_adapted, model = onednn_prepared(), onednn_prepared()
    attention = [layer.self_attn for layer in model.decoder.layers]
    assert all(block.stacked for block in attention)
    add_adapters(model, target_modules=["q_proj", "v_proj"], r=4)
    randomize_adapters(model)
    assert not any(block.stacked for block in attention)  # wrapped projections: three GEMMs, never bypassed
    ids, mask = batch(seed=14)
    adapted = logits(model, ids, mask)
    if take_off == "merge_and_unload":
        merge_and_unload(model)
        want = adapted  # the adapter now lives in the base weights
    else:
        if take_off == "merge_unmerge_unload":
            merge_adapters(model)
            unmerge_adapters(model)
        unload_adapters(model)
        want = logits(never_adapted, ids, mask)
    assert (logits(model, ids, mask) - want).abs().max() <= ATOL
    assert all(block.stacked for block in attention), "q/k/v should be one GEMM again once the adapters are off"
    assert torch.equal(model.generate(ids[:1], max_new_tokens=3), model.generate(ids[:1], max_new_tokens=3))


@pytest.mark.skipif(bool(onednn_reasons), reason=f"oneDNN linear unavailable on this machine: {onednn_reasons}")
def test_a_block_prepared_unstacked_stays_unstacked_after_adapters_come_off():
    torch.manual_seed(0)
    model = prepare(optkit.build("opt-tiny", linear="onednn", dtype=torch.float32).eval(), stack_projections=False)
    attention = [layer.self_attn for layer in model.decoder.layers]
    add_adapters(model, r=4)
    unload_adapters(model)
    ids, mask = batch(seed=15)
    logits(model, ids, mask)
    assert not any(block.stacked for block in attention)

# -- PEFT as the oracle -----------------------------------------------------------------------------------
def peft_library():
    """PEFT is in the ``test`` extra; without it these oracle tests cannot run (and say so)."""
    return pytest.importorskip("peft")

PEFT_CASES = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=2, lora_alpha=16, target_modules=["k_proj", "out_proj", "fc1", "fc2"], use_rslora=True),
    dict(r=8, lora_alpha=4, lora_dropout=0.05, target_modules=r".*\.(q_proj|fc2)"),
    dict(r=2, lora_alpha=8, target_modules="all-linear"),  # with project_in/out where the model has them
]


def peft_and_optkit(case: dict, variant: dict):
    """A PEFT model on transformers' OPT and an optkit model with the same base weights (not shared)."""
    peft = peft_library()
    hf = hf_model(**variant)
    ours = optkit.from_transformers(copy.deepcopy(hf))
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **case))
    return peft_model, ours


@pytest.mark.parametrize("case", PEFT_CASES, ids=["qv", "rslora-kofc", "regex", "all-linear"])
@pytest.mark.parametrize("variant", [{}, dict(do_layer_norm_before=False, word_embed_proj_dim=16)],
                         ids=["pre_ln", "post_ln_projected"])
def test_an_adapter_peft_saved_loads_with_peft_logits(tmp_path, case, variant):
    peft_model, ours = peft_and_optkit(case, variant)
    randomize_adapters(peft_model)
    peft_model.eval().save_pretrained(tmp_path)
    load_adapters(ours, tmp_path)
    ids, mask = batch(seed=10)
    real = mask.bool()
    assert (logits(ours, ids, mask) - logits(peft_model, ids, mask))[real].abs().max() <= ATOL


@pytest.mark.parametrize("case", PEFT_CASES[:2], ids=["qv", "rslora-kofc"])
def test_an_adapter_optkit_saved_loads_in_peft_with_optkit_logits(tmp_path, case):
    hf = hf_model()
    ours = optkit.from_transformers(copy.deepcopy(hf))
    add_adapters(ours, r=case["r"], alpha=case["lora_alpha"], target_modules=case["target_modules"],
                 use_rslora=case.get("use_rslora", False))
    randomize_adapters(ours)
    save_adapters(ours, tmp_path)
    peft_model = peft_library().PeftModel.from_pretrained(hf, tmp_path).eval()
    ids, mask = batch(seed=11)
    assert (logits(ours, ids, mask) - logits(peft_model, ids, mask))[mask.bool()].abs().max() <= ATOL
    assert peft_model.peft_config["default"].target_modules == set(case["target_modules"])



# -- alpha omitted: PEFT's default -------------------------------------------------------------------------
def test_alpha_defaults_to_peft_everywhere_it_can_be_omitted(tmp_path):
    import argparse
    import inspect

    from optkit.adapters.lora import DEFAULT_ALPHA, LoRASettings
    from optkit.cli_train import _model_and_tokenizer, register

    peft_alpha = peft_library().LoraConfig().lora_alpha
    assert DEFAULT_ALPHA == peft_alpha
    assert inspect.signature(add_adapters).parameters["alpha"].default == peft_alpha
    assert LoRASettings(4).alpha == peft_alpha and LoRALinear(nn.Linear(4, 4), 2).settings["default"].alpha == peft_alpha
    path = tmp_path / "spec.yaml"
    path.write_text("extends: opt-tiny\nadapters: {r: 2}\n")
    assert optkit.load_spec(path).adapters.alpha == peft_alpha
    assert optkit.build(path).decoder.layers[0].self_attn.q_proj.settings["default"].alpha == peft_alpha
    from_options = add_adapters_from_options(tiny_opt(), {"r": 2, "target_modules": "fc1"})
    assert from_options.decoder.layers[0].mlp.fc1.settings["default"].scale == peft_alpha / 2
    subparsers = argparse.ArgumentParser().add_subparsers()
    register(subparsers)
    args = subparsers.choices["train"].parse_args(["--spec", "opt-tiny", "--lora-r", "4", "--data", "x", "--out", "y"])
    model, _ = _model_and_tokenizer(args)
    assert model.decoder.layers[0].self_attn.v_proj.settings["default"].alpha == peft_alpha
    save_adapters(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    del config["lora_alpha"]  # a hand-written config without it means what it means to PEFT
    (tmp_path / "saved" / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_adapters(tiny_opt(), tmp_path / "saved")
    assert loaded.decoder.layers[1].self_attn.q_proj.settings["default"].alpha == peft_alpha


def test_an_adapter_added_without_alpha_computes_what_peft_does_without_lora_alpha():
    peft = peft_library()
    hf = hf_model()
    ours = optkit.from_transformers(copy.deepcopy(hf)).add_adapter(r=4, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4,
                                                         target_modules=["q_proj", "v_proj"])).eval()
    randomize_adapters(ours)
    with torch.no_grad():  # the same adapter weights in PEFT's modules: only the scaling is left to compare
        for path, module in lora_modules(ours).items():
            theirs = peft_model.base_model.model.get_submodule(checkpoint_path(ours, path))
            assert theirs.scaling["default"] == module.settings["default"].scale
            theirs.lora_A["default"].weight.copy_(module.lora_A["default"].weight)
            theirs.lora_B["default"].weight.copy_(module.lora_B["default"].weight)
    ids, mask = batch(seed=13)
    assert (logits(ours, ids, mask) - logits(peft_model, ids, mask))[mask.bool()].abs().max() <= ATOL
    with_adapter = logits(ours, ids, mask)
    ours.set_adapter(None)
    assert not torch.allclose(logits(ours, ids, mask), with_adapter, atol=1e-3)  # the adapter did change something

def test_from_pretrained_adds_or_loads_adapters(tmp_path):
    import optkit
    from optkit.adapters import adapter_names, add_adapters, save_adapters

    base = optkit.build("opt-tiny").eval()
    base.save_pretrained(tmp_path / "base")
    fresh = optkit.from_pretrained(tmp_path / "base", adapters={"r": 4, "alpha": 8, "target_modules": ["q_proj"]})
    assert adapter_names(fresh) == ["default"]
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} and \
        all("lora_" in n for n, p in fresh.named_parameters() if p.requires_grad)
    tuned = optkit.from_pretrained(tmp_path / "base")
    add_adapters(tuned, r=4, alpha=8, target_modules=["v_proj"])
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_()
    save_adapters(tuned, tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    loaded = optkit.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tuned(ids).logits, atol=1e-6)
    with pytest.raises(optkit.InputError, match="device_map"):
        optkit.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter", device_map="auto")


# -- the spec's `adapters:` block and the model's PEFT-style methods -----------------------------------------
ADAPTERS_YAML = """\
extends: opt-tiny
adapters:
  r: 4
  alpha: 8
  dropout: 0.05
  target_modules: [q_proj, fc1]
  use_rslora: true
  name: tuned
"""


def test_yaml_adapters_block_is_built_and_round_trips_through_spec_show(tmp_path, capsys):
    from optkit.cli import main

    path = tmp_path / "lora.yaml"
    path.write_text(ADAPTERS_YAML)
    spec = optkit.load_spec(path)
    assert spec.adapters is not None and spec.adapters.target_modules == ["q_proj", "fc1"]
    assert main(["spec", "show", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "adapters:\n  r: 4\n  alpha: 8.0\n  dropout: 0.05\n" in shown
    assert optkit.spec.spec_from_yaml(shown) == spec
    assert "adapters" not in optkit.load_spec("opt-tiny").to_yaml()  # no block: the spec prints as before
    model = optkit.build(path)
    assert adapter_names(model) == ["tuned"]
    wrapped = lora_paths(model)
    assert wrapped == [f"decoder.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.fc1")]
    layer = model.get_submodule(wrapped[0])
    assert layer.settings["tuned"] == optkit.adapters.LoRASettings(4, 8.0, 0.05, True)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def lora_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def test_yaml_adapters_block_errors_name_the_field_or_list_the_targets(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("extends: opt-tiny\nadapters: {r: 0, alpha: 8, lora_alpha: 8, target_modules: []}\n")
    with pytest.raises(optkit.SpecValidationError) as error:
        optkit.load_spec(path)
    message = str(error.value)
    assert "adapters.r: Input should be greater than 0" in message
    assert "adapters.lora_alpha: unknown field" in message and "adapters.target_modules: List should have" in message
    path.write_text("extends: opt-tiny\nadapters: {r: 2, alpha: 4, target_modules: [q_proj, query]}\n")
    with pytest.raises(optkit.InputError, match=r"unknown name\(s\) \['query'\]; the projections of this opt model "
                                                r"are q_proj, k_proj, v_proj, out_proj, fc1, fc2"):
        optkit.build(path)
    path.write_text("extends: opt-tiny\nadapters: {r: 2, alpha: 4, target_modules: all-linear}\n")
    assert len(lora_paths(optkit.build(path))) == 12


def test_model_methods_work_the_way_peft_users_expect(tmp_path):
    model = tiny_opt()
    ids, mask = batch(seed=12)
    base = logits(model, ids, mask)
    assert model.add_adapter(r=2, alpha=4) is model and model.add_adapter("b", r=3, alpha=3, target_modules="fc2")
    randomize_adapters(model)
    with_default = logits(model, ids, mask)
    model.set_adapter("b")
    with_b = logits(model, ids, mask)
    model.merge_adapters()
    assert lora_paths(model) and torch.allclose(logits(model, ids, mask), with_b, atol=1e-5)
    model.unmerge_adapters()
    model.set_adapter(None)
    assert torch.allclose(logits(model, ids, mask), base, atol=1e-5)
    model.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "b" / "adapter_model.safetensors").is_file()
    other = tiny_opt().load_adapter(tmp_path)
    assert torch.allclose(logits(other, ids, mask), with_default, atol=1e-6)
    with pytest.raises(optkit.InputError, match=r"adapters: unknown key\(s\) \['rank'\]"):
        model.add_adapter("c", rank=2, alpha=2)
