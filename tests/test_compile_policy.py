"""``compile="auto"``: which decode step runs for which model, batch, device and cache state (no timing)."""

from __future__ import annotations

import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
from optkit.inference import policy
from optkit.inference.policy import TINY_MODEL_BYTES, choose_decode_step, choose_for

MIB = 2**20
OPT_125M = 125_000_000 * 4  # fp32 bytes
OPT_1_3B = 1_300_000_000 * 4


def choose(**overrides):
    args = dict(device_type="cpu", batch_size=1, new_tokens=64, weight_bytes=OPT_125M, warm_cache=False,
                compiler_available=True, graph_unsupported=None)
    args.update(overrides)
    return choose_decode_step(**args)


def test_cold_short_generation_on_cpu_stays_eager():
    """64 tokens of opt-125m save ~2 s: far below a cold compile."""
    choice = choose()
    assert choice.step == "eager" and "compile cost" in choice.reason


def test_warm_cache_compiles():
    assert choose(warm_cache=True).step == "compiled"


def test_long_generation_of_a_large_model_repays_a_cold_compile():
    choice = choose(weight_bytes=OPT_1_3B, new_tokens=512)
    assert choice.step == "compiled" and "expected saving" in choice.reason


def test_batch_lowers_the_expected_saving():
    """At batch 8 the compiled step gains little over MKL's GEMMs: the same work does not repay it."""
    assert choose(weight_bytes=OPT_1_3B, new_tokens=128, batch_size=1).step == "compiled"
    assert choose(weight_bytes=OPT_1_3B, new_tokens=128, batch_size=8).step == "eager"


def test_no_compiler_means_no_compile():
    choice = choose(warm_cache=True, compiler_available=False)
    assert choice.step == "eager" and "not available" in choice.reason


def test_cuda_uses_the_graph_unless_a_warm_cache_exists():
    assert choose(device_type="cuda", weight_bytes=OPT_1_3B, new_tokens=4096).step == "graph"
    assert choose(device_type="cuda", warm_cache=True).step == "compiled"
    assert choose(device_type="cuda", compiler_available=False).step == "graph"


def test_unsupported_step_runs_the_plain_loop():
    choice = choose(warm_cache=True, graph_unsupported="beam search reorders the cache between steps")
    assert choice.step == "eager" and "beam search" in choice.reason


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 64), new=st.integers(1, 100_000), weight=st.integers(0, TINY_MODEL_BYTES - 1),
       warm=st.booleans(), device=st.sampled_from(["cpu", "cuda"]))
def test_tiny_models_never_compile(batch, new, weight, warm, device):
    assert choose(batch_size=batch, new_tokens=new, weight_bytes=weight, warm_cache=warm,
                  device_type=device).step != "compiled"


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 16), new=st.integers(1, 50_000), weight=st.integers(TINY_MODEL_BYTES, 30 * 2**30))
def test_more_tokens_never_turn_a_compile_off(batch, new, weight):
    """Monotone in the work: if n tokens repay the compile, 2n do too."""
    if choose(batch_size=batch, new_tokens=new, weight_bytes=weight).step == "compiled":
        assert choose(batch_size=batch, new_tokens=2 * new, weight_bytes=weight).step == "compiled"


def test_bundled_default_model_short_generation_is_eager(monkeypatch):
    """The bundled model's shape, read from a real model: never compiled, even with a warm cache."""
    model = optkit.build("optkit-default").eval()
    optkit.inference.prepare(model)
    monkeypatch.setattr(policy, "compiler_available", lambda device_type: True)
    monkeypatch.setattr("optkit.inference.compile_cache.has_entry", lambda *a: True)
    choice = choose_for(model, batch_size=1, new_tokens=200, max_length=220)
    assert choice.step == "eager" and "never compiled" in choice.reason


