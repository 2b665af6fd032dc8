"""Spec -> module: every component comes from the registry; swapping a backend never changes weights."""

from __future__ import annotations

import logging

import pytest
import torch

import optkit
from optkit.errors import BackendUnavailableError, SpecValidationError
from optkit.interfaces import AttentionKernel, AttentionResult
from optkit.registration import Capabilities, Provider


class DoubleSoftmaxFreeAttention(AttentionKernel):
    """A third-party style kernel: eager math written differently (log-space)."""

    name = "logspace"

    def forward(self, query, key, value, mask, *, scale, dropout_p=0.0, need_weights=False):
        scores = (query @ key.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask.allowed(), float("-inf")).float()
        logz = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - logz).nan_to_num(0.0).to(query.dtype)
        return AttentionResult(probs @ value, None)


@pytest.fixture
def logspace_registered():
    with optkit.registry.providing(Provider("test-plugin", "acme-attention", "1.0")):
        optkit.registry.register("attention", "logspace", lambda params, ctx: DoubleSoftmaxFreeAttention(),
                                 capabilities=Capabilities(dtypes=frozenset({"float32"})))
    yield
    optkit.registry.unregister("attention", "logspace")


def test_new_backend_needs_no_builder_change(logspace_registered):
    torch.manual_seed(0)
    model = optkit.build("opt-tiny").eval()
    ids = torch.randint(3, 512, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        keys = list(model.state_dict())
        optkit.set_backend(model, attention="logspace")
        assert model.attention_backend == "logspace" and model.spec.decoder.attention.name == "logspace"
        assert list(model.state_dict()) == keys
        swapped = model(ids, attention_mask=mask).logits
    assert (swapped - reference)[mask.bool()].abs().max() <= 1e-5
    spec = optkit.load_spec("opt-tiny", decoder={"attention": "logspace"})
    assert optkit.build(spec).attention_backend == "logspace"


def test_build_overrides_and_dtype():
    model = optkit.build("opt-tiny", attention="sdpa", head="base", dtype=torch.bfloat16)
    assert model.attention_backend == "sdpa" and model.spec.head.name == "base"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(torch.tensor([[3, 4, 5]]))
    assert out.last_hidden_state.shape == (1, 3, 64) and out.logits is None


def test_parameter_names_follow_the_module_tree():
    names = set(optkit.build("opt-tiny-350m-style").state_dict())
    assert {"decoder.embed_tokens.weight", "decoder.embed_positions.weight", "decoder.project_in.weight",
            "decoder.project_out.weight", "decoder.layers.0.self_attn.q_proj.weight",
            "decoder.layers.1.mlp.fc2.bias", "decoder.layers.1.final_layer_norm.weight", "head.weight"} <= names
    assert "decoder.final_layer_norm.weight" not in names  # post-LN has no final norm


def test_unusable_explicit_choice_lists_reasons(logspace_registered):
    with pytest.raises(BackendUnavailableError) as info:
        optkit.build("opt-tiny", attention="logspace", dtype=torch.float16)
    assert str(info.value) == ("cannot build this model on cpu in float16: attention 'logspace': "
                               "dtype float16 (supported: float32)")
    model = optkit.build("opt-tiny", dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="attention 'logspace' cannot run on cpu with float16: dtype float16"):
        optkit.set_backend(model, attention="logspace")


def test_auto_picks_highest_priority_usable(caplog, logspace_registered):
    with caplog.at_level(logging.INFO, logger="optkit"):
        model = optkit.build("opt-tiny", attention="auto")
    assert model.attention_backend == "sdpa"  # registry.yaml: sdpa 10 > eager 0 (logspace: uncatalogued, 0)
    assert "attention=auto picked 'sdpa'" in caplog.text


def test_unknown_component_in_override():
    with pytest.raises(SpecValidationError) as info:
        optkit.build("opt-tiny", attention="flsh")
    assert "decoder.attention: unknown attention 'flsh' (available: eager, flash, sdpa, xformers); did you mean 'flash'?" in str(info.value)
    with pytest.raises(SpecValidationError, match="set_backend swaps attention only"):
        optkit.set_backend(optkit.build("opt-tiny"), linear="torch")


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = optkit.build("opt-tiny", dtype=torch.float32)  # preset dropout 0.1
    ids = torch.randint(3, 512, (1, 6))
    model.train()
    a, b = model(ids).logits, model(ids).logits
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
