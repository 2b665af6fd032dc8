"""Audit of the fast inference paths: a prepared model (stacked q/k/v, the decode step, the compiled step)
gives the tokens of a never-prepared model with the same weights, whatever the user did to it in between.

Each test pairs a reference model (``optkit.build``, plain loop) with a prepared copy and applies the same
change to both; the fast path must never reuse a stale stacked buffer, kept step or compilation.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from tests.helpers.threads import results_of_threads

import optkit
from optkit import inference
from optkit.adapters import attach
from optkit.generation import _forward_last
from optkit.inference import DecodeStep
from optkit.inference.decode_graph import step_key
from optkit.inference.session import InferenceSession

NEW = 6


def ids_batch(seed: int, rows: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 500, (rows, length), generator=torch.Generator().manual_seed(seed))


def reference_and_prepared(linear: str) -> tuple[nn.Module, nn.Module]:
    """Same random weights (std 0.2, so greedy tokens differ between prompts); the second one prepared.

    ``onednn`` linears are stacked on CPU (plain loop only); ``torch`` ones run the decode step."""
    reference = optkit.build("opt-tiny", linear=linear).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    prepared = optkit.build("opt-tiny", linear=linear).eval()
    prepared.load_state_dict(reference.state_dict())
    return reference, inference.prepare(prepared)


def fast_options(linear: str) -> dict:
    return {"decode_graph": True} if linear == "torch" else {}


def assert_same_tokens(fast: nn.Module, reference: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None,
                       new: int = NEW, **kwargs) -> None:
    got = fast.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kwargs)
    kwargs.pop("decode_graph", None)
    kwargs.pop("compile", None)
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, decode_graph=False,
                              **kwargs)
    assert torch.equal(got, want)


def each(models: tuple[nn.Module, ...], change: Callable[[nn.Module], object]) -> None:
    for model in models:
        change(model)


# -- stale stacked q/k/v ---------------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["k_proj.weight", "k_proj.bias", "q_proj.bias", "v_proj.weight"])
def test_replacing_one_projection_storage_drops_the_stale_stack(part):
    """k sits between q and v in the stacked buffer: replacing k's storage alone must be seen too."""
    reference, fast = reference_and_prepared("onednn")
    assert fast.decoder.layers[0].self_attn.stacked
    module, name = part.split(".")
    new = torch.randn_like(getattr(getattr(reference.decoder.layers[0].self_attn, module), name))
    for model in (reference, fast):
        getattr(getattr(model.decoder.layers[0].self_attn, module), name).data = new.clone()
    ids = ids_batch(7)
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, reference(ids).logits)
    assert not fast.decoder.layers[0].self_attn.stacked
    assert_same_tokens(fast, reference, ids)


def test_stacking_inside_inference_mode_leaves_a_trainable_model():
    """Stacking may run inside a caller's torch.inference_mode (prepare, or the lazy restack after adapters
    are unloaded); the parameters become views of the stacked buffer, so it must not be an inference tensor."""
    model = optkit.build("opt-tiny", linear="onednn").eval()
    with torch.inference_mode():
        inference.prepare(model)
    attention = model.decoder.layers[0].self_attn
    assert attention.stacked and not attention.q_proj.weight.is_inference()
    attach.add_adapters(model, r=2, target_modules=["q_proj"])
    attach.unload_adapters(model)
    ids = ids_batch(2)
    with torch.inference_mode():
        model(ids)  # restacks here
    assert attention.stacked and not attention.k_proj.weight.is_inference()
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert attention.k_proj.weight.grad is not None


