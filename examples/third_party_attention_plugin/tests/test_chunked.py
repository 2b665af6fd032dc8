"""Tests of the chunked backend: optkit's conformance kit, plus what is specific to chunking.

They run against the installed plugin (``pip install .``) and, when it is not installed,
register the module for the duration of the tests, so they also run from a checkout.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from typing import Iterator

import pytest
import torch

import optkit
import optkit_chunked_attention as plugin
from optkit.errors import SpecValidationError
from optkit.interfaces import AttentionMask
from optkit.testing import AttentionBackendSuite, check_attention_backend, temporary_plugin


@pytest.fixture(scope="module", autouse=True)
def chunked_registered() -> Iterator[None]:
    """The installed plugin if there is one, else the module registered for these tests."""
    if ("attention", plugin.NAME) in optkit.registry:
        yield
        return
    with temporary_plugin(plugin):
        yield


class TestChunkedConformance(AttentionBackendSuite):
    """Every property, with the default chunk of 64 keys (the kit's lengths cross 64)."""

    backend = "chunked"


class TestSmallChunksConformance(AttentionBackendSuite):
    """Many chunks per row: every boundary case of the online softmax."""

    backend = "chunked"
    params = {"chunk_size": 3}


def test_one_line_check_reports_every_property() -> None:
    report = check_attention_backend("chunked", params={"chunk_size": 7}, max_examples=10,
                                     only=["registration", "equals_eager", "fully_masked_rows"])
    assert report.passed == ["registration", "equals_eager", "fully_masked_rows"]


def test_params_are_validated_by_the_spec() -> None:
    model = optkit.build("opt-tiny", attention={"name": "chunked", "params": {"chunk_size": 16}})
    assert {layer.self_attn.kernel.chunk_size for layer in model.decoder.layers} == {16}
    assert optkit.build("opt-tiny", attention="chunked").decoder.layers[0].self_attn.kernel.chunk_size == 64
    with pytest.raises(SpecValidationError, match="decoder.attention.params.chunk_size"):
        optkit.build("opt-tiny", attention={"name": "chunked", "params": {"chunk_size": 0}})
    with pytest.raises(SpecValidationError, match="decoder.attention.params.block"):
        optkit.build("opt-tiny", attention={"name": "chunked", "params": {"block": 8}})


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 9, 64])
def test_result_does_not_depend_on_the_chunk_size(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(chunk_size)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (5, 9, 9))
    padding = torch.tensor([[False] * 2 + [True] * 7, [True] * 9])
    mask = AttentionMask(batch_size=2, q_len=5, kv_len=9, q_offset=4, key_padding=padding)
    whole = plugin.ChunkedAttention(chunk_size=9)(q, k, v, mask, scale=0.25).output
    chunked = plugin.ChunkedAttention(chunk_size=chunk_size)(q, k, v, mask, scale=0.25).output
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


def test_causal_chunks_past_the_last_query_are_skipped() -> None:
    """With 100 keys and the queries at 0..9, only the first chunk of 16 can be visible."""
    seen: list[int] = []
    kernel = plugin.ChunkedAttention(chunk_size=16)
    original = plugin._step

    def counting_step(state, query, key, *args):
        seen.append(key.shape[-2])
        return original(state, query, key, *args)

    q, k, v = (torch.randn(1, 1, n, 8) for n in (10, 100, 100))
    mask = AttentionMask(batch_size=1, q_len=10, kv_len=100, q_offset=0, causal=True)
    try:
        plugin._step = counting_step
        kernel(q, k, v, mask, scale=1.0)
    finally:
        plugin._step = original
    assert seen == [16]


def test_refuses_attention_weights_with_the_alternative() -> None:
    q = torch.randn(1, 1, 2, 8)
    mask = AttentionMask(batch_size=1, q_len=2, kv_len=2)
    with pytest.raises(NotImplementedError, match="attention='eager'"):
        plugin.ChunkedAttention()(q, q, q, mask, scale=1.0, need_weights=True)


def test_entry_point_is_declared() -> None:
    try:
        dist = distribution("optkit-chunked-attention")
    except PackageNotFoundError:
        pytest.skip("the plugin is not installed (pip install examples/third_party_attention_plugin)")
    (entry,) = [ep for ep in dist.entry_points if ep.group == "optkit"]
    assert (entry.name, entry.value) == ("chunked", "optkit_chunked_attention")
    assert optkit.registry.get("attention", "chunked").provider.distribution == "optkit-chunked-attention"
