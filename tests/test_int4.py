"""4-bit linears (``linear="nf4"`` / ``"fp4"``, plugins/optkit_int8/fourbit.py): bitsandbytes' block-wise 4-bit
weights run forward and backward (to the input) on CPU with bitsandbytes >= 0.50, so QLoRA-style fine-tuning
(frozen 4-bit base + LoRA adapters) works on this machine.

Quality: the bundled model's held-out perplexity with nf4 weights stays within NF4_MARGIN of its fp32
perplexity (measured with the bundled model of 2026-11-29: fp32 40.06, nf4 40.54 (+1.2 %), fp4 40.99 (+2.3 %)).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
import optkit_int8
from optkit.adapters import adapter_parameters
from optkit.bundled import default_model_dir
from optkit.tokenizer import Tokenizer
from optkit.training import eval_windows, perplexity

MODEL_DIR = default_model_dir()
NF4_MARGIN = 1.03  # nf4 perplexity <= 1.03 x fp32 perplexity on heldout.txt
FP4_MARGIN = 1.05
REASONS = {q: optkit.registry.get("linear", q).unavailable_reasons("cpu", torch.float32) for q in ("nf4", "fp4")}
needs_4bit = pytest.mark.skipif(bool(REASONS["nf4"] or REASONS["fp4"]), reason=f"4-bit on CPU: {REASONS}")


def layer(in_features: int, out_features: int, quant_type: str = "nf4", compute_dtype=None, double_quant=False):
    from optkit_int8.fourbit import FourBitLinear

    module = FourBitLinear(in_features, out_features, bias=True, quant_type=quant_type, compute_dtype=compute_dtype,
                           double_quant=double_quant)
    torch.nn.init.normal_(module.weight, std=0.05)
    torch.nn.init.normal_(module.bias, std=0.05)
    return module


@needs_4bit
@settings(max_examples=10, deadline=None)
@given(in_features=st.sampled_from([64, 96, 256]), out_features=st.integers(1, 80), rows=st.integers(1, 5),
       quant_type=st.sampled_from(["nf4", "fp4"]), double_quant=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_and_backward_follow_the_dequantized_weight(in_features, out_features, rows, quant_type, double_quant,
                                                            seed):
    torch.manual_seed(seed)
    module = layer(in_features, out_features, quant_type, double_quant=double_quant)
    dense = module.weight.detach().clone()
    x = torch.randn(2, rows, in_features, requires_grad=True)
    out = module(x)
    assert module.is_quantized and module.weight.dtype == torch.uint8 and module.weight.numel() * 2 == dense.numel()
    weight = module.dequantized_weight()
    assert weight.shape == dense.shape and (weight - dense).abs().max() <= 0.25 * dense.abs().max()  # half a 4-bit step
    torch.testing.assert_close(out, x @ weight.T + module.bias, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    expected = 2 * (x @ weight.T + module.bias).detach() @ weight
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)
    assert module.weight.grad is None and not module.weight.requires_grad  # the 4-bit weight never trains
    assert module.bias.grad is not None


@needs_4bit
def test_compute_dtype_and_state_dict_round_trip():
    torch.manual_seed(0)
    module = layer(64, 32, compute_dtype=torch.bfloat16, double_quant=True)
    x = torch.randn(3, 64)
    out = module(x)
    assert out.dtype == torch.float32 and "compute=bfloat16" in repr(module)
    torch.testing.assert_close(out, x @ module.dequantized_weight().T + module.bias, rtol=0.05, atol=0.05)
    state = module.state_dict()
    assert state["weight"].dtype == torch.float32 and state["weight"].shape == (32, 64)  # dequantized for checkpoints
    other = layer(64, 32)
    other(x)  # quantized already: loading float weights re-quantizes them
    other.load_state_dict(state)
    assert other.is_quantized and torch.equal(other.dequantized_weight(), module.dequantized_weight())
    with pytest.raises(RuntimeError, match="a 4-bit linear loads float weights"):
        other.load_state_dict({**state, "weight": torch.zeros(32, 64, dtype=torch.uint8)})


def heldout_perplexity(linear: object) -> float:
    tokenizer = Tokenizer.from_directory(MODEL_DIR)
    text = (MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")
    windows = eval_windows(torch.tensor(tokenizer.encode(text)), seq_len=256, max_windows=1000)
    return perplexity(optkit.from_pretrained(MODEL_DIR, linear=linear, dtype=torch.float32), windows)


@needs_4bit
def test_bundled_model_heldout_perplexity_with_4bit_weights_is_within_the_stated_margin():
    reference = heldout_perplexity("torch")
    nf4 = heldout_perplexity({"name": "nf4", "params": {"double_quant": True}})
    fp4 = heldout_perplexity("fp4")
    assert reference < nf4 < reference * NF4_MARGIN, f"fp32 {reference:.3f}, nf4 {nf4:.3f}"
    assert reference < fp4 < reference * FP4_MARGIN, f"fp32 {reference:.3f}, fp4 {fp4:.3f}"


@needs_4bit
def test_lora_on_an_nf4_base_trains_only_adapters_and_refuses_to_merge():
    model = optkit.from_pretrained(MODEL_DIR, linear="nf4", dtype=torch.float32)
    torch.manual_seed(0)
    model.add_adapter(r=4, alpha=8, target_modules=["q_proj", "v_proj", "fc1", "fc2"])
    assert type(model.decoder.layers[0].mlp.fc1.base).__name__ == "FourBitLinear"
    packed = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert packed  # the projections really are 4-bit
    text = (MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")
    ids = torch.tensor(Tokenizer.from_directory(MODEL_DIR).encode(text)[:129]).reshape(1, -1)
    optimizer = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == set(adapter_parameters(model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
    with pytest.raises(optkit.InputError, match=r"cannot merge adapter 'default' into decoder\.layers\.0\..*"
                                                r"stored in 4 bits: folding the adapter in would re-quantize"):
        model.merge_adapters()


@needs_4bit
@pytest.mark.parametrize("preset", ["opt-tiny", "opt-tiny-350m-style"])  # the second has 32-wide project_in
def test_fresh_nf4_model_saves_a_float_checkpoint_that_loads_back(tmp_path, preset):
    torch.manual_seed(0)
    model = optkit.build(preset, linear="nf4").eval()
    ids = torch.tensor([[2, 5, 9, 11, 40]])
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    for linear in ("nf4", "torch"):  # re-quantizing the dequantized weights gives the same 4-bit values back
        reloaded = optkit.from_pretrained(tmp_path, linear=linear, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_4bit_params_are_validated_with_their_yaml_path():
    with pytest.raises(optkit.SpecValidationError, match=r"decoder\.linear\.params\.compute_dtype"):
        optkit.load_spec("opt-tiny", decoder={"linear": {"name": "nf4", "params": {"compute_dtype": "float64"}}})
    with pytest.raises(optkit.SpecValidationError, match=r"decoder\.linear\.params\.blocksize: unknown field"):
        optkit.load_spec("opt-tiny", decoder={"linear": {"name": "fp4", "params": {"blocksize": 32}}})


def test_4bit_why_not_reasons(monkeypatch):
    entry = optkit.registry.get("linear", "nf4")
    assert entry.capabilities.backward and entry.capabilities.devices == {"cpu", "cuda"}
    if not torch.cuda.is_available():
        assert any(r.startswith("no CUDA device") for r in entry.unavailable_reasons("cuda", torch.float16))
    monkeypatch.setattr(optkit_int8, "_present", lambda: False)
    assert entry.unavailable_reasons("cpu", torch.float32) == [
        "bitsandbytes is not installed: install it with `pip install 'optkit[int8]'`"]
    monkeypatch.setattr(optkit_int8, "_present", lambda: True)
    monkeypatch.setattr(optkit_int8, "probe_fourbit", lambda *args: "RuntimeError: no 4-bit kernel")
    assert entry.unavailable_reasons("cpu", torch.float32) == [
        f"bitsandbytes {optkit_int8._version()} cannot run 4-bit nf4 on cpu: RuntimeError: no 4-bit kernel"]
    with pytest.raises(optkit.BackendUnavailableError, match="linear 'nf4': bitsandbytes .* cannot run 4-bit nf4"):
        optkit.build("opt-tiny", linear="nf4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this check runs the GPU path)")
def test_nf4_on_cuda_matches_its_dequantized_weight():
    torch.manual_seed(0)
    module = layer(256, 128, compute_dtype=torch.bfloat16, double_quant=True).cuda()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = module(x)
    expected = x.float() @ module.dequantized_weight().float().T + module.bias.float()
    torch.testing.assert_close(out.float(), expected, rtol=0.03, atol=0.03)
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
