"""optkit computes what transformers computes: same weights => same outputs (fp32, real positions, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import VARIANTS, batch, saved_pair

pytest.importorskip("transformers")
ATOL = 1e-5
BACKENDS = ["eager", "sdpa"]
PADDINGS = ["none", "left", "right"]


def max_err_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("attention", BACKENDS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_lm_logits(tmp_path, variant, attention):
    hf, model = saved_pair(tmp_path, attention=attention, **VARIANTS[variant])
    for padding in PADDINGS:
        ids, mask = batch(seed=1, padding=padding)
        with torch.no_grad():
            expected = hf(ids, attention_mask=mask).logits
            got = model(ids, attention_mask=mask).logits
        assert got.shape == expected.shape
        assert max_err_real(got, expected, mask) <= ATOL, padding


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projected"])
def test_no_mask_equals_all_ones(tmp_path, variant):
    hf, model = saved_pair(tmp_path, **VARIANTS[variant])
    ids, mask = batch(seed=2, padding="none")
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= ATOL
        assert torch.equal(model(ids).logits, model(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projected"])
@pytest.mark.parametrize("attention", BACKENDS)
def test_base_model_hidden_states(tmp_path, variant, attention):
    hf, model = saved_pair(tmp_path, head="base", attention=attention, **VARIANTS[variant])
    ids, mask = batch(seed=3)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_hidden_states=True)
        got = model(ids, attention_mask=mask, output_hidden_states=True)
    assert max_err_real(got.last_hidden_state, expected.last_hidden_state, mask) <= ATOL
    assert got.last_hidden_state.shape[-1] == hf.config.word_embed_proj_dim
    assert len(got.hidden_states) == len(expected.hidden_states) == hf.config.num_hidden_layers + 1
    for ours, theirs in zip(got.hidden_states, expected.hidden_states):
        assert ours.shape == theirs.shape
        assert max_err_real(ours, theirs, mask) <= ATOL


def test_attention_weights_eager(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=37, max_position_embeddings=64)
    config._attn_implementation = "eager"
    hf = transformers.OPTForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "m")
    import optkit

    model = optkit.from_pretrained(tmp_path / "m", attention="eager")
    ids, mask = batch(seed=4)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, output_attentions=True).attentions
        got = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(expected) == 2
    query_rows = mask.bool()[:, None, :, None].expand_as(got[0])
    for ours, theirs in zip(got, expected):
        assert (ours - theirs)[query_rows].abs().max() <= ATOL


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projected"])
def test_sequence_classification(tmp_path, variant, padding):
    hf, model = saved_pair(tmp_path, head="sequence_classification", num_labels=3, **VARIANTS[variant])
    ids, mask = batch(seed=5, padding=padding)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels)
        got = model(ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (3, 3)
    assert (got.logits - expected.logits).abs().max() <= ATOL
    assert abs(got.loss - expected.loss) <= ATOL


@pytest.mark.parametrize("num_labels,labels", [
    (1, torch.tensor([0.5, -1.0, 2.0])),  # regression
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),  # multi-label
])
def test_sequence_classification_problem_types(tmp_path, num_labels, labels):
    hf, model = saved_pair(tmp_path, head="sequence_classification", num_labels=num_labels)
    ids, mask = batch(seed=6)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels)
        got = model(ids, attention_mask=mask, labels=labels)
    assert abs(got.loss - expected.loss) <= ATOL


def test_sequence_classification_pools_rightmost_non_pad(tmp_path):
    _, model = saved_pair(tmp_path, head="sequence_classification")
    ids = torch.tensor([[1, 1, 5, 6], [5, 6, 1, 1], [5, 1, 6, 1], [1, 1, 1, 1]])
    assert model.head.pool_index(ids, 4, 4).tolist() == [3, 1, 2, 0]


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projected"])
def test_question_answering(tmp_path, variant):
    hf, model = saved_pair(tmp_path, head="question_answering", **VARIANTS[variant])
    ids, mask = batch(seed=7, padding="right")
    start, end = torch.tensor([1, 3, 50]), torch.tensor([2, -4, 99])  # out of range: clamped and ignored
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, start_positions=start, end_positions=end)
        got = model(ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert max_err_real(got.start_logits, expected.start_logits, mask) <= ATOL
    assert max_err_real(got.end_logits, expected.end_logits, mask) <= ATOL
    assert abs(got.loss - expected.loss) <= ATOL


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projected", "untied"])
def test_causal_lm_loss(tmp_path, variant):
    hf, model = saved_pair(tmp_path, **VARIANTS[variant])
    ids, mask = batch(seed=8, padding="right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, labels=labels).loss
        got = model(ids, attention_mask=mask, labels=labels).loss
    assert abs(got - expected) <= ATOL


@pytest.mark.parametrize("attention", BACKENDS)
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projected"])
def test_cached_decoding_matches_transformers_full_pass(tmp_path, variant, attention):
    hf, model = saved_pair(tmp_path, attention=attention, **VARIANTS[variant])
    ids, mask = batch(seed=9, length=10)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for t in range(6, 10):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
            pieces.append(out.logits)
    got = torch.cat(pieces, dim=1)
    assert max_err_real(got, expected, mask) <= ATOL


def test_inputs_embeds_and_position_ids(tmp_path):
    hf, model = saved_pair(tmp_path, **VARIANTS["post_ln_projected"])
    ids, mask = batch(seed=10, padding="none")
    embeds = model.decoder.embed_tokens(ids)
    assert embeds.shape[-1] == 16  # word_embed_proj_dim, as transformers expects for opt-350m
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds, position_ids=positions).logits
        got = model(inputs_embeds=embeds, position_ids=positions).logits
        assert (got - expected).abs().max() <= ATOL
        assert (got - model(ids).logits).abs().max() <= ATOL


def test_logits_to_keep(tmp_path):
    hf, model = saved_pair(tmp_path)
    ids, mask = batch(seed=11)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        close = lambda a, b: a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0)  # GEMM shape changes bits
        assert close(model(ids, attention_mask=mask, logits_to_keep=1).logits, full[:, -1:])
        assert torch.equal(model(ids, attention_mask=mask, logits_to_keep=0).logits, full)
        picked = torch.tensor([0, 4])
        assert close(model(ids, attention_mask=mask, logits_to_keep=picked).logits, full[:, picked])
        assert (model(ids, attention_mask=mask, logits_to_keep=3).logits
                - hf(ids, attention_mask=mask, logits_to_keep=3).logits)[1:].abs().max() <= ATOL
