"""The device-state decode step (optkit.inference.decode_graph) computes what the plain decode loop computes.

On CPU the step runs eagerly: same logits, same tokens as the reference loop and as transformers,
for padded batches, sampling, EOS and both families. The CUDA tests (marker ``cuda``) replay the
captured graph and compare it with the plain loop on the GPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import optkit
from optkit import inference
from optkit.inference import DecodeStep, decode_graph
from optkit.errors import InputError
from optkit.generation import _forward_last
from optkit.testing import temporary_component
from tests.helpers import batch, saved_pair, tiny_open_llama

NEW = 12


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """(transformers model, optkit model) with the same weights, loaded once; tests use ``pair``."""
    return saved_pair(tmp_path_factory.mktemp("graph"), seed=3, init_std=0.2)


@pytest.fixture
def pair(saved_models):
    """The shared transformers model (only read) and a copy of the optkit model of each test's own:
    tests switch its backend, mode and dtype, and generate() prepares it in place."""
    hf, model = saved_models
    return hf, copy.deepcopy(model)


def greedy(model, ids, mask, **kwargs):
    """NEW tokens, EOS held back (as transformers does with min_new_tokens, so the two stay comparable)."""
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, **kwargs)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("seed", [0, 1])
def test_step_path_gives_the_plain_loops_and_transformers_tokens(pair, attention, seed):
    hf, model = pair
    optkit.set_backend(model, attention=attention)
    ids, mask = batch(seed, batch_size=3, length=7)  # rows padded by 0 / 2 / 4
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                           pad_token_id=1)
    assert torch.equal(greedy(model, ids, mask, decode_graph=False), expected)
    assert torch.equal(greedy(model, ids, mask, decode_graph=True), expected)


def test_step_logits_equal_the_plain_steps(pair):
    """Same numbers, not just the same argmax: the mask and positions come from device buffers."""
    _, model = pair
    ids, mask = batch(2, batch_size=3, length=6)
    total = ids.shape[1] + 6
    plain_cache = model.new_cache(3, max_length=total, kind="static")
    step = DecodeStep(model, model.new_cache(3, max_length=total, kind="static"), 3)
    with torch.no_grad():
        first = _forward_last(model, ids, mask, plain_cache)
        assert torch.equal(_forward_last(model, ids, mask, step.cache), first)
        step.start(mask)
        token, grown = first.argmax(-1), mask
        for _ in range(5):
            grown = torch.cat([grown, torch.ones_like(grown[:, :1])], dim=1)
            plain = _forward_last(model, token[:, None], grown, plain_cache)
            ours = step(token)
            assert float((ours - plain).abs().max()) <= 1e-5
            token = plain.argmax(-1)
    assert step.graph is None  # CPU: no capture


def test_unpadded_batch_eos_and_sampling_match_the_plain_loop(pair):
    _, model = pair
    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    assert torch.equal(greedy(model, ids, mask, decode_graph=True), greedy(model, ids, mask, decode_graph=False))
    free = greedy(model, ids, mask)
    eos = int(free[0, 7])  # emitted by row 0 at its third step: rows finish at different times
    outputs = [model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, decode_graph=flag)
               for flag in (False, True)]
    assert torch.equal(outputs[0], outputs[1])
    samples = [model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=0,
                              generator=torch.Generator().manual_seed(9), decode_graph=flag) for flag in (False, True)]
    assert torch.equal(samples[0], samples[1])


def test_open_llama_step_path_matches_the_plain_loop():
    model = tiny_open_llama(attention="sdpa", seed=5)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    assert torch.equal(greedy(model, ids, mask, decode_graph=True), greedy(model, ids, mask, decode_graph=False))


def test_static_cache_follows_a_device_slot():
    cache = optkit.build("opt-tiny").new_cache(2, max_length=6, kind="static")
    key = torch.randn(2, cache.keys[0].shape[1], 1, cache.keys[0].shape[-1])
    slot = torch.tensor([4])
    cache.follow(slot)
    keys, values = cache.update(0, key, -key)
    assert torch.equal(keys[:, :, 4:5], key) and torch.equal(values[:, :, 4:5], -key)
    assert not keys[:, :, :4].any() and cache.get_seq_length(0) == 0  # the caller owns the position
    cache.reset()
    cache.update(0, key, key)  # back to Python offsets: slot 0
    assert torch.equal(cache.keys[0][:, :, :1], key)


def test_insisting_explains_why_a_model_cannot_use_it(pair):
    hf, model = pair
    ids, mask = batch(0, batch_size=2, length=5)
    with pytest.raises(InputError, match="decode_graph=True: beam search"):
        model.generate(ids, attention_mask=mask, num_beams=2, decode_graph=True)
    with pytest.raises(InputError, match="kv_cache 'dynamic' does not declare cuda_graphs"):
        model.generate(ids, attention_mask=mask, cache_implementation="dynamic", decode_graph=True)
    model.train()
    with pytest.raises(InputError, match="training mode"):
        model.generate(ids, attention_mask=mask, decode_graph=True)


def test_a_component_without_the_declaration_is_never_captured(pair):
    """A third-party kernel that says nothing about graphs gets the plain loop (or a clear refusal)."""
    _, model = pair
    with temporary_component("attention", "undeclared", optkit.registry.get("attention", "sdpa").factory):
        optkit.set_backend(model, attention="undeclared")
        assert decode_graph.unsupported_reason(model, "static") == \
            "attention 'undeclared' does not declare cuda_graphs (it may synchronise with the host)"
        ids, mask = batch(0, batch_size=2, length=5)
        with pytest.raises(InputError, match="attention 'undeclared' does not declare cuda_graphs"):
            model.generate(ids, attention_mask=mask, decode_graph=True)
        assert model.generate(ids, attention_mask=mask, max_new_tokens=3).shape == (2, 8)


def test_cpu_default_is_the_plain_loop(pair, monkeypatch):
    _, model = pair

    def refuse(*args, **kwargs):
        raise AssertionError("the step path ran on CPU without being asked for")

    monkeypatch.setattr("optkit.generation.session_for", refuse)
    ids, mask = batch(1, batch_size=2, length=5)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=3).shape == (2, 8)


def test_fingerprint_changes_when_modules_or_storage_change(pair):
    _, model = pair
    before = decode_graph._fingerprint(model)
    assert decode_graph._fingerprint(model) == before
    optkit.set_backend(model, attention="eager")
    swapped = decode_graph._fingerprint(model)
    assert swapped != before
    model.to(torch.float64)
    assert decode_graph._fingerprint(model) != swapped


def test_a_mask_converts_once_per_dtype_and_device():
    padding = torch.tensor([[True, True, False], [True, True, True]])
    mask = optkit.AttentionMask(batch_size=2, q_len=1, kv_len=3, causal=False, key_padding=padding,
                                every_query_sees_a_key=True)
    assert mask.additive(torch.float16) is mask.additive(torch.float16)
    assert mask.additive(torch.float16)[0, 0, 0, 2] == torch.finfo(torch.float16).min
    assert not mask.has_empty_rows
    plain = optkit.AttentionMask(batch_size=1, q_len=1, kv_len=3, q_offset=1)
    assert plain.allowed("cpu") is plain.allowed() and plain.allowed("meta") is plain.allowed("meta")


# == CUDA: the captured graph ==================================================================================
def cuda_pair(tmp_path, dtype):
    hf, model = saved_pair(tmp_path, seed=3, init_std=0.2)
    return hf.to("cuda", dtype), optkit.from_pretrained(tmp_path / "hf-causal_lm-3", attention="sdpa",
                                                        device="cuda", dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay_equals_the_plain_loop(tmp_path, dtype):
    hf, model = cuda_pair(tmp_path, dtype)
    ids, mask = (t.cuda() for t in batch(0, batch_size=3, length=7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns: fail instead
        graphed = greedy(model, ids, mask)
    step = model.inference_session.kept_step
    assert step is not None and step.graph is not None, "the decode step was not captured"
    plain = greedy(model, ids, mask, decode_graph=False)
    if dtype == torch.float32:
        assert torch.equal(graphed, plain)
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                               pad_token_id=1)
        assert torch.equal(graphed, expected)
    else:  # fp16 kernels may differ in the last bit between mask shapes: most tokens agree
        assert float((graphed == plain).float().mean()) >= 0.9
    again = greedy(model, ids, mask)  # replays the kept graph with a reset cache
    assert model.inference_session.kept_step is step and torch.equal(again, graphed)
    optkit.set_backend(model, attention="eager")  # new kernel modules: a new capture
    greedy(model, ids, mask)
    assert model.inference_session.kept_step is not step


@pytest.mark.cuda
def test_cuda_fused_relu_and_projections_equal_the_plain_modules():
    model = optkit.build("opt-tiny", attention="sdpa", device="cuda").eval()
    x = torch.randn(3, 5, model.spec.decoder.hidden_size, device="cuda")
    mlp = model.decoder.layers[0].mlp
    with torch.no_grad():
        fused = mlp(x)
    with torch.enable_grad():
        plain = mlp(x)  # autograd on: the separate fc1 + ReLU path
    assert float((fused - plain).abs().max()) <= 1e-5
    ids = torch.randint(3, 500, (2, 7), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
        inference.prepare(model)
        assert all(layer.self_attn.stacked for layer in model.decoder.layers)
        assert float((model(ids).logits - before).abs().max()) <= 1e-4


@pytest.mark.cuda
def test_cuda_graph_sampling_and_eos_equal_the_plain_loop(tmp_path):
    _, model = cuda_pair(tmp_path, torch.float32)
    ids, mask = (t.cuda() for t in batch(1, batch_size=2, length=6))
    free = greedy(model, ids, mask)
    eos = int(free[0, 8])
    outputs = [model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, decode_graph=flag)
               for flag in (False, True)]
    assert torch.equal(outputs[0], outputs[1])
    samples = [model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True,
                              generator=torch.Generator("cuda").manual_seed(9), decode_graph=flag)
               for flag in (False, True)]
    assert torch.equal(samples[0], samples[1])