def test_choose_for_reads_beam_search_and_the_cache(monkeypatch, tmp_path):
    model = optkit.build("opt-tiny").eval()
    monkeypatch.setattr(policy, "TINY_MODEL_BYTES", 0)
    monkeypatch.setattr(policy, "compiler_available", lambda device_type: True)
    assert choose_for(model, 1, 8, 16, num_beams=2).step == "eager"
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", str(tmp_path))
    assert choose_for(model, 1, 8, 16, cache_kind="static").step == "eager"  # cold, short
    monkeypatch.setattr("optkit.inference.compile_cache.has_entry", lambda *a: True)
    assert choose_for(model, 1, 8, 16, cache_kind="static").step == "compiled"


def test_choose_for_asks_for_the_compiler_only_when_it_would_compile(monkeypatch, tmp_path):
    """Asking imports inductor (~2 s of a process's first generate): not for a call that runs the eager step."""
    model = optkit.build("opt-tiny").eval()
    asked = []
    monkeypatch.setattr(policy, "compiler_available", lambda device_type: asked.append(device_type) or False)
    assert choose_for(model, 1, 8, 16).step == "eager" and asked == []  # a tiny model
    monkeypatch.setattr(policy, "TINY_MODEL_BYTES", 0)
    monkeypatch.setenv("OPTKIT_COMPILE_CACHE", str(tmp_path))
    assert choose_for(model, 1, 8, 16).step == "eager" and asked == []  # cold and short
    monkeypatch.setattr("optkit.inference.compile_cache.has_entry", lambda *a: True)
    choice = choose_for(model, 1, 8, 16)  # warm: it would compile, so the compiler is looked for -- and missing
    assert asked == ["cpu"] and choice.step == "eager" and "not available" in choice.reason


def test_a_first_generate_does_not_import_inductor():
    code = ("import sys, torch, optkit; m = optkit.build('opt-tiny').eval(); "
            "m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3); "
            "print('torch._inductor.compile_fx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_compiler_available_is_a_bool():
    assert all(isinstance(policy.compiler_available(device), bool) for device in ("cpu", "cuda"))


# -- the policy is generate()'s default ---------------------------------------------------------------
def _tiny_model():
    import optkit

    torch.manual_seed(0)
    return optkit.build("opt-tiny").eval()


def test_generate_asks_the_policy_when_compile_is_not_given(monkeypatch):
    """``compile=None`` (the default) is the policy's choice; explicit True/False and decode_graph=False win."""
    import optkit.inference.policy as policy
    from optkit import generation
    from optkit.generation_config import GenerationConfig

    model = _tiny_model()
    asked: list[tuple[int, int]] = []

    def fake_choose_for(model, batch_size, new_tokens, max_length, **kwargs):
        asked.append((batch_size, new_tokens))
        return policy.DecodeChoice("compiled", "test")

    monkeypatch.setattr(policy, "choose_for", fake_choose_for)
    ids = torch.tensor([[2, 5, 6, 7]] * 3)
    settings = generation._settings(model, ids, None, GenerationConfig(max_new_tokens=5), None, None)
    assert generation._use_compile(model, GenerationConfig(max_new_tokens=5), settings, ids) is True
    assert asked == [(3, 5)]
    assert generation._use_compile(model, GenerationConfig(compile=False), settings, ids) is False
    assert generation._use_compile(model, GenerationConfig(decode_graph=False), settings, ids) is False
    assert len(asked) == 1


def test_the_default_generate_of_a_small_model_runs_the_eager_step():
    """No stall: a model under the size threshold never compiles by default, and the tokens are the plain loop's."""
    from optkit import generation
    from optkit.generation_config import GenerationConfig

    model = _tiny_model()
    ids = torch.tensor([[2, 5, 6, 7]])
    settings = generation._settings(model, ids, None, GenerationConfig(max_new_tokens=8), None, None)
    assert generation._use_compile(model, GenerationConfig(max_new_tokens=8), settings, ids) is False
    assert torch.equal(model.generate(ids, max_new_tokens=8), model.generate(ids, max_new_tokens=8, compile=False))
