"""Adversarial inputs to the planner and device-map resolution: each is a truthful plan or one clear InputError.

Complements tests/test_placement.py and tests/test_placement_cli.py (which cover the main paths); everything
here plans on the meta device, so the file runs in seconds.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optkit import registry
from optkit.errors import InputError
from optkit.placement import parse_device, parse_max_memory, plan
from optkit.placement.planner import _compute_device
from optkit.spec import load_spec

TINY = "opt-tiny"


def _expected_weight_bytes(name: str, dtype: str) -> int:
    """Bytes from the spec's shapes alone (OPT / LLaMA-style layouts, tied head counted once)."""
    spec = load_spec(name, registry=registry)
    d = spec.decoder
    hidden, embed, ffn = d.hidden_size, d.word_embed_proj_dim or d.hidden_size, d.ffn_dim
    element = 4 if dtype == "float32" else 2  # int8: everything but projection weights stays fp16

    def linear(inputs: int, outputs: int, bias: bool) -> int:
        weight = inputs * outputs + 4 * outputs if dtype == "int8" else inputs * outputs * element
        return weight + (outputs * element if bias else 0)

    norm = (2 if d.norm.name == "layernorm" else 1) * hidden * element
    layer = 4 * linear(hidden, hidden, d.bias) + 2 * norm
    layer += linear(hidden, ffn, d.bias) * (2 if d.mlp.name == "gated" else 1) + linear(ffn, hidden, d.bias)
    total = d.vocab_size * embed * element + d.num_layers * layer + (norm if d.final_norm else 0)
    if embed != hidden:
        total += linear(embed, hidden, False) + linear(hidden, embed, False)
    if d.positional_embedding.name == "learned":
        total += (d.max_positions + d.positional_embedding.params.get("offset", 0)) * hidden * element
    if not spec.head.params.get("tie_word_embeddings", True):  # its own (V, E) tensor, not a projection: fp16
        total += d.vocab_size * embed * element
    if d.token_embedding.name == "stable":  # a LayerNorm on the embedding output
        total += 2 * hidden * element
    return total


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
@pytest.mark.parametrize("name", ["opt-350m", "opt-175b", "open-llama-7b", "open-llama-tiny-v2-style"])
def test_weight_and_kv_bytes_follow_the_spec_in_every_dtype(name: str, dtype: str):
    """tests/test_placement.py checks weights for the presets' usual dtypes; this adds bfloat16, int8 LLaMA
    (an untied head is a plain tensor, kept fp16) and the KV cache for a batch and length."""
    result = plan(name, dtype=dtype, max_memory={"cpu": "100TiB"}, batch=3, max_length=17)
    assert result.weight_bytes == _expected_weight_bytes(name, dtype)
    d = load_spec(name, registry=registry).decoder
    kv_heads = getattr(d, "num_kv_heads", None) or d.num_heads
    element = 4 if dtype == "float32" else 2  # the int8 KV cache is fp16
    kv = 2 * d.num_layers * 3 * 17 * kv_heads * d.head_dim * element
    assert sum(p.kv_cache_bytes for p in result.devices) == kv


@pytest.mark.parametrize("key", ["cuda:x", "cuda:-1", "cuda:", "cuda:²", "²", "tpu:0", "-1"])
def test_a_malformed_accelerator_is_refused_not_read_as_accelerator_0(key: str):
    with pytest.raises(InputError, match="is not a device") as caught:
        plan(TINY, max_memory={key: "1GiB"}, max_length=8)
    assert repr(key) in str(caught.value)
    with pytest.raises(InputError, match="is not a device"):
        plan(TINY, device_map={"": key}, max_length=8)


def test_cuda_without_an_index_is_accelerator_0():
    assert parse_device("cuda") == 0 and parse_device(" CUDA:1 ") == 1


@pytest.mark.parametrize("keys", [(0, "cuda:0"), ("0", 0), ("cpu", "CPU"), ("cuda:1", "1")])
def test_max_memory_naming_one_device_twice_is_refused(keys: tuple[object, object]):
    first, second = keys
    with pytest.raises(InputError, match="twice") as caught:
        parse_max_memory({first: "1GiB", second: "1KiB"})
    assert repr(second) in str(caught.value)


