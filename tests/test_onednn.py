"""The oneDNN linear backend computes what torch's linear computes, stays in sync with its weights, and holds
no second copy of them where oneDNN's layout is the plain one (issue 16).

Most tests run both ways the backend can work: ``in_place`` (oneDNN reads the parameters; fp32 here) and
``packed`` (a packed copy, as on CPUs whose oneDNN prefers a blocked layout; forced by hiding the layout probe).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import optkit
import optkit_onednn
from optkit import inference, torch_internals
from optkit.benchmarking import model_bytes
from optkit.testing.component_kits import check_component

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


@contextlib.contextmanager
def weights_held(path: str):
    """``in_place``: as this torch decides (fp32 here: no copy); ``packed``: a packed copy, as with a blocked layout."""
    if path == "packed":
        with torch_internals.disabled("mkldnn_nbytes"):  # layout unknown -> the backend packs a copy
            yield
    else:
        yield


@pytest.fixture(params=["in_place", "packed"])
def path(request):
    with weights_held(request.param):
        yield request.param


@pytest.fixture
def packed_path():
    with weights_held("packed"):
        yield


def used_for_inference(model, steps: int = 4):
    """Prepared (q/k/v stacked) and decoded with, so every packed copy that would exist does."""
    inference.prepare(model)
    ids = torch.randint(3, 512, (2, 6))
    model.generate(ids, max_new_tokens=steps)
    return model


def assert_same_tensors(expected: dict, got: dict) -> None:
    assert list(expected) == list(got)
    for name, tensor in expected.items():
        assert got[name].layout == torch.strided and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_fp32_decoding_holds_no_second_copy_of_the_weights():
    if not torch_internals.mkldnn_weight_layout_is_plain(torch.float32):
        pytest.skip("this CPU's oneDNN keeps fp32 weights in a blocked layout: a packed copy is needed here")
    reference, fast = pair(spec="opt-tiny-350m-style")
    dense = model_bytes(reference)
    used_for_inference(fast)
    assert fast.decoder.layers[0].self_attn.stacked
    assert optkit_onednn.packed_bytes(fast) == 0
    assert model_bytes(fast) + optkit_onednn.packed_bytes(fast) <= 1.1 * dense


def test_the_memory_count_sees_packed_copies(packed_path):
    reference, fast = pair()
    used_for_inference(fast)
    linears = sum(m.weight.nelement() * 4 for m in fast.modules() if isinstance(m, optkit_onednn.OneDNNLinear))
    head = fast.head.weight.nelement() * 4
    assert optkit_onednn.packed_bytes(fast) >= linears + head  # the projections (stacked) and the tied head
    assert model_bytes(fast) + optkit_onednn.packed_bytes(fast) > 1.1 * model_bytes(reference)


def test_weight_layout_probe_is_per_dtype_and_unsure_means_pack():
    assert isinstance(torch_internals.mkldnn_weight_layout_is_plain(torch.float32), bool)
    with torch_internals.disabled("mkldnn_nbytes"):
        assert not torch_internals.mkldnn_weight_layout_is_plain(torch.float32)
    weight = torch.randn(48, 40)
    assert torch.equal(torch_internals.mkldnn_pack(weight).to_dense(), weight)


@pytest.mark.parametrize("fmt", ["transformers", "optkit"])
def test_state_dict_parameters_and_saves_after_inference_are_the_dense_weights(path, fmt, tmp_path):
    reference, fast = pair()
    used_for_inference(fast)
    assert_same_tensors(reference.state_dict(), fast.state_dict())
    assert_same_tensors(dict(reference.named_parameters()), dict(fast.named_parameters()))
    fc1 = fast.decoder.layers[1].mlp.fc1
    assert torch.equal(fc1.weight, reference.decoder.layers[1].mlp.fc1.weight)
    fast.save_pretrained(tmp_path, format=fmt)
    loaded = optkit.from_pretrained(tmp_path, linear="torch")
    assert_same_tensors(reference.state_dict(), loaded.state_dict())
    back = optkit.from_pretrained(tmp_path, linear="onednn", attention="sdpa").eval()
    ids = torch.randint(3, 512, (2, 6))
    assert torch.equal(reference.generate(ids, max_new_tokens=6), back.generate(ids, max_new_tokens=6))


def test_training_after_inference_gives_the_plain_models_gradients_and_steps(path):
    reference, fast = pair()
    used_for_inference(fast)
    ids = torch.randint(3, 512, (2, 9))
    for model in (reference, fast):
        model.train()
        torch.manual_seed(5)  # the same dropout masks
        model(ids, labels=ids).loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    for (name, expected), got in zip(reference.named_parameters(), fast.parameters()):
        assert torch.allclose(got.grad, expected.grad, atol=1e-5), name
        assert torch.allclose(got, expected, atol=1e-5), name
    reference.eval(), fast.eval()
    with torch.no_grad():  # the updated weights, not a stale packed copy, serve inference again
        assert (fast(ids).logits - reference(ids).logits).abs().max() <= 1e-4


def test_lora_on_a_onednn_model_trains_and_infers_like_on_torch_linears(path):
    reference, fast = pair()
    used_for_inference(fast)
    for model in (reference, fast):
        torch.manual_seed(3)
        model.add_adapter(r=4, alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)  # a zero B would hide the adapter
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(3, 512, (2, 7))
    with torch.no_grad():
        assert (fast.eval()(ids).logits - reference.eval()(ids).logits).abs().max() <= 1e-5
    for model in (reference, fast):
        torch.manual_seed(5)  # the same dropout masks
        model.train()(ids, labels=ids).loss.backward()
    trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    got = dict(fast.named_parameters())
    for name, p in trained:
        assert torch.allclose(got[name].grad, p.grad, atol=1e-5), name


def test_to_another_dtype_after_inference_converts_the_dense_values(path):
    reference, fast = pair()
    used_for_inference(fast)
    assert_same_tensors(reference.to(torch.bfloat16).state_dict(), fast.to(torch.bfloat16).state_dict())
    ids = torch.randint(3, 512, (1, 5))
    with torch.no_grad():
        assert (fast(ids).logits.float() - reference(ids).logits.float()).abs().max() <= 1e-2


def test_linear_equals_torch_linear_on_random_shapes(path):
    report = check_component("linear", "onednn", reference="torch", max_examples=4, only=["equivalence"])
    assert report.passed == ["equivalence"]


def test_fusing_q_k_v_frees_the_packed_copies_of_the_old_weights(packed_path):
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
