"""optkit.inference: the speed transform applied from outside computes exactly what model.py computes.

The reference model (optkit/model.py) is the definition; ``prepare`` must leave every weight, key and
logit as it was, step aside for training, survive ``.to()``/``set_backend``, and be undone by
``restore``. ``generate`` on an unprepared model must not change it at all.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from tests.helpers.threads import results_of_threads

import optkit
from optkit import inference, torch_internals
from optkit.inference import PreparedAttention
from optkit.model import Attention
from optkit.testing import fresh_registry

NEW = 6


def ids_batch(seed: int = 0, rows: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 500, (rows, length), generator=torch.Generator().manual_seed(seed))


def plain_and_prepared(linear: str = "torch", attention: str = "sdpa"):
    plain = optkit.build("opt-tiny", attention=attention, linear=linear).eval()
    prepared = optkit.build("opt-tiny", attention=attention, linear=linear).eval()
    prepared.load_state_dict(plain.state_dict())
    return plain, inference.prepare(prepared)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("linear", ["torch", "onednn"])  # onednn: stackable on CPU; torch: left as three GEMMs
def test_prepare_keeps_keys_values_and_logits(linear):
    plain, prepared = plain_and_prepared(linear)
    before = snapshot(prepared)
    attn = prepared.decoder.layers[0].self_attn
    assert isinstance(attn, PreparedAttention)
    assert attn.stacked == (linear == "onednn")
    after = prepared.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    ids = ids_batch()
    with torch.no_grad():
        assert torch.equal(prepared(ids).logits, plain(ids).logits)
    assert torch.equal(prepared.generate(ids, max_new_tokens=NEW), plain.generate(ids, max_new_tokens=NEW))


def test_stacked_projections_are_views_of_one_buffer_and_stay_parameters():
    _, prepared = plain_and_prepared("onednn")
    attn = prepared.decoder.layers[0].self_attn
    weight, _, _ = attn._stacked
    assert attn.k_proj.weight.data_ptr() == weight[attn.q_proj.out_features].data_ptr()
    assert isinstance(attn.q_proj.weight, nn.Parameter)
    assert sum(1 for _ in prepared.parameters()) == sum(1 for _ in optkit.build("opt-tiny").parameters())


def test_training_runs_the_reference_path_and_reaches_every_projection():
    _, prepared = plain_and_prepared("onednn")
    prepared.train()
    prepared(ids_batch()).logits.sum().backward()
    attn = prepared.decoder.layers[0].self_attn
    assert all(p.weight.grad is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def test_to_drops_the_stale_buffer_and_stays_correct():
    plain, prepared = plain_and_prepared("onednn")
    prepared.to(torch.float64)
    plain.to(torch.float64)
    ids = ids_batch(1)
    with torch.no_grad():
        assert torch.allclose(prepared(ids).logits, plain(ids).logits, atol=1e-12)
    assert not prepared.decoder.layers[0].self_attn.stacked


def test_set_backend_keeps_the_transform_correct():
    plain, prepared = plain_and_prepared("onednn")
    optkit.set_backend(prepared, attention="eager")
    optkit.set_backend(plain, attention="eager")
    ids = ids_batch(2)
    with torch.no_grad():
        assert float((prepared(ids).logits - plain(ids).logits).abs().max()) <= 1e-6
    assert prepared.attention_backend == "eager"


def test_restore_gives_the_plain_blocks_back():
    plain, prepared = plain_and_prepared("onednn")
    inference.restore(prepared)
    assert all(type(layer.self_attn) is Attention for layer in prepared.decoder.layers)
    assert prepared.inference_session is None
    ids = ids_batch(3)
    with torch.no_grad():
        assert float((prepared(ids).logits - plain(ids).logits).abs().max()) <= 1e-6
    assert inference.prepare(prepared) is prepared and inference.is_prepared(prepared)


def test_generate_never_changes_an_unprepared_model():
    model = optkit.build("opt-tiny", attention="sdpa", linear="onednn").eval()
    kinds = [type(m) for m in model.modules()]
    pointers = [p.data_ptr() for p in model.parameters()]
    attributes = dict(vars(model))
    model.generate(ids_batch(), max_new_tokens=NEW)
    assert [type(m) for m in model.modules()] == kinds
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert dict(vars(model)) == attributes
    assert model.inference_session is None


def test_generate_from_several_threads_gives_each_its_own_tokens():
    _, model = plain_and_prepared("onednn")
    prompts = [ids_batch(seed, rows=1, length=5 + seed) for seed in range(4)]
    alone = [model.generate(p, max_new_tokens=NEW) for p in prompts]
    results = results_of_threads(lambda i: model.generate(prompts[i], max_new_tokens=NEW), len(prompts))
    assert all(torch.equal(results[i], alone[i]) for i in range(len(prompts)))


# -- the model remembers the registry that built it ----------------------------------------------------------
class CountingEager(optkit.registry.get("attention", "eager").factory(None, None).__class__):
    """The eager kernel, under another registry's name, counting its calls."""

    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)


