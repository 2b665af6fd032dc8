"""The oneDNN linear backend computes what torch's linear computes, and stays in sync with its weights."""

from __future__ import annotations

import pytest
import torch

import optkit
from optkit import inference

pytestmark = pytest.mark.skipif(bool(optkit.registry.get("linear", "onednn").unavailable_reasons("cpu", torch.float32)),
                                reason="oneDNN is not available in this torch build")


def pair(dtype=torch.float32, spec="opt-tiny"):
    torch.manual_seed(0)
    reference = optkit.build(spec, attention="sdpa", dtype=dtype).eval()
    fast = optkit.build(spec, attention="sdpa", linear="onednn", dtype=dtype).eval()
    fast.load_state_dict(reference.state_dict())
    fast.tie_weights()
    return reference, fast


@pytest.mark.parametrize("spec", ["opt-tiny", "opt-tiny-350m-style"])
def test_same_logits_and_keys(spec):
    reference, fast = pair(spec=spec)
    assert list(reference.state_dict()) == list(fast.state_dict())
    ids = torch.randint(3, 512, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        expected, got = reference(ids, attention_mask=mask).logits, fast(ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-5


def test_greedy_tokens_equal_in_fp32():
    reference, fast = pair()
    with torch.no_grad():
        for w in reference.parameters():  # sharper logits: fewer near-ties, a stronger test
            w.mul_(4)
        fast.load_state_dict(reference.state_dict())
        fast.tie_weights()
    ids = torch.randint(3, 512, (2, 6))
    assert torch.equal(reference.generate(ids, max_new_tokens=20), fast.generate(ids, max_new_tokens=20))


def test_packed_copy_follows_weight_updates_and_training_uses_autograd():
    _, fast = pair()
    ids = torch.randint(3, 512, (1, 5))
    with torch.no_grad():
        before = fast(ids).logits
        fast.decoder.layers[0].mlp.fc1.weight.add_(0.5)
        after = fast(ids).logits
    assert not torch.equal(before, after)
    fast.train()
    fast(ids, labels=ids).loss.backward()
    assert fast.decoder.layers[0].mlp.fc1.weight.grad is not None


def test_bf16_close_to_fp32():
    reference, _ = pair()
    _, fast16 = pair(torch.bfloat16)
    ids = torch.randint(3, 512, (2, 7))
    with torch.no_grad():
        assert (fast16(ids).logits.float() - reference(ids).logits).abs().max() <= 5e-2


def test_refuses_cuda():
    reasons = optkit.registry.get("linear", "onednn").unavailable_reasons("cuda", torch.float16)
    assert reasons[:2] == ["device cuda (supported: cpu)", "dtype float16 (supported: bfloat16, float32)"]


def test_fusing_q_k_v_frees_the_packed_copies_of_the_old_weights():
    model = optkit.build("opt-tiny", linear="onednn").eval()
    attn = model.decoder.layers[0].self_attn
    ids = torch.randint(3, 500, (1, 5))
    with torch.no_grad():
        before = model(ids).logits  # packs q, k and v separately
    assert attn.q_proj._packed._packed is not None
    inference.prepare(model)
    attn = model.decoder.layers[0].self_attn
    assert attn.stacked
    assert all(p._packed._packed is None for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    with torch.no_grad():
        assert float((model(ids).logits - before).abs().max()) <= 1e-5
    assert attn.q_proj._packed._packed is None  # the fused layer computes q, k and v now
