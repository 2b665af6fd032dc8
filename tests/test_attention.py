"""Every attention backend usable here computes the eager function (the reference)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
from optkit.interfaces import AttentionMask

DTYPE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # vs fp32 eager, unit-normal inputs


def usable_backends(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    return [n for n in optkit.registry.names("attention")
            if not optkit.registry.get("attention", n).unavailable_reasons(device, dtype)]


def kernel(name: str):
    return optkit.registry.get("attention", name).factory(None, None)


@st.composite
def attention_case(draw):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([8, 16, 64, 80]))
    q_len = draw(st.integers(1, 9))
    past = draw(st.integers(0, 7))
    kv_len = past + q_len
    pads = [draw(st.integers(0, kv_len)) for _ in range(batch)]  # left padding per row (may cover everything)
    side = draw(st.sampled_from(["left", "right", "none"]))
    seed = draw(st.integers(0, 2**16))
    return batch, heads, head_dim, q_len, past, kv_len, pads, side, seed


def make_inputs(case, dtype=torch.float32):
    batch, heads, head_dim, q_len, past, kv_len, pads, side, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(dtype) for n in (q_len, kv_len, kv_len))
    padding = None
    if side != "none":
        padding = torch.ones(batch, kv_len, dtype=torch.bool)
        for row, pad in enumerate(pads):
            if side == "left":
                padding[row, :pad] = False
            elif pad:
                padding[row, kv_len - pad:] = False
    mask = AttentionMask(batch_size=batch, q_len=q_len, kv_len=kv_len, q_offset=past, key_padding=padding)
    return q, k, v, mask


@pytest.mark.parametrize("backend", usable_backends())
@settings(max_examples=150, deadline=None)
@given(case=attention_case())
def test_backend_equals_eager(backend, case):
    q, k, v, mask = make_inputs(case)
    scale = case[2] ** -0.5
    expected = kernel("eager")(q, k, v, mask, scale=scale).output
    got = kernel(backend)(q, k, v, mask, scale=scale).output
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max() <= DTYPE_ATOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", usable_backends())
@settings(max_examples=40, deadline=None)
@given(case=attention_case())
def test_reduced_precision_close_to_fp32_eager_and_never_nan(backend, dtype, case):
    if backend not in usable_backends("cpu", dtype):
        pytest.skip(f"{backend} does not run {dtype} on CPU")
    q, k, v, mask = make_inputs(case, dtype)
    # the models' scale, head_dim ** -0.5: with scale 1 the scores of unit-variance inputs grow with head_dim and a
    # 16-bit score's rounding alone moves the softmax by more than any fixed tolerance (head_dim 80: 0.086)
    scale = case[2] ** -0.5
    got = kernel(backend)(q, k, v, mask, scale=scale).output
    assert torch.isfinite(got).all()
    expected = kernel("eager")(q.float(), k.float(), v.float(), mask, scale=scale).output
    assert (got.float() - expected).abs().max() <= DTYPE_ATOL[dtype] * 4


@pytest.mark.parametrize("backend", usable_backends())
def test_fully_masked_rows_are_zero(backend):
    q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
    padding = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = AttentionMask(batch_size=2, q_len=4, kv_len=4, key_padding=padding)
    out = kernel(backend)(q, k, v, mask, scale=1.0).output
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2]))
    assert torch.isfinite(out).all()


def test_backend_gradients_match_eager():
    for backend in usable_backends():
        case = (2, 2, 16, 5, 3, 8, [0, 3], "left", 7)
        grads = {}
        for name in ("eager", backend):
            q, k, v, mask = make_inputs(case)
            for t in (q, k, v):
                t.requires_grad_(True)
            kernel(name)(q, k, v, mask, scale=0.25).output.sum().backward()
            grads[name] = [t.grad for t in (q, k, v)]
        for ours, ref in zip(grads[backend], grads["eager"]):
            assert torch.isfinite(ours).all()
            assert (ours - ref).abs().max() <= 1e-5


def test_mask_geometry():
    padding = torch.tensor([[False, True, True, True]])
    mask = AttentionMask(batch_size=1, q_len=2, kv_len=4, q_offset=2, key_padding=padding)
    assert mask.allowed()[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert not mask.has_empty_rows
    with pytest.raises(ValueError, match="do not fit"):
        AttentionMask(batch_size=1, q_len=3, kv_len=4, q_offset=2)
    with pytest.raises(ValueError, match=r"expected \(batch, kv_len\)"):
        AttentionMask(batch_size=2, q_len=1, kv_len=4, key_padding=padding)
    plain = AttentionMask(batch_size=1, q_len=3, kv_len=3)
    assert plain.is_plain_causal and not plain.sees_every_key
    assert AttentionMask(batch_size=1, q_len=1, kv_len=5, q_offset=4).sees_every_key
    additive = plain.additive(torch.float32)[0, 0]
    assert additive[0, 1] == torch.finfo(torch.float32).min and additive[1, 0] == 0


def test_eager_scales_q_first_for_a_power_of_two_scale_so_fp16_scores_stay_in_range():
    """OPT hands the kernel head_dim**-0.5; unscaled fp16 q k^T could overflow where transformers' order does not."""
    from optkit_attention_eager import EagerAttention

    q = torch.full((1, 1, 2, 64), 40.0, dtype=torch.float16)  # q k^T = 102400: inf in fp16 unless q is scaled
    k = torch.full((1, 1, 2, 64), 40.0, dtype=torch.float16)
    v = torch.randn(1, 1, 2, 64, dtype=torch.float16)
    mask = optkit.AttentionMask(batch_size=1, q_len=2, kv_len=2)
    out = EagerAttention()(q, k, v, mask, scale=64**-0.5).output
    assert torch.isfinite(out).all()
