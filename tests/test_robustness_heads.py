"""Adversarial audit of the forward API and the four heads: each probe either equals transformers (the oracle,
same weights, fp32 <= 1e-5) or fails with an optkit InputError naming the argument at fault.

Complements test_parity_hf.py (plain parity of each head), not repeating it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optkit.errors import InputError
from plugins.optkit_torch_components.heads import check_index_range
from tests.helpers import batch, hf_model, saved_pair, tiny_open_llama

pytest.importorskip("transformers")
ATOL = 1e-5
T = torch.tensor


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    hf, model = saved_pair(tmp_path_factory.mktemp("lm"))
    hf.config._attn_implementation = "eager"
    return hf, model


@pytest.fixture(scope="module")
def cls3(tmp_path_factory):
    return saved_pair(tmp_path_factory.mktemp("cls3"), head="sequence_classification", num_labels=3)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    return saved_pair(tmp_path_factory.mktemp("qa"), head="question_answering")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a - b).abs() <= ATOL).all())


# -- causal LM labels ----------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(bad=st.one_of(st.integers(99, 10**9), st.integers(-10**9, -1).filter(lambda v: v != -100)))
def test_out_of_vocab_labels_are_an_input_error(lm, bad):
    _, model = lm
    ids, _ = batch(seed=1)
    labels = ids.clone()
    labels[1, 4] = bad
    with pytest.raises(InputError, match=rf"labels holds {bad}, outside the valid range 0\.\.98"):
        model(ids, labels=labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_labels_are_an_input_error(lm, dtype):
    _, model = lm
    ids, _ = batch(seed=1)
    with pytest.raises(InputError, match="labels must be an integer tensor"):
        model(ids, labels=ids.to(dtype))


def test_int32_labels_give_transformers_long_label_loss(lm):
    hf, model = lm
    ids, mask = batch(seed=2, padding="right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        assert abs(model(ids, labels=labels.int()).loss - hf(ids, labels=labels).loss) <= ATOL


def test_all_ignored_labels_give_nan_as_transformers(lm):
    hf, model = lm
    ids, _ = batch(seed=2)
    labels = torch.full_like(ids, -100)
    with torch.no_grad():
        assert math.isnan(model(ids, labels=labels).loss) and math.isnan(hf(ids, labels=labels).loss)


def test_range_check_never_synchronises_an_accelerator():
    """On a non-CPU tensor the check is skipped (a min/max there would stall every training step)."""
    check_index_range("labels", torch.full((2, 3), 10**6, device="meta"), 5)
    with pytest.raises(InputError, match="labels holds 1000000"):
        check_index_range("labels", torch.full((2, 3), 10**6), 5)


# -- logits_to_keep ------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [T([[0, 1], [2, 3], [4, 8]]), T([[True] + [False] * 7 + [True]] * 3),
                                  T([[0, 8], [8, 0], [5, 5]]).int(), T(2)])
def test_tensor_logits_to_keep_equals_transformers(lm, keep):
    hf, model = lm
    ids, _ = batch(seed=3, padding="none")
    with torch.no_grad():
        theirs = hf(ids, logits_to_keep=keep if keep.dtype == torch.bool else keep.long()).logits  # int32: their error
        assert close(model(ids, logits_to_keep=keep).logits, theirs)


@pytest.mark.parametrize("keep,message", [
    (-1, "logits_to_keep=-1: must be >= 0"),
    (T([0.5]), "logits_to_keep tensor must hold integer positions"),
    (T([50]), "logits_to_keep holds 50"),
    (T([[0, 1]]), "one row per sequence"),
    (T([[True, False]] * 3), "bool mask must have the shape of input_ids"),
    ("last", "logits_to_keep must be an int or a tensor"),
])
def test_bad_logits_to_keep_is_an_input_error(lm, keep, message):
    _, model = lm
    ids, _ = batch(seed=3)
    with pytest.raises(InputError, match=message):
        model(ids, logits_to_keep=keep)


# -- return_dict, position_ids, inputs_embeds, attention_mask dtypes -------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"output_hidden_states": True}, {"labels": True, "output_attentions": True}])
def test_return_dict_false_is_transformers_tuple(lm, kwargs):
    hf, model = lm
    ids, _ = batch(seed=4, padding="none")
    kwargs = {**kwargs, "labels": ids} if kwargs.get("labels") else kwargs
    with torch.no_grad():
        ours = model(ids, return_dict=False, **kwargs)
        theirs = hf(ids, return_dict=False, use_cache=False, **kwargs)
    flat = lambda out: [t for item in out for t in (item if isinstance(item, tuple) else (item,))]
    assert isinstance(ours, tuple) and len(ours) == len(theirs) and len(flat(ours)) == len(flat(theirs))
    assert all(close(a, b) for a, b in zip(flat(ours), flat(theirs)))


def test_one_dimensional_position_ids_equal_transformers_and_rows(lm):
    hf, model = lm
    ids, _ = batch(seed=5, padding="none")
    positions = torch.arange(ids.shape[1])
    with torch.no_grad():
        ours = model(ids, position_ids=positions).logits
        assert close(ours, hf(ids, position_ids=positions).logits)
        assert close(ours, model(ids, position_ids=positions.expand_as(ids)).logits)


def test_open_llama_takes_one_dimensional_position_ids():
    model = tiny_open_llama()
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids, position_ids=torch.arange(6)).logits, model(ids).logits)


@pytest.mark.parametrize("positions,message", [
    (torch.arange(5), r"position_ids have shape \(5,\), expected \(3, 9\)"),
    (torch.zeros(2, 9, dtype=torch.long), r"position_ids have shape \(2, 9\)"),
    (torch.zeros(3, 1, 9, dtype=torch.long), r"position_ids have shape \(3, 1, 9\)"),
    (torch.arange(9.0), "position_ids must be an integer tensor, got torch.float32"),
])
def test_bad_position_ids_are_an_input_error(lm, positions, message):
    _, model = lm
    ids, _ = batch(seed=5)
    with pytest.raises(InputError, match=message):
        model(ids, position_ids=positions)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.long])
def test_inputs_embeds_of_another_dtype_are_an_input_error(lm, dtype):
    _, model = lm
    ids, _ = batch(seed=6)
    embeds = model.decoder.embed_tokens(ids).detach().to(dtype)
    with pytest.raises(InputError, match=f"inputs_embeds are {dtype} but the model computes in torch.float32"):
        model(inputs_embeds=embeds)


def test_both_ids_and_embeds_is_an_input_error(lm):
    _, model = lm
    ids, _ = batch(seed=6)
    with pytest.raises(InputError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.decoder.embed_tokens(ids))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int32, torch.long])
def test_attention_mask_dtypes_equal_transformers(lm, dtype):
    hf, model = lm
    ids, mask = batch(seed=7)
    with torch.no_grad():
        diff = model(ids, attention_mask=mask.to(dtype)).logits - hf(ids, attention_mask=mask.to(dtype)).logits
    assert diff[mask.bool()].abs().max() <= ATOL


# -- sequence classification ---------------------------------------------------------------------------
def test_int32_class_labels_give_transformers_long_label_loss(cls3):
    hf, model = cls3
    ids, mask = batch(seed=8)
    labels = T([0, 2, -100])
    with torch.no_grad():
        assert abs(model(ids, labels=labels.int()).loss - hf(ids, labels=labels).loss) <= ATOL


@pytest.mark.parametrize("labels,message", [
    (T([0, 3, 1]), r"labels holds 3, outside the valid range 0\.\.2"),
    (T([0, 1]), r"labels have shape \(2,\).*single_label_classification \(num_labels=3\) expects 3 class"),
    (T([[1.0, 0.0, 1.0]]), r"multi_label_classification \(num_labels=3\) expects shape \(3, 3\)"),
    (T([True, False, True]), r"multi_label_classification"),
    (T([[1, 0, 1]] * 3), r"expects 3 class indices; .*float: multi_label_classification"),  # 0/1 long targets
])
def test_bad_class_labels_are_an_input_error(cls3, labels, message):
    _, model = cls3
    ids, _ = batch(seed=8)
    with pytest.raises(InputError, match=message):
        model(ids, labels=labels)


@pytest.mark.parametrize("problem_type,num_labels,labels,message", [
    ("single_label_classification", 3, T([0.0, 2.0, 1.0]), "labels must be an integer tensor, got torch.float32"),
    ("regression", 2, T([0.5, 1.0, 2.0]), r"regression \(num_labels=2\) expects shape \(3, 2\)"),
    (None, 1, T([[0.5, 1.0, 2.0]] * 2), r"regression \(num_labels=1\) expects 3 values"),
])
def test_labels_the_problem_type_cannot_use_are_an_input_error(tmp_path, problem_type, num_labels, labels, message):
    _, model = saved_pair(tmp_path, head="sequence_classification", num_labels=num_labels, problem_type=problem_type)
    with pytest.raises(InputError, match=message):
        model(batch(seed=9)[0], labels=labels)


def test_integer_labels_with_one_label_are_regression_as_in_transformers(tmp_path):
    hf, model = saved_pair(tmp_path, head="sequence_classification", num_labels=1)
    ids, mask = batch(seed=9, padding="right")
    with torch.no_grad():
        assert abs(model(ids, attention_mask=mask, labels=T([1, 0, 3])).loss
                   - hf(ids, attention_mask=mask, labels=T([1, 0, 3])).loss) <= ATOL


def test_without_pad_token_one_row_and_embeds_pool_the_last_position(tmp_path):
    hf = hf_model("sequence_classification", pad_token_id=None)
    hf.save_pretrained(tmp_path / "m")
    import optkit

    model = optkit.from_pretrained(tmp_path / "m", head="sequence_classification")
    ids, _ = batch(seed=10, padding="none")
    with torch.no_grad():
        assert close(model(ids[:1]).logits, hf(ids[:1]).logits)
        with pytest.warns(UserWarning, match="inputs_embeds pools the last position"):
            got = model(inputs_embeds=model.decoder.embed_tokens(ids[:1])).logits
        assert close(got, hf(inputs_embeds=hf.model.decoder.embed_tokens(ids[:1])).logits)
        with pytest.raises(InputError, match="needs a pad token; set tokens.pad_token_id"):
            model(ids)


# -- question answering --------------------------------------------------------------------------------
@pytest.mark.parametrize("start,end", [
    (T([[1], [3], [50]]).int(), T([[2], [4], [5]]).int()),  # (batch, 1) int32, one out of range
    (T([9, 50, 99]), T([9, 20, 30])),  # all clamped to seq_len and ignored: nan, as transformers
])
def test_answer_positions_equal_transformers(qa, start, end):
    hf, model = qa
    ids, mask = batch(seed=11, padding="right")
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, start_positions=start, end_positions=end).loss
        theirs = hf(ids, attention_mask=mask, start_positions=start.long(), end_positions=end.long()).loss
    assert (math.isnan(ours) and math.isnan(theirs)) or abs(ours - theirs) <= ATOL


@pytest.mark.parametrize("start,end,message", [
    (T([1.0, 2.0, 3.0]), T([1, 2, 3]), "start_positions must be an integer tensor"),
    (T([1, 2]), T([1, 2]), r"start_positions has shape \(2,\), expected \(3,\) or \(3, 1\)"),
    (T([[1, 2]] * 3), T([1, 2, 3]), r"start_positions has shape \(3, 2\)"),
    (T([1, 2, 3]), T([[[1]], [[2]], [[3]]]), r"end_positions has shape \(3, 1, 1\)"),
    (T([1, 2, 3]), None, "only start_positions given"),
    (None, T([1, 2, 3]), "only end_positions given"),
])
def test_bad_answer_positions_are_an_input_error(qa, start, end, message):
    _, model = qa
    with pytest.raises(InputError, match=message):
        model(batch(seed=11)[0], start_positions=start, end_positions=end)


# -- targets a head cannot use ---------------------------------------------------------------------------
def test_targets_a_head_computes_no_loss_from_are_an_input_error(tmp_path, lm, qa, cls3):
    ids, _ = batch(seed=12)
    _, base = saved_pair(tmp_path, head="base")
    with pytest.raises(InputError, match="labels given, but the base head computes no loss"):
        base(ids, labels=ids)
    with pytest.raises(InputError, match="labels given, but the question_answering head"):
        qa[1](ids, labels=ids)
    with pytest.raises(InputError, match="start_positions and end_positions given, but the causal_lm head.*"
                                         "head='question_answering'"):
        lm[1](ids, start_positions=T([1, 2, 3]), end_positions=T([1, 2, 3]))
    with pytest.raises(InputError, match="start_positions given, but the sequence_classification head"):
        cls3[1](ids, labels=T([0, 1, 2]), start_positions=T([1, 2, 3]))


# -- Open-Llama heads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("head,labels,message", [
    ("causal_lm", lambda ids: ids + 1000, r"labels holds \d+, outside the valid range 0\.\.127"),
    ("causal_lm", lambda ids: ids.float(), "labels must be an integer tensor"),
    ("sequence_classification", lambda ids: T([0, 7]), r"labels holds 7, outside the valid range 0\.\.1"),
])
def test_open_llama_heads_check_labels(head, labels, message):
    model = tiny_open_llama(head=head)
    ids = torch.randint(3, 128, (2, 5))
    with pytest.raises(InputError, match=message):
        model(ids, labels=labels(ids))
