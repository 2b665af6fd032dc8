"""Audit of LoRA fine-tuning against what PEFT / transformers users expect.

PEFT is the oracle for the numbers (gradients of A and B and three AdamW steps, fp32, <= 1e-5; the load/save
round trips are tests/test_adapters.py's); transformers' OPTForCausalLM for the loss on padded batches. The rest
are inputs that used to fail deep inside torch or train silently on the wrong thing: each must be one optkit
error naming the thing at fault.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
from optkit import training
from optkit.adapters import (adapter_parameters, add_adapters, load_adapters, merge_adapters, save_adapters,
                             set_adapter)
from optkit.adapters.attach import checkpoint_path, lora_modules
from optkit.bundled import default_model_dir
from tests.helpers import batch, hf_model

ATOL = 1e-5
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0)  # OPTConfig's default dropout would differ per library
CORPUS = "def add(a, b):\n    return a + b\n" * 40


def peft_pair(case: dict):
    """(PEFT model, optkit model) on the same base weights, with the same non-zero adapter weights."""
    peft = pytest.importorskip("peft")
    hf = hf_model(**NO_DROPOUT)
    ours = optkit.from_transformers(copy.deepcopy(hf))
    add_adapters(ours, r=case["r"], alpha=case["lora_alpha"], target_modules=case["target_modules"],
                 use_rslora=case.get("use_rslora", False))
    theirs = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **case))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, module in lora_modules(ours).items():
            module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=g) / 5)
            twin = theirs.base_model.model.get_submodule(checkpoint_path(ours, path))
            for kind in ("lora_A", "lora_B"):
                getattr(twin, kind)["default"].weight.copy_(getattr(module, kind)["default"].weight)
    return theirs.train(), ours.train()


@pytest.mark.parametrize("case", [dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "out_proj"]),
                                  dict(r=3, lora_alpha=-5, target_modules=["q_proj", "k_proj", "v_proj"],
                                       use_rslora=True)], ids=["mlp-out", "qkv-rslora-negative-alpha"])
def test_gradients_and_three_adamw_steps_equal_peft(case):
    theirs, ours = peft_pair(case)
    ids, mask = batch(seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    ours_loss = ours(ids, attention_mask=mask, labels=labels).loss
    theirs_loss = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(ours_loss.item() - theirs_loss.item()) <= ATOL
    ours_loss.backward()
    theirs_loss.backward()
    for path, module in lora_modules(ours).items():
        twin = theirs.base_model.model.get_submodule(checkpoint_path(ours, path))
        for kind in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(module, kind)["default"].weight.grad,
                                       getattr(twin, kind)["default"].weight.grad, rtol=0, atol=ATOL)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    for _ in range(2):  # three steps: the gradients above, then two more
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        ours(ids, attention_mask=mask, labels=labels).loss.backward()
        theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    with torch.no_grad():
        difference = ours.eval()(ids, attention_mask=mask).logits - theirs.eval()(input_ids=ids, attention_mask=mask).logits
    assert difference[mask.bool()].abs().max() <= ATOL


@settings(max_examples=6, deadline=None)
@given(targets=st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]), min_size=1,
                        max_size=6, unique=True),
       r=st.integers(1, 5), alpha=st.sampled_from([1, 8, 16, -4]), rslora=st.booleans())
def test_forward_and_merged_forward_equal_peft_for_any_targets(targets, r, alpha, rslora):
    theirs, ours = peft_pair(dict(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora))
    ids, mask = batch(seed=4)
    real = mask.bool()
    with torch.no_grad():
        assert (ours.eval()(ids, attention_mask=mask).logits - theirs.eval()(input_ids=ids, attention_mask=mask).logits
                )[real].abs().max() <= ATOL
        merge_adapters(ours)
        theirs.merge_adapter()
        assert (ours(ids, attention_mask=mask).logits - theirs(input_ids=ids, attention_mask=mask).logits
                )[real].abs().max() <= ATOL


@pytest.mark.parametrize("padding", ["left", "right"])
def test_loss_on_a_padded_batch_is_transformers_loss(padding):
    hf = hf_model(**NO_DROPOUT)
    ours = optkit.from_transformers(copy.deepcopy(hf)).eval()
    ids, mask = batch(seed=2, padding=padding)
    with torch.no_grad():
        for labels in (ids.masked_fill(mask == 0, -100), ids):  # pads ignored via -100, or (as in HF) not at all
            expected = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
            assert abs(ours(ids, attention_mask=mask, labels=labels).loss.item() - expected.item()) <= ATOL


# -- bad inputs: one optkit error each --------------------------------------------------------------------
def base_model(bundled: bool = False) -> optkit.Model:
    """opt-tiny where nothing is tokenized; the bundled model (its tokenizer's vocabulary) where training runs."""
    torch.manual_seed(0)
    if bundled:
        return optkit.from_pretrained(default_model_dir(), dtype=torch.float32)
    return optkit.build("opt-tiny", dtype=torch.float32)


def small_lora_model(bundled: bool = False) -> optkit.Model:
    return add_adapters(base_model(bundled), r=2)


def fit(model, tmp_path, corpus=CORPUS, **settings):
    settings = {"steps": 1, "batch_size": 1, "seq_len": 16, "warmup_steps": 0, "eval_every": 1,
                "stream": io.StringIO(), **settings}
    return training.train(model, corpus, out_dir=tmp_path, **settings)


@pytest.mark.parametrize("setting, value", [("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf),
                                            ("steps", 0), ("steps", 1.5), ("batch_size", 0), ("seq_len", True),
                                            ("warmup_steps", -1), ("betas", (0.9, 1.5)), ("betas", (0.9,))])
def test_bad_training_settings_are_input_errors_naming_the_setting(tmp_path, setting, value):
    with pytest.raises(optkit.InputError, match=rf"bad training settings: .*{setting} must be"):
        fit(small_lora_model(), tmp_path, **{setting: value})
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("corpus", [[], "", "  \n\n ", "hi"], ids=["no-documents", "empty-string", "blank", "too-short"])
def test_an_empty_or_too_short_corpus_is_an_input_error(tmp_path, corpus):
    model = small_lora_model(bundled=True)
    with pytest.raises(optkit.InputError, match=r"training corpus .*(no text|tokens; seq_len=64)"):
        fit(model, tmp_path / "out", corpus=corpus, seq_len=64)


def loaded_for_inference(tmp_path, bundled: bool = False):
    save_adapters(small_lora_model(bundled), tmp_path / "adapter")
    return load_adapters(base_model(bundled), tmp_path / "adapter")


def merged(tmp_path):
    model = small_lora_model()
    merge_adapters(model)
    return model


def base_alone(tmp_path):
    model = small_lora_model()
    set_adapter(model, None)
    return model


def frozen_without_adapters(tmp_path):
    return base_model().requires_grad_(False)


@pytest.mark.parametrize("make, message", [
    (loaded_for_inference, r"adapter 'default' does not require grad .*trainable=True"),
    (merged, r"adapter 'default' is merged into the weights.*unmerge_adapters"),
    (base_alone, r"no adapter is active .*set_adapter\(model, 'default'\)"),
    (frozen_without_adapters, r"no parameter of this model requires grad.*requires_grad_\(True\).*add_adapter"),
], ids=["loaded-for-inference", "merged", "no-active-adapter", "all-frozen"])
def test_training_that_would_change_nothing_is_refused(tmp_path, make, message):
    model = make(tmp_path)
    with pytest.raises(optkit.InputError, match=message):
        fit(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_inactive_trainable_adapter_does_not_hide_a_frozen_active_one(tmp_path):
    model = loaded_for_inference(tmp_path, bundled=True)
    add_adapters(model, r=2, name="other")  # trainable, but inactive: it gets no gradient
    with pytest.raises(optkit.InputError, match="adapter 'default' does not require grad"):
        fit(model, tmp_path / "out")
    model.set_adapter("other")  # now the trainable one runs: training goes ahead and changes only it
    before = {name: p.clone() for name, p in adapter_parameters(model).items()}
    fit(model, tmp_path / "out", lr=1e-2)
    changed = {name for name, p in adapter_parameters(model).items() if not torch.equal(p, before[name])}
    assert changed and all(".other." in name for name in changed)


def test_alpha_zero_is_refused_as_an_adapter_that_never_learns():
    with pytest.raises(optkit.InputError, match=r"alpha must be a finite non-zero number.*got 0"):
        add_adapters(optkit.build("opt-tiny"), r=4, alpha=0)


def test_a_lora_run_refuses_base_weights_it_would_not_checkpoint(tmp_path):
    model = small_lora_model()
    model.decoder.final_layer_norm.weight.requires_grad_(True)  # PEFT's modules_to_save, which optkit does not do
    with pytest.raises(optkit.InputError, match=r"decoder\.final_layer_norm\.weight requires grad, but a run with "
                                                r"LoRA adapters checkpoints only the adapters"):
        fit(model, tmp_path / "out")


def test_an_unknown_training_setting_is_named_not_a_type_error(tmp_path):
    with pytest.raises(optkit.InputError, match=r"unknown setting\(s\) \['gradient_accumulation_steps'\]; the extra "
                                                r"settings are betas, eval_windows, min_lr_ratio, save_every"):
        fit(small_lora_model(), tmp_path, gradient_accumulation_steps=4)


@pytest.mark.parametrize("r", [0, -2, 2.5, True])
def test_memory_estimate_refuses_a_rank_that_is_not_a_positive_integer(r):
    from optkit.adapters.memory import count, memory_table

    with pytest.raises(optkit.InputError, match=r"memory estimate: r must be a positive integer \(the rank\)"):
        count("opt-tiny", r=r)
    with pytest.raises(optkit.InputError, match="r must be a positive integer"):
        memory_table(["opt-tiny"], r=r)


@pytest.mark.parametrize("changed", [dict(alpha=32), dict(use_rslora=True), dict(dropout=0.1)],
                         ids=["alpha", "rslora", "dropout"])
def test_resuming_with_other_adapter_settings_of_the_same_shape_is_refused(tmp_path, changed):
    settings = dict(steps=2, stop_at=1, batch_size=1, seq_len=16)
    first = base_model(bundled=True).add_adapter(r=2, alpha=16)
    fit(first, tmp_path, **settings)
    other = base_model(bundled=True).add_adapter(r=2, **{"alpha": 16, **changed})
    with pytest.raises(optkit.CheckpointError, match=r"adapter 'default' was trained with r=2, alpha=16.0, "
                                                     r"dropout=0.0, use_rslora=False, but this model's has"):
        fit(other, tmp_path, **{**settings, "stop_at": None})
    same = base_model(bundled=True).add_adapter(r=2, alpha=16)
    assert fit(same, tmp_path, **{**settings, "stop_at": None}).resumed_from == 1