def test_a_step_kept_in_inference_mode_is_not_lent_outside_it():
    """A kept (CUDA-captured) step made inside torch.inference_mode holds inference tensors, which cannot be
    written in place outside it: the next call outside must get a step of its own. (CPU never keeps a
    step, so the capture is faked with a graph placeholder.)"""
    model = optkit.build("opt-tiny", linear="torch").eval()
    session = InferenceSession()
    with torch.inference_mode():
        with session.decode_step(model, 1, 16, "static") as kept:
            kept.graph = object()
    with torch.inference_mode(), session.decode_step(model, 1, 16, "static") as again:
        assert again is kept  # still reused where it was made
    assert session.kept_step is kept
    with torch.no_grad(), session.decode_step(model, 1, 16, "static") as step:
        assert step is not kept
        model(ids_batch(1, rows=1, length=3), past_key_values=step.cache, use_cache=True)
        step.start(torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("linear", ["onednn", "torch"])
def test_hooks_on_an_attention_block_survive_prepare_and_restore(linear):
    """A user's hooks on ``self_attn`` (activation capture, steering) keep running, and their handles keep
    removing them, whichever block class holds them now."""
    reference = optkit.build("opt-tiny", linear=linear).eval()
    model = optkit.build("opt-tiny", linear=linear).eval()
    model.load_state_dict(reference.state_dict())

    def halve(module, args, output):
        return (output[0] * 0.5,) + tuple(output[1:])

    handles = [m.decoder.layers[0].self_attn.register_forward_hook(halve) for m in (reference, model)]
    inference.prepare(model)
    ids = ids_batch(2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert_same_tokens(model, reference, ids, **fast_options(linear))
    inference.restore(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    inference.prepare(model)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert not model.decoder.layers[0].self_attn._forward_hooks


@pytest.mark.parametrize("where", ["k_proj", "q_proj pre-hook", "global"])
def test_hooks_on_the_projections_are_never_bypassed_by_the_stack(where):
    """The stacked GEMM does not call q/k/v: with a hook that would see them called, they are called."""
    reference, fast = reference_and_prepared("onednn")
    calls = {id(reference): 0, id(fast): 0}

    def hook(module, args, output=None):
        return None if output is None else output * 0.5

    ids = ids_batch(2)
    if where == "global":
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, args, output: output * 0.5 if module is reference.decoder.layers[0].self_attn.k_proj
            or module is fast.decoder.layers[0].self_attn.k_proj else None)
    for model in (reference, fast):
        attention = model.decoder.layers[0].self_attn
        if where == "k_proj":
            attention.k_proj.register_forward_hook(hook)
        elif where == "q_proj pre-hook":
            attention.q_proj.register_forward_pre_hook(
                lambda module, args, key=id(model): calls.__setitem__(key, calls[key] + 1))
    try:
        with torch.no_grad():
            assert torch.equal(fast(ids).logits, reference(ids).logits)
        assert_same_tokens(fast, reference, ids)
    finally:
        if where == "global":
            handle.remove()
    assert calls[id(fast)] == calls[id(reference)]
    with torch.no_grad():
        assert fast.decoder.layers[1].self_attn.stacked  # blocks without hooks keep the one GEMM


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("stale", [float("inf"), float("nan")])
def test_a_reset_static_cache_carries_nothing_into_the_next_sequence(attention, stale):
    """A kept step's cache is reset, not remade, and the step reads every slot (masked): an inf or nan an
    earlier sequence left there (an fp16 overflow) must not reach the next one's logits."""
    model = optkit.build("opt-tiny", linear="torch", attention=attention).eval()
    ids, mask = ids_batch(1, rows=1, length=5), torch.ones(1, 5, dtype=torch.long)

    def step_logits(cache) -> list[torch.Tensor]:
        step = DecodeStep(model, cache, 1)
        with torch.no_grad():
            first = _forward_last(model, ids, None, cache)
            step.start(mask)
            return [first, step(first.argmax(-1)), step(torch.tensor([7]))]

    used = model.new_cache(1, max_length=16, kind="static")
    for buffer in (*used.keys, *used.values):
        buffer.fill_(stale)
    used.reset()
    fresh = step_logits(model.new_cache(1, max_length=16, kind="static"))
    assert all(torch.equal(a, b) for a, b in zip(step_logits(used), fresh))


@pytest.mark.parametrize("kind", ["static", "dynamic"])
@pytest.mark.parametrize("held, given", [(2, 1), (1, 3)])
def test_a_cache_of_another_batch_size_is_a_clear_error(kind, held, given):
    model = optkit.build("opt-tiny").eval()
    cache = model.new_cache(held, max_length=16, kind=kind)
    with torch.no_grad():
        model(ids_batch(0, held, 3), past_key_values=cache, use_cache=True)
        with pytest.raises(optkit.InputError, match=rf"the {kind} KV cache holds {held} row\(s\).*has {given}"):
            model(ids_batch(1, given, 2), past_key_values=cache, use_cache=True)


# -- whatever happens to the weights, the fast paths see it ------------------------------------------------
def _train_one_step(model: nn.Module) -> None:
    torch.manual_seed(11)  # the same dropout masks in both models
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = ids_batch(9)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()


def _mul_query_key(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(1.7)


CHANGES: list[tuple[str, Callable[[nn.Module], object]]] = [
    ("load_state_dict", lambda m: m.load_state_dict({k: v * 0.9 for k, v in m.state_dict().items()})),
    ("load_state_dict assign", lambda m: m.load_state_dict({k: v * 1.1 for k, v in m.state_dict().items()},
                                                           assign=True)),
    ("in-place mul_", _mul_query_key),
    ("set_backend", lambda m: optkit.set_backend(m, attention="eager")),
    ("half().float()", lambda m: m.half().float()),
    ("requires_grad off", lambda m: [p.requires_grad_(False) for p in m.parameters()]),
    ("requires_grad on", lambda m: [p.requires_grad_(True) for p in m.parameters()]),
    ("a training step", _train_one_step),
    ("float64 and back", lambda m: m.to(torch.float64).to(torch.float32)),
]


@pytest.mark.parametrize("linear", ["onednn", "torch"])
def test_every_weight_change_reaches_the_fast_path(linear):
    reference, fast = reference_and_prepared(linear)
    for seed, (_, change) in enumerate(CHANGES):
        each((reference, fast), change)
        assert_same_tokens(fast, reference, ids_batch(seed), **fast_options(linear))


@pytest.mark.parametrize("linear", ["onednn", "torch"])
def test_adapters_added_merged_and_unloaded_reach_the_fast_path(linear):
    reference, fast = reference_and_prepared(linear)

    def add(model: nn.Module) -> None:
        attach.add_adapters(model, r=4, target_modules=["q_proj", "k_proj", "v_proj"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora" in name:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
        model.eval()

    steps = [add, attach.merge_adapters, attach.unmerge_adapters, attach.merge_and_unload, _mul_query_key]
    for seed, change in enumerate(steps):
        each((reference, fast), change)
        assert_same_tokens(fast, reference, ids_batch(seed))
    assert fast.decoder.layers[0].self_attn.stacked == (linear == "onednn")


def test_interleaved_shapes_on_one_prepared_model_equal_fresh_references():
    reference, fast = reference_and_prepared("torch")
    for seed, (rows, length, new) in enumerate([(1, 5, 4), (3, 9, 7), (2, 3, 12), (1, 5, 4), (4, 1, 3)]):
        for cache, graph in (("static", True), ("dynamic", None)):
            assert_same_tokens(fast, reference, ids_batch(seed, rows, length), new=new, decode_graph=graph,
                               cache_implementation=cache)


def test_the_step_fills_every_position_and_refuses_one_more():
    reference, fast = reference_and_prepared("torch")
    positions = fast.spec.decoder.max_positions
    for prompt in (positions - 6, positions - 2):
        assert_same_tokens(fast, reference, ids_batch(1, 2, prompt), new=positions - prompt, decode_graph=True)
    with pytest.raises(optkit.InputError, match="max_new_tokens"):
        fast.generate(ids_batch(1, 2, positions - 6), max_new_tokens=7, decode_graph=True)


def test_left_padding_of_any_amount_gives_each_row_its_own_tokens():
    """One prompt, batched with longer companions (0 / 2 / 5 pads on its left, masked pad tokens of
    varying ids): its new tokens never change, and every batch equals the reference."""
    reference, fast = reference_and_prepared("torch")
    prompt = ids_batch(3, 1, 5)
    alone = fast.generate(prompt, max_new_tokens=8, min_new_tokens=8, decode_graph=True)[:, 5:]
    for pad, filler in ((0, 1), (2, 1), (5, 77)):
        companion = ids_batch(pad, 1, 5 + pad)
        ids = torch.cat([torch.cat([torch.full((1, pad), filler), prompt], dim=1), companion])
        mask = torch.ones_like(ids)
        mask[0, :pad] = 0
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, decode_graph=True)
        assert torch.equal(out[:1, 5 + pad:], alone)
    ragged = ids_batch(2, 4, 9)
    ragged_mask = torch.ones_like(ragged)
    for row, pad in enumerate((0, 1, 4, 8)):
        ragged[row, :pad], ragged_mask[row, :pad] = 1, 0
    assert_same_tokens(fast, reference, ragged, ragged_mask, new=8, decode_graph=True)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 4), length=st.integers(1, 12), new=st.integers(1, 10), data=st.data(),
       attention=st.sampled_from(["sdpa", "eager"]), sample=st.booleans())
def test_any_batch_on_the_step_path_equals_the_reference(shared_pair, rows, length, new, data, attention, sample):
    reference, fast = shared_pair
    each((reference, fast), lambda m: optkit.set_backend(m, attention=attention))
    ids = ids_batch(data.draw(st.integers(0, 1000), label="seed"), rows, length)
    pads = data.draw(st.lists(st.integers(0, length - 1), min_size=rows, max_size=rows), label="pads")
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 1, 0
    options = {"do_sample": True, "top_k": 0} if sample else {}
    runs = [model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, decode_graph=graph,
                           generator=torch.Generator().manual_seed(3), **options)
            for model, graph in ((fast, True), (reference, False))]
    assert torch.equal(runs[0], runs[1])


@pytest.fixture(scope="module")
def shared_pair():
    return reference_and_prepared("torch")


@pytest.mark.parametrize("copies", [1, 3])
def test_seeded_sampling_with_several_sequences_equals_the_reference(copies):
    reference, fast = reference_and_prepared("torch")
    runs = [model.generate(ids_batch(4, 2, 6), do_sample=True, num_return_sequences=copies, max_new_tokens=10,
                           top_k=0, generator=torch.Generator().manual_seed(7), decode_graph=graph)
            for model, graph in ((fast, True), (reference, False))]
    assert torch.equal(runs[0], runs[1])


def test_step_logits_equal_the_reference_in_float32():
    reference, fast = reference_and_prepared("torch")
    runs = [model.generate(ids_batch(5, 3, 6), max_new_tokens=8, return_dict_in_generate=True, output_logits=True,
                           decode_graph=graph) for model, graph in ((fast, True), (reference, False))]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(runs[0].logits, runs[1].logits)) <= 1e-5


