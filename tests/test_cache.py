"""KV caches: prefill + incremental steps equal the full forward, for every backend and cache kind."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
from optkit.errors import InputError

BACKENDS = ["eager", "sdpa"]


@pytest.fixture(scope="module")
def models():
    """Pre- and post-LN models, each also on every backend ((variant, backend) keys): built once,
    so tests pick the model they need instead of switching a shared one's backend."""
    torch.manual_seed(0)
    variants = {"pre": optkit.build("opt-tiny", dtype=torch.float32).eval(),
                "post": optkit.build("opt-tiny-350m-style", dtype=torch.float32).eval()}
    on_backends = {(variant, backend): optkit.set_backend(copy.deepcopy(model), attention=backend)
                   for variant, model in variants.items() for backend in BACKENDS}
    return {**variants, **on_backends}


def left_padded(seed: int, batch: int, length: int, pads: list[int]):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 1), mask


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_cached_equals_uncached(models, backend, cache_kind, data):
    model = models[data.draw(st.sampled_from(["pre", "post"])), backend]
    batch = data.draw(st.integers(1, 3))
    length = data.draw(st.integers(2, 12))
    pads = [data.draw(st.integers(0, length - 1)) for _ in range(batch)]
    splits = sorted(set(data.draw(st.lists(st.integers(1, length - 1), max_size=3))))
    ids, mask = left_padded(data.draw(st.integers(0, 999)), batch, length, pads)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache(batch, max_length=16, kind=cache_kind)
        pieces, start = [], 0
        for end in splits + [length]:
            out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache)
            pieces.append(out.logits)
            start = end
    got = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert (got - full)[real].abs().max() <= 1e-5
    assert cache.get_seq_length() == length


def test_use_cache_returns_cache_and_continues(models):
    model = models["pre"]
    ids, mask = left_padded(1, 2, 6, [0, 2])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 6
        step = model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=out.past_key_values)
        full = model(torch.cat([ids, ids[:, :1]], 1), attention_mask=torch.cat([mask, mask[:, :1]], 1)).logits
    assert (step.logits[:, -1] - full[:, -1]).abs().max() <= 1e-5
    assert model(ids).past_key_values is None


def test_static_cache_is_preallocated_and_updated_in_place(models):
    model = models["pre"]
    cache = model.new_cache(1, max_length=8, kind="static")
    buffers = [k.data_ptr() for k in cache.keys]
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), past_key_values=cache)
        model(torch.tensor([[8]]), past_key_values=cache)
    assert [k.data_ptr() for k in cache.keys] == buffers
    assert cache.keys[0].shape[-2] == 8 and cache.get_seq_length() == 4
    with pytest.raises(InputError, match="the KV cache holds 8 tokens; 4 stored \\+ 5 new do not fit"):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4, 5]]), past_key_values=cache)


def test_cache_mask_length_is_checked(models):
    model = models["pre"]
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), past_key_values=cache)
        with pytest.raises(InputError, match=r"attention_mask has shape \(1, 1\), expected .* = \(1, 4\)"):
            model(torch.tensor([[8]]), attention_mask=torch.ones(1, 1, dtype=torch.long), past_key_values=cache)


def test_reorder_selects_rows(models):
    model = models["pre"]
    ids, _ = left_padded(3, 3, 5, [0, 0, 0])
    for kind in ("dynamic", "static"):
        cache = model.new_cache(3, max_length=8, kind=kind)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        before = cache.keys[0][:, :, :5].clone()
        cache.reorder(torch.tensor([2, 2, 0]))
        assert torch.equal(cache.keys[0][:, :, :5], before[[2, 2, 0]])