def test_a_model_built_from_a_fresh_registry_never_uses_the_global_one():
    from optkit.interfaces import KVCache

    made: list[KVCache] = []
    static = optkit.registry.get("kv_cache", "static")
    registry = fresh_registry()
    registry.unregister("attention", "sdpa")  # the global one has sdpa; this one does not
    registry.register("attention", "counting", lambda params, ctx: CountingEager(),
                      capabilities=optkit.Capabilities(attention_weights=True))

    def recording_static(params, ctx):
        factory = static.factory(params, ctx)

        def make(**shape):
            made.append(factory(**shape))
            return made[-1]
        return make

    registry.unregister("kv_cache", "static")
    registry.register("kv_cache", "static", recording_static, params=static.params)
    model = optkit.build("opt-tiny", attention="counting", registry=registry).eval()
    assert model.registry is registry
    model.generate(ids_batch(), max_new_tokens=NEW)
    assert made and CountingEager.calls > 0  # generate's cache came from this registry
    with pytest.raises(optkit.OptkitError, match="unknown attention .sdpa."):
        optkit.set_backend(model, attention="sdpa")  # not in this model's registry, although global has it
    model(ids_batch(), output_attentions=True)  # the capability is read from this registry too
    assert inference.unsupported_reason(model, None) is not None  # counting does not declare cuda_graphs
    from optkit.builder import build_head

    assert type(build_head(model, torch.device("cpu"), torch.float32)) is type(model.head)


# -- private torch internals: each has a public fallback with the same tokens -------------------------------
EAGER_INTERNALS = ["tensor_version", "mkldnn_linear", "addmm_activation"]


@pytest.mark.parametrize("name", EAGER_INTERNALS)
def test_each_eager_internal_can_go_missing_without_changing_tokens(name):
    _, model = plain_and_prepared("onednn")
    ids = ids_batch(5)
    expected = model.generate(ids, max_new_tokens=NEW)
    with torch_internals.disabled(name):
        assert not torch_internals.available(name)
        got = model.generate(ids, max_new_tokens=NEW)
    assert torch.equal(got, expected)


needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile (inductor) on CPU needs a C++ compiler (g++ or c++)")


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("name", ["inductor_compile_fx", "inductor_decompositions", "prims_force_stride_order"])
def test_each_compile_internal_can_go_missing_without_changing_tokens(name):
    model = optkit.build("opt-tiny", attention="sdpa").eval()
    ids = ids_batch(6, rows=1)
    expected = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW)
    torch._dynamo.reset()  # the fallback must really compile (or not) without the internal
    with torch_internals.disabled(name):
        got = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, compile=True)
    torch._dynamo.reset()
    assert torch.equal(got, expected)


def test_every_internal_has_a_probe_and_disabling_an_unknown_one_is_an_error():
    assert set(torch_internals.NAMES) >= {"inductor_compile_fx", "mkldnn_linear", "tensor_version"}
    with pytest.raises(ValueError, match="unknown torch internal"):
        with torch_internals.disabled("no_such_thing"):
            pass