def test_threads_with_different_batch_sizes_on_one_prepared_model():
    _, fast = reference_and_prepared("torch")
    prompts = [ids_batch(seed, 1 + seed % 3, 4 + seed) for seed in range(4)]
    alone = [fast.generate(p, max_new_tokens=7, decode_graph=True) for p in prompts]
    results = results_of_threads(lambda i: fast.generate(prompts[i], max_new_tokens=7, decode_graph=True),
                                 len(prompts))
    assert all(torch.equal(results[i], alone[i]) for i in range(len(prompts)))


def test_a_deepcopy_is_independent_and_restore_equals_never_prepared():
    reference, fast = reference_and_prepared("onednn")
    twin = copy.deepcopy(fast)
    assert twin.inference_session is not fast.inference_session
    with torch.no_grad():
        twin.decoder.layers[0].self_attn.k_proj.weight.mul_(3)
    assert_same_tokens(fast, reference, ids_batch(3))
    inference.restore(fast)
    ids = ids_batch(4)
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, reference(ids).logits)
    assert_same_tokens(fast, reference, ids)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) on CPU needs a C++ compiler (g++ or c++)")
def test_the_compiled_step_sees_weight_and_backend_changes():
    """One compilation, then changes that keep (in-place) or move (new storage) the weights."""
    reference, fast = reference_and_prepared("torch")

    def replace_v(model: nn.Module) -> None:
        v_proj = model.decoder.layers[0].self_attn.v_proj
        v_proj.weight.data = torch.linspace(-1, 1, v_proj.weight.numel()).view_as(v_proj.weight)

    ids = ids_batch(3)
    for change in (lambda m: None, _mul_query_key, replace_v, CHANGES[1][1],
                   lambda m: optkit.set_backend(m, attention="eager")):
        each((reference, fast), change)
        runs = [model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, return_dict_in_generate=True,
                               output_logits=True, **options)
                for model, options in ((fast, {"compile": True}), (reference, {"decode_graph": False}))]
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        assert max(float((a - b).abs().max()) for a, b in zip(runs[0].logits, runs[1].logits)) <= 1e-5
    # torch.compile does not guard on hooks: a hook added after the compilation must still run
    handles = [model.decoder.layers[0].mlp.register_forward_hook(lambda module, args, output: output * 0.5)
               for model in (reference, fast)]
    with pytest.warns(RuntimeWarning, match="forward hooks"):
        got = fast.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, compile=True)
    assert torch.equal(got, reference.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, decode_graph=False))
    for handle in handles:
        handle.remove()


def test_a_kept_step_is_not_replayed_once_hooks_change():
    """A captured graph replays the hooks it captured: adding or removing one changes what a kept step matches."""
    model = optkit.build("opt-tiny", linear="torch").eval()
    before = step_key(model, 1, 16, "static", False)
    handle = model.decoder.layers[1].self_attn.register_forward_pre_hook(lambda module, args: None)
    with_hook = step_key(model, 1, 16, "static", False)
    handle.remove()
    assert with_hook != before and step_key(model, 1, 16, "static", False) == before