@pytest.mark.parametrize("length", [True, False, 0, -1, 1.5, "8"])
def test_max_length_must_be_a_positive_int(length: object):
    with pytest.raises(InputError, match="max_length must be a positive int"):
        plan(TINY, max_length=length, max_memory={"cpu": "1GiB"})


def test_max_length_beyond_the_models_positions_is_refused_with_the_limit():
    positions = load_spec(TINY, registry=registry).decoder.max_positions
    assert plan(TINY, max_length=positions, max_memory={"cpu": "1GiB"}).max_length == positions
    with pytest.raises(InputError, match=f"max_length {positions + 1} is more than the model's max_positions "
                                         f"{positions}"):
        plan(TINY, max_length=positions + 1, max_memory={"cpu": "1GiB"})


@pytest.mark.parametrize("batch", [0, -2, True, 1.0])
def test_batch_must_be_a_positive_int(batch: object):
    with pytest.raises(InputError, match="batch must be a positive int"):
        plan(TINY, batch=batch, max_memory={"cpu": "1GiB"})


@pytest.mark.parametrize(("key", "optkit_name"), [("lm_head", "head"), ("model.decoder", "decoder"),
                                                  ("model.decoder.layers.1", "decoder.layers.1")])
def test_a_transformers_module_name_is_refused_with_optkits_name(key: str, optkit_name: str):
    with pytest.raises(InputError, match=f"transformers' name; optkit calls it '{optkit_name}'"):
        plan(TINY, device_map={"": "cpu", key: "disk"}, max_length=8)


def test_a_layer_the_model_does_not_have_is_refused_by_name():
    with pytest.raises(InputError, match="'decoder.layers.99', which is not a module") as caught:
        plan(TINY, device_map={"": "cpu", "decoder.layers.99": "disk"}, max_length=8)
    assert "transformers" not in str(caught.value)


def test_tied_head_and_embedding_on_different_devices_are_refused():
    with pytest.raises(InputError, match="head -> 'disk'"):
        plan(TINY, device_map={"decoder": "cpu", "head": "disk"}, max_length=8)


def test_parent_and_child_on_different_devices_the_longest_key_wins():
    result = plan(TINY, device_map={"decoder": "cpu", "decoder.layers.1": "disk", "head": "cpu"},
                  max_memory={"cpu": "1GiB", "disk": "1GiB"}, max_length=8)
    assert result.device_map["decoder.layers.1"] == "disk"
    assert {d for n, d in result.device_map.items() if n != "decoder.layers.1"} == {"cpu"}


@pytest.mark.parametrize("max_memory", [{0: 0, "cpu": "1GiB"}, {0: "10KiB", "cpu": "1GiB"}, {0: 0, 1: "1GiB"}])
@pytest.mark.parametrize("strategy", ["auto", "sequential"])
def test_the_plans_compute_device_is_the_one_dispatch_would_use(max_memory: dict, strategy: str):
    """dispatch computes on the map's first accelerator, else the cpu: an accelerator that holds nothing
    (zero or too small a budget) must not be reported as computing, nor hold streaming room."""
    result = plan(TINY, max_memory=max_memory, device_map=strategy, max_length=8)
    assert result.compute_device == _compute_device(list(result.device_map.values()))
    assert result.fits
    unused = [d for d in result.devices if not d.modules]
    assert unused and all(d.total_bytes == 0 for d in unused)


@settings(max_examples=25, deadline=None)
@given(budget=st.integers(min_value=0, max_value=400_000), disk=st.booleans(), gpu=st.booleans())
def test_any_budget_gives_a_truthful_plan_or_one_input_error(budget: int, disk: bool, gpu: bool):
    max_memory: dict[object, object] = {0: budget} if gpu else {"cpu": budget}
    if disk:
        max_memory["disk"] = "1GiB"
    try:
        result = plan(TINY, max_memory=max_memory, max_length=8)
    except InputError as error:
        assert "max_memory is too small for even one decoder layer" in str(error)
        return
    assert result.compute_device == _compute_device(list(result.device_map.values()))
    for device in result.devices:
        assert set(device.modules) == {n for n, d in result.device_map.items() if d == device.device}
        assert device.fits == (device.budget_bytes is None or device.total_bytes <= device.budget_bytes)
    assert result.weight_bytes == _expected_weight_bytes(TINY, "float16")
