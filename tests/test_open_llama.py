"""Open-Llama, the second family built from the kit: components, checkpoint format, and parity.

The reference is transformers' OpenLlama, whose last working release is transformers 4.31 (v5
removed it). It is never imported here: tests/oracles/make_open_llama_fixtures.py ran once with
transformers==4.31.0 and wrote tests/fixtures/open_llama/<case>/ (the checkpoint 4.31 saved, the
inputs, and 4.31's logits, greedy tokens and cached-generate logits). Parity: fp32, within 1e-5
at real positions. Every attention backend usable here, and the third-party example backend,
must give eager's logits.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import optkit
from optkit.errors import SpecValidationError
from optkit.formats.open_llama import config_from_spec, spec_from_config
from optkit.spec import load_spec
from optkit.testing import add_plugin, fresh_registry
from optkit_llama_components.norms import RMSNorm
from optkit_llama_components.rotary import RotaryEmbedding, inverse_frequencies
from tests.helpers import OPEN_LLAMA_TINY, load_example_plugin, tiny_open_llama

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
TINY = OPEN_LLAMA_TINY  # the transformers-style config of every random tiny Open-Llama here
LINEAR = dict(rope_scaling={"type": "linear", "factor": 2.0})
DYNAMIC = dict(rope_scaling={"type": "dynamic", "factor": 2.0})
PARITY: dict[str, float] = {}  # label -> max |error|, printed at the end of the module


def say(request, line: str) -> None:
    """Straight to the terminal, past output capturing: timings and parity numbers are the point."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def parity_report(request):
    yield
    if PARITY:
        lines = [f"  {label:<52} {err:.2e}" for label, err in sorted(PARITY.items())]
        say(request, "\nOpen-Llama parity, max |optkit - reference|:\n" + "\n".join(lines))


def left_padded(batch: int, length: int, pads: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, TINY["pad_token_id"]), mask


def max_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    return (diff[mask.bool()] if mask is not None else diff).max().item()


# -- components -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_normalizes_in_fp32_and_casts_back_before_the_weight(dtype):
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    norm = norm.to(dtype)
    x = (torch.randn(2, 3, 8) * 30).to(dtype)
    h = x.float()
    expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(norm(x), expected)
    assert norm(x).dtype == dtype


def test_rmsnorm_eps_comes_from_the_spec():
    model = tiny_open_llama(rms_norm_eps=1e-5)
    assert {m.eps for m in model.modules() if isinstance(m, RMSNorm)} == {1e-5}
    assert len([m for m in model.modules() if isinstance(m, RMSNorm)]) == 2 * TINY["num_hidden_layers"] + 1


def test_rotary_uses_the_half_split_layout():
    rope = RotaryEmbedding(16, 10000.0, "none", 1.0, 32)
    q = torch.zeros(1, 1, 1, 16)
    q[..., 3] = 1.0
    rotated, _ = rope.rotate(q, q, torch.tensor([[5]]))
    angle = 5 * inverse_frequencies(10000.0, 16)[3]
    expected = torch.zeros(16)
    expected[3], expected[3 + 8] = torch.cos(angle), torch.sin(angle)  # pairs (i, i + d/2), not (2i, 2i+1)
    torch.testing.assert_close(rotated.flatten(), expected)


def test_rotary_scores_depend_on_relative_positions_only():
    rope = RotaryEmbedding(16, 10000.0, "none", 1.0, 32)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(pq: int, pk: int) -> torch.Tensor:
        rq, _ = rope.rotate(q, q, torch.tensor([[pq]]))
        _, rk = rope.rotate(k, k, torch.tensor([[pk]]))
        return (rq * rk).sum(-1)

    torch.testing.assert_close(score(9, 4), score(25, 20), atol=1e-5, rtol=0)


def test_linear_scaling_divides_positions_by_the_factor():
    plain = RotaryEmbedding(16, 10000.0, "none", 1.0, 32)
    linear = RotaryEmbedding(16, 10000.0, "linear", 4.0, 32)
    positions = torch.arange(0, 60, 4)[None]
    for ours, theirs in zip(linear.cos_sin(positions, torch.float32), plain.cos_sin(positions // 4, torch.float32)):
        assert torch.equal(ours, theirs)


def test_dynamic_ntk_is_a_pure_function_of_each_rows_length():
    plain = RotaryEmbedding(16, 10000.0, "none", 1.0, 32)
    dynamic = RotaryEmbedding(16, 10000.0, "dynamic", 2.0, 32)
    short, long = torch.arange(20)[None], torch.arange(48)[None]
    before = dynamic.cos_sin(short, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(before, plain.cos_sin(short, torch.float32)))  # <= 32: plain RoPE
    base = 10000.0 * ((2.0 * 48 / 32) - 1.0) ** (16 / 14)  # transformers' formula at length 48
    angles = long[..., None].float() * inverse_frequencies(base, 16)
    assert torch.equal(dynamic.cos_sin(long, torch.float32)[0], torch.cat([angles, angles], -1).cos().unsqueeze(1))
    after = dynamic.cos_sin(short, torch.float32)  # transformers would keep the enlarged base here
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    mixed = torch.stack([torch.arange(48), torch.cat([torch.full((18,), -1), torch.arange(30)])])
    cos = dynamic.cos_sin(mixed, torch.float32)[0]
    assert torch.equal(cos[0], dynamic.cos_sin(long, torch.float32)[0][0])  # 48 long: scaled
    assert torch.equal(cos[1, :, 18:], plain.cos_sin(torch.arange(30)[None], torch.float32)[0][0])  # 30: not


def test_rotary_rejects_a_factor_that_does_not_fit_the_scaling():
    for scaling, problem in ((dict(scaling="linear", factor=1.0), "needs a factor > 1"),
                             (dict(factor=2.0), "used only with scaling 'linear' or 'dynamic'")):
        spec = spec_from_config(TINY).to_dict()
        spec["decoder"]["positional_embedding"]["params"].update(scaling)
        with pytest.raises(SpecValidationError) as info:
            load_spec(spec)
        assert info.value.problems[0].startswith("decoder.positional_embedding.params: Value error")
        assert problem in info.value.problems[0]


def test_gated_mlp_names_and_bias_follow_the_spec():
    model = tiny_open_llama()
    mlp = model.decoder.layers[0].mlp
    x = torch.randn(2, 5, TINY["hidden_size"])
    expected = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert torch.equal(mlp(x), expected)
    assert mlp.gate_proj.bias is None and model.decoder.layers[0].self_attn.q_proj.bias is None
    spec = model.spec.to_dict()
    spec["decoder"]["bias"] = True
    biased = optkit.build(load_spec(spec)).decoder.layers[0].mlp
    assert all(getattr(biased, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj"))


def test_stable_embedding_normalizes_ids_but_not_user_embeddings():
    model = tiny_open_llama()
    ids, _ = left_padded(2, 7, [0, 0])
    embed = model.decoder.embed_tokens
    raw = F.embedding(ids, embed.weight)
    with torch.no_grad():
        assert torch.equal(embed(ids), embed.layer_norm(raw))
        assert torch.equal(model(inputs_embeds=embed.layer_norm(raw)).logits, model(ids).logits)
        assert not torch.allclose(model(inputs_embeds=raw).logits, model(ids).logits)


def test_shared_head_is_open_llamas_einsum_over_the_embedding_matrix():
    model = tiny_open_llama()
    assert model.head.tied and model.head.weight is model.decoder.embed_tokens.weight
    ids, _ = left_padded(2, 9, [0, 0])
    with torch.no_grad():
        hidden = model.decoder(input_ids=ids, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None,
                               output_hidden_states=False, output_attentions=False)[0]
        expected = torch.einsum("blh,vh->blv", hidden, model.decoder.embed_tokens.weight)
        PARITY["shared head: F.linear vs einsum"] = max_err(model(ids).logits, expected)
        assert PARITY["shared head: F.linear vs einsum"] <= ATOL


# -- attention and the KV cache with rotary positions ---------------------------------------------
def _incremental(model: optkit.Model, ids: torch.Tensor, mask: torch.Tensor, prefill: int,
                 cache_kind: str) -> torch.Tensor:
    """Logits of a prefill of ``prefill`` tokens, then one token per step through a KV cache."""
    cache = model.new_cache(ids.shape[0], max_length=ids.shape[1], kind=cache_kind)
    chunks = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache).logits]
    for t in range(prefill, ids.shape[1]):
        chunks.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits)
    return torch.cat(chunks, dim=1)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("scaling,length", [("none", 24), ("linear", 44), ("dynamic", 30)])
def test_cached_equals_uncached(scaling, length, attention):
    """With linear scaling past the trained length too; dynamic NTK up to it (see the next test)."""
    model = tiny_open_llama(attention=attention, **{"none": {}, "linear": LINEAR, "dynamic": DYNAMIC}[scaling])
    ids, mask = left_padded(3, length, [0, 3, 7])
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        for kind in ("dynamic", "static"):
            err = max_err(_incremental(model, ids, mask, 6, kind), full, mask)
            assert err <= ATOL, kind


def test_dynamic_ntk_cached_past_the_trained_length_keeps_each_steps_base():
    """Documented difference: past ``original_max_positions`` a cached step rotates its new key with
    the base of the current length while cached keys keep theirs (as transformers 4.31's generate);
    one uncached pass rotates every key with the final length's base. Up to the trained length the
    two agree exactly."""
    model = tiny_open_llama(**DYNAMIC)
    ids, mask = left_padded(1, 40, [0])
    with torch.no_grad():
        cached = _incremental(model, ids, mask, 6, "dynamic")
        full = model(ids).logits
        assert max_err(cached[:, :32], model(ids[:, :32]).logits) <= ATOL
        assert max_err(cached[:, -1], full[:, -1]) > 1e-4


@pytest.mark.parametrize("scaling", ["linear", "dynamic"])
def test_long_left_padded_rows_equal_their_own_runs(scaling):
    """Dynamic NTK takes each row's own length, so a row's logits do not depend on its batch."""
    model = tiny_open_llama(**{"linear": LINEAR, "dynamic": DYNAMIC}[scaling])
    ids, mask = left_padded(2, 44, [0, 16])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for row, pad in enumerate([0, 16]):
            alone = model(ids[row:row + 1, pad:]).logits
            assert max_err(batch[row:row + 1, pad:], alone) <= ATOL


def test_inputs_longer_than_the_scaled_context_are_refused():
    with torch.no_grad():
        tiny_open_llama(**DYNAMIC)(torch.randint(3, 100, (1, 64)))  # 2 x 32 fits
        with pytest.raises(optkit.InputError, match="exceeds the model's maximum of 32 positions"):
            tiny_open_llama()(torch.randint(3, 100, (1, 33)))


# -- checkpoint format ----------------------------------------------------------------------------
def test_missing_config_fields_take_the_signature_defaults_not_the_docstrings():
    spec = spec_from_config({})
    d = spec.decoder
    assert (d.vocab_size, d.hidden_size, d.ffn_dim, d.num_layers, d.num_heads, d.max_positions) == (
        100000, 4096, 11008, 32, 32, 2048)
    assert d.norm.model_dump() == {"name": "rmsnorm", "params": {"eps": 1e-6}}
    assert d.token_embedding.name == "stable" and spec.head.params == {"tie_word_embeddings": True}
    assert spec.tokens.model_dump() == {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    assert (d.bias, d.query_scaling, d.dropout, d.attention_dropout) == (False, "scores", 0.0, 0.1)
    assert d.mlp.params == {"activation": "silu", "dropout": 0.1}
    assert spec_from_config({"use_memorry_efficient_attention": True}) == spec  # V2's typo is accepted


def test_rope_scaling_becomes_rotary_params_and_a_longer_context():
    d = spec_from_config({**TINY, **DYNAMIC, "rope_theta": 20000.0}).decoder
    assert d.positional_embedding.params == {"theta": 20000.0, "scaling": "dynamic", "factor": 2.0,
                                             "original_max_positions": 32}
    assert d.max_positions == 64
    assert spec_from_config(TINY).decoder.positional_embedding.params == {"theta": 10000.0}


@pytest.mark.parametrize("scaling,problem", [
    ({"type": "yarn", "factor": 2.0}, "rope_scaling: type must be one of linear, dynamic, got 'yarn'"),
    ({"type": "linear", "factor": 1.0}, "rope_scaling: factor must be a number > 1, got 1.0"),
    ({"type": "linear"}, "rope_scaling: must be a mapping with exactly 'type' and 'factor', got {'type': 'linear'}"),
])
def test_bad_rope_scaling_is_reported(scaling, problem):
    with pytest.raises(SpecValidationError) as info:
        spec_from_config({**TINY, "rope_scaling": scaling}, source="config.json")
    assert info.value.problems == [problem] and info.value.source == "config.json"


@pytest.mark.parametrize("config", [
    {}, dict(use_stable_embedding=False, shared_input_output_embedding=False, rms_norm_eps=1e-5), LINEAR, DYNAMIC,
    dict(hidden_act="gelu", rope_theta=5e5, hidden_dropout_prob=0.0, attention_dropout_prob=0.0)])
def test_config_round_trip(config):
    spec = spec_from_config({**TINY, **config})
    written = config_from_spec(spec)
    assert spec_from_config(written) == spec
    for key, value in {**TINY, **config}.items():
        assert written[key] == value, key


def test_save_pretrained_writes_open_llamas_layout(tmp_path):
    shared = tiny_open_llama().save_pretrained(tmp_path / "shared")
    keys = set(load_file(str(shared / "model.safetensors")))
    layer = {f"model.layers.0.{k}.weight" for k in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    assert layer <= keys and "model.norm.weight" in keys
    assert {"model.embed_tokens.weight", "model.embed_layer_norm.weight", "model.embed_layer_norm.bias"} <= keys
    assert len(keys) == 3 + 1 + 9 * TINY["num_hidden_layers"]  # no lm_head: the embedding is the head
    config = json.loads((shared / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("open-llama", ["OpenLlamaForCausalLM"])
    untied = tiny_open_llama(use_stable_embedding=False, shared_input_output_embedding=False)
    plain = untied.save_pretrained(tmp_path / "p")
    keys = set(load_file(str(plain / "model.safetensors")))
    assert "lm_head.weight" in keys and not any("embed_layer_norm" in k for k in keys)
    base = tiny_open_llama(head="base").save_pretrained(tmp_path / "base")
    assert "embed_tokens.weight" in load_file(str(base / "model.safetensors"))  # OpenLlamaModel: no prefix


@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification", "base"])
def test_checkpoint_round_trip_is_exact(tmp_path, head):
    model = tiny_open_llama(head=head, **DYNAMIC)
    directory = model.save_pretrained(tmp_path / head)
    weights = load_file(str(directory / "model.safetensors"))  # 4.31-era files carry rotary buffers: ignored
    prefix = "" if head == "base" else "model."
    weights[f"{prefix}layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, str(directory / "model.safetensors"))
    loaded = optkit.from_pretrained(directory, head=head)
    assert loaded.spec == model.spec.with_components(attention="eager")
    ids, mask = left_padded(2, 40, [0, 5])
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask), loaded(ids, attention_mask=mask)
    key = "last_hidden_state" if head == "base" else "logits"
    assert torch.equal(getattr(ours, key), getattr(theirs, key))


def test_specs_open_llama_cannot_express_are_refused_with_reasons():
    spec = spec_from_config(TINY).to_dict()
    spec["decoder"].update(bias=True, dropout=0.1, mlp={"name": "ffn", "params": {"activation": "relu"}})
    spec["head"] = {"name": "question_answering"}
    with pytest.raises(SpecValidationError) as info:
        config_from_spec(load_spec(spec))
    assert info.value.problems == [
        "decoder.mlp: 'ffn' has no Open-Llama equivalent (needs 'gated')",
        "decoder.bias: Open-Llama needs False",
        "decoder.dropout: Open-Llama needs 0.0 (Open-Llama drops out the MLP output only: use "
        "decoder.mlp.params.dropout)",
        "head: 'question_answering' has no transformers Open-Llama class (causal_lm, base, sequence_classification)"]


# -- presets and example specs ----------------------------------------------------------------------
def test_open_llama_7b_preset_is_v1():
    spec = load_spec("open-llama-7b")
    assert spec == spec_from_config({}).with_components(attention="eager")  # OpenLlamaConfig() is V1
    model = optkit.build(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 6_885_879_808
    assert model.decoder.embed_tokens.layer_norm.weight.numel() * 2 == 8192  # V1's README: 8192 parameters


@pytest.mark.parametrize("name", ["open-llama-tiny", "open-llama-tiny-v2-style"])
def test_tiny_presets_build_and_save(tmp_path, name):
    model = optkit.build(name).eval()
    with torch.no_grad():
        logits = model(torch.randint(3, 100, (1, 8))).logits
    assert logits.shape == (1, 8, model.spec.decoder.vocab_size)
    assert config_from_spec(model.spec)["model_type"] == "open-llama"


def test_example_specs_validate():
    specs = sorted((ROOT / "examples" / "specs").glob("open-llama-*.yaml"))
    assert len(specs) >= 2
    loaded = {p.stem: load_spec(p) for p in specs}
    assert all(s.family == "open-llama" for s in loaded.values())
    v1 = loaded["open-llama-7b"]
    assert v1 == spec_from_config({}).with_components(attention="eager")
    ntk = loaded["open-llama-7b-dynamic-ntk"]
    assert ntk.decoder.positional_embedding.params == {"theta": 10000.0, "scaling": "dynamic", "factor": 2.0,
                                                       "original_max_positions": 2048}
    assert ntk == spec_from_config(DYNAMIC).with_components(attention="sdpa")


# == parity with transformers 4.31's OpenLlama, through fixtures ===================================
FIXTURES = ROOT / "tests" / "fixtures" / "open_llama"
MAKER = "tests/oracles/make_open_llama_fixtures.py"
LOGIT_KEYS = {"causal_lm": "logits", "sequence_classification": "logits", "base": "last_hidden_state"}


@dataclass(frozen=True)
class Case:
    """One fixture directory: a checkpoint written by 4.31 and what 4.31 computed with it."""

    name: str

    @property
    def directory(self) -> Path:
        return FIXTURES / self.name

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.directory / "case.json").read_text())

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        return json.loads((self.directory / "config.json").read_text())

    @functools.cached_property
    def expected(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.directory / "expected.safetensors"))

    @property
    def head(self) -> str:
        return self.meta["head"]

    def run(self, run: str) -> dict[str, Any]:
        return self.meta["runs"][run]

    def inputs(self, run: str) -> dict[str, torch.Tensor]:
        """optkit gets the inputs minus position_ids: it derives positions from the mask, as
        transformers' generate does (the fixtures' explicit positions are exactly those)."""
        return {name: self.expected[f"{run}.{name}"] for name in self.run(run)["inputs"] if name != "position_ids"}

    def output(self, run: str, name: str) -> torch.Tensor:
        return self.expected[f"{run}.{name}"]


@functools.lru_cache(maxsize=None)
def case(name: str) -> Case:
    return Case(name)


@functools.lru_cache(maxsize=None)
def load(name: str, attention: str = "eager") -> optkit.Model:
    return optkit.from_pretrained(FIXTURES / name, head=case(name).head, attention=attention)


def ours(model: optkit.Model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if model.spec.head.name == "base" else out.logits


def fixture_runs(*kinds: str) -> list[tuple[str, str]]:
    return [(name, run) for name in sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
            for run, meta in case(name).meta["runs"].items() if meta["kind"] in kinds]


def real_positions(inputs: dict[str, torch.Tensor], head: str) -> torch.Tensor | None:
    """Where to compare: tokens that are not padding (sequence classification: every pooled row)."""
    return None if head == "sequence_classification" else inputs.get("attention_mask")


FORWARDS = fixture_runs("forward", "seqcls")
GREEDY = fixture_runs("greedy")
GENERATE = fixture_runs("generate")


def test_fixtures_are_small_safetensors_checkpoints_written_by_4_31():
    """No pickle in the repo; each case is 4.31's own save_pretrained output plus what it computed."""
    names = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
    assert names == ["base", "dynamic", "linear", "seqcls", "v1", "v2"]
    for name in names:
        files = sorted(p.name for p in case(name).directory.iterdir())
        assert files == ["case.json", "config.json", "expected.safetensors", "model.safetensors"], name
        assert case(name).config["transformers_version"] == case(name).meta["transformers"] == "4.31.0"
        assert case(name).config["architectures"] == [case(name).meta["class"]]
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 1.5 * 2**20, f"{total} bytes of fixtures"
    seen = {run for name in names for run in case(name).meta["runs"]}
    assert {"plain", "left", "left_arange", "embeds", "long", "short_after_long", "greedy", "greedy_cross",
            "generate", "generate_cross", "seqcls_left", "seqcls_right", "hidden_left"} <= seen


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name,run", FORWARDS, ids=[f"{n}-{r}" for n, r in FORWARDS])
def test_logits_match_transformers_4_31(name, run, attention):
    """fp32, at real positions: lm / seq-cls logits, or the base model's last hidden state."""
    fixture = case(name)
    inputs = fixture.inputs(run)
    expected = fixture.output(run, LOGIT_KEYS[fixture.head])
    got = ours(load(name, attention), inputs)
    assert got.shape == expected.shape
    err = PARITY[f"{name}/{run} ({attention})"] = max_err(got, expected, real_positions(inputs, fixture.head))
    assert err <= ATOL


def test_fixture_models_are_what_their_config_says():
    """The fixtures exercise what they claim to: each V1/V2 switch, each rope scaling, each head."""
    embedding = {n: type(load(n).decoder.embed_tokens).__name__ for n in ("v1", "v2", "linear", "dynamic")}
    assert embedding["v1"] == embedding["linear"] != embedding["v2"] == embedding["dynamic"]
    assert [load(n).head.tied for n in ("v1", "v2", "linear", "dynamic")] == [True, False, False, True]
    scaling = {n: load(n).spec.decoder.positional_embedding.params.get("scaling", "none")
               for n in ("v1", "linear", "dynamic")}
    assert scaling == {"v1": "none", "linear": "linear", "dynamic": "dynamic"}
    assert load("v2").spec.decoder.norm.params == {"eps": 1e-5}
    assert (load("seqcls").spec.head.name, load("base").spec.head.name) == ("sequence_classification", "base")


def test_sequence_classification_pooling():
    """optkit pools the rightmost non-pad token. The fixtures take it from 4.31's per-position scores:
    4.31's own pooling, ``count(non-pad) - 1``, is right for right padding only."""
    fixture = case("seqcls")
    right, left = fixture.output("seqcls_right", "pooled_4_31"), fixture.output("seqcls_left", "pooled_4_31")
    assert max_err(right, fixture.output("seqcls_right", "logits")) == 0.0
    assert max_err(ours(load("seqcls"), fixture.inputs("seqcls_right")), right) <= ATOL
    padded_rows = fixture.output("seqcls_left", "attention_mask").eq(0).any(-1)
    assert (left - fixture.output("seqcls_left", "logits")).abs()[padded_rows].min() > 1e-3  # 4.31's bug
    ids = fixture.output("seqcls_left", "input_ids").clone()
    ids[0, 4] = TINY["pad_token_id"]  # row 0 has no padding but contains the pad id
    assert load("seqcls").head.pool_index(ids, 3, 12).tolist() == [11, 11, 11]


def uncached_greedy(net: optkit.Model, ids: torch.Tensor, mask: torch.Tensor | None, steps: int) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, net(ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


@pytest.mark.parametrize("name,run", GREEDY, ids=[f"{n}-{r}" for n, r in GREEDY])
def test_greedy_tokens_match_transformers_uncached_loop(name, run):
    """optkit's uncached loop always; its cached generate too, except dynamic NTK past the trained
    length (the cache keeps each key's base, see test_generate_matches_4_31_cached_generate)."""
    fixture, net = case(name), load(name)
    inputs, steps, expected = fixture.inputs(run), fixture.run(run)["steps"], fixture.output(run, "tokens")
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    assert torch.equal(uncached_greedy(net, ids, mask, steps), expected)
    crosses = ids.shape[1] + steps > fixture.config["max_position_embeddings"]
    if not (crosses and net.spec.decoder.positional_embedding.params.get("scaling") == "dynamic"):
        got = net.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=[])
        assert torch.equal(got, expected)


def cached_step_logits(net: optkit.Model, ids: torch.Tensor, mask: torch.Tensor, prompt: int) -> torch.Tensor:
    """(batch, steps, vocab): the next-token logits of each decoding step of ``ids``, through a KV cache."""
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], ids.shape[1] - prompt)], dim=1)
    cache = net.new_cache(ids.shape[0])
    with torch.no_grad():
        steps = [net(ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache).logits[:, -1]]
        for t in range(prompt, ids.shape[1] - 1):
            steps.append(net(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("name,run", GENERATE, ids=[f"{n}-{r}" for n, r in GENERATE])
def test_generate_matches_4_31_cached_generate(name, run):
    """Tokens and per-step logits, with a left-padded prompt and (``*_cross``) 26 -> 38 tokens, past the
    trained 32. For dynamic NTK both libraries rotate each new key with the current length's base and
    keep the cached keys' bases; uncached passes over each prefix agree up to 32 tokens, then not."""
    fixture, net = case(name), load(name)
    inputs, steps = fixture.inputs(run), fixture.run(run)["steps"]
    ids, mask = inputs["input_ids"], inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    expected, scores = fixture.output(run, "tokens"), fixture.output(run, "scores")
    assert torch.equal(net.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=[]), expected)
    err = PARITY[f"{name}/{run}: cached step logits vs 4.31 generate"] = max_err(
        cached_step_logits(net, expected, mask, ids.shape[1]), scores)
    assert err <= ATOL
    if name == "dynamic" and run == "generate_cross":
        with torch.no_grad():
            prefixes = range(ids.shape[1], expected.shape[1])
            uncached = torch.stack([net(expected[:, :n]).logits[:, -1] for n in prefixes], dim=1)
        trained = fixture.config["max_position_embeddings"]
        within = [i for i, n in enumerate(prefixes) if n <= trained]
        past = [i for i, n in enumerate(prefixes) if n > trained]
        assert within and past
        assert max_err(uncached[:, within], scores[:, within]) <= ATOL
        PARITY["dynamic: uncached vs 4.31 cached, past 32 (by design)"] = max_err(uncached[:, past], scores[:, past])
        assert PARITY["dynamic: uncached vs 4.31 cached, past 32 (by design)"] > 1e-4


def test_transformers_dynamic_ntk_depends_on_history_optkit_does_not():
    fixture, net = case("dynamic"), load("dynamic")
    fresh, after = fixture.output("short", "logits"), fixture.output("short_after_long", "logits")
    assert fixture.run("short_after_long")["after"] == "long"
    PARITY["dynamic: 4.31 short after long vs fresh (not optkit)"] = max_err(fresh, after)
    assert max_err(fresh, after) > 1e-3  # transformers kept the base of the 48-token input
    ours(net, fixture.inputs("long"))  # a long input first changes nothing in optkit
    assert max_err(ours(net, fixture.inputs("short_after_long")), fresh) <= ATOL


# Where optkit's save_pretrained differs from 4.31's, and why.
ONLY_IN_4_31_FILES = re.compile(r"(^|\.)layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # a persistent buffer
CONFIG_DIFFERENCES = {
    "transformers_version": "written by transformers itself",
    "rope_theta": "4.32-4.57 read it; 4.31 hard-codes 10000 and ignores the field",
    "use_memory_efficient_attention": "optkit always writes False (see 'Training' in docs/open-llama.md)",
}


@pytest.mark.parametrize("name", ["v1", "v2", "linear", "dynamic", "seqcls", "base"])
def test_save_pretrained_writes_what_4_31_writes(tmp_path, name):
    """Same key set (less 4.31's rotary buffers), same tensors, the same config fields and values
    (less CONFIG_DIFFERENCES); reloading what optkit wrote gives bitwise-identical outputs."""
    fixture, net = case(name), load(name)
    theirs = load_file(str(fixture.directory / "model.safetensors"))
    written = net.save_pretrained(tmp_path / name)
    mine = load_file(str(written / "model.safetensors"))
    assert set(mine) == {k for k in theirs if not ONLY_IN_4_31_FILES.search(k)}
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    config = json.loads((written / "config.json").read_text())
    assert set(config) ^ set(fixture.config) <= {"transformers_version", "rope_theta"}
    differing = {k for k in set(config) | set(fixture.config) if config.get(k) != fixture.config.get(k)}
    assert differing <= set(CONFIG_DIFFERENCES), {k: (config.get(k), fixture.config.get(k)) for k in differing}
    assert config["rope_theta"] == 10000.0 and config["use_memory_efficient_attention"] is False
    reloaded = optkit.from_pretrained(written, head=fixture.head)
    assert reloaded.spec == net.spec
    run = next(r for r, meta in fixture.meta["runs"].items() if meta["kind"] in ("forward", "seqcls"))
    assert torch.equal(ours(reloaded, fixture.inputs(run)), ours(net, fixture.inputs(run)))


# == every attention backend, and the third-party example, on Open-Llama ===========================
# imported from the checkout whether or not it is pip-installed, so these tests always see this commit's copy
chunked_plugin = load_example_plugin("third_party_attention_plugin/optkit_chunked_attention",
                                     "optkit_chunked_attention")


def usable_backends() -> list[str]:
    return [name for name in optkit.registry.names("attention")
            if optkit.registry.get("attention", name).unavailable_reasons("cpu", torch.float32) == []]


@pytest.fixture(scope="module")
def chunked_registry() -> optkit.Registry:
    """optkit's own components plus the example plugin, in a registry of their own: the global
    one never sees 'chunked' (fresh_registry + the module's hook, as its loader would call it)."""
    registry = fresh_registry()
    add_plugin(chunked_plugin, registry)
    return registry


@pytest.fixture(scope="module")
def tiny_eager() -> optkit.Model:
    """open-llama-tiny (the preset) with random weights and non-trivial norms, on eager."""
    torch.manual_seed(3)
    model = optkit.build("open-llama-tiny", attention="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def with_backend(model: optkit.Model, attention: Any, registry: optkit.Registry | None = None) -> optkit.Model:
    return optkit.set_backend(copy.deepcopy(model), attention=attention, registry=registry)


@st.composite
def padded_batches(draw: st.DrawFn, vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, mask, prefill): rows padded left, right, both or at random places, at least one real
    token per row; ``prefill`` < length splits the input into a cached prefill and a second chunk."""
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        layout = draw(st.sampled_from(["none", "left", "right", "both", "random"]))
        left = draw(st.integers(0, length - 1)) if layout in ("left", "both") else 0
        right = draw(st.integers(0, length - 1 - left)) if layout in ("right", "both") else 0
        mask[row, :left] = 0
        mask[row, length - right:] = 0
        if layout == "random":
            mask[row] = (torch.rand(length, generator=g) > 0.3).long()
            mask[row, draw(st.integers(0, length - 1))] = 1
    ids = torch.randint(3, vocab, (batch, length), generator=g).masked_fill(mask == 0, 0)
    return ids, mask, draw(st.integers(0, length - 1))


def logits_and_cached(model: optkit.Model, ids: torch.Tensor, mask: torch.Tensor, prefill: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One uncached pass, and the same input as a cached prefill + one chunk (no prefill: uncached)."""
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        if prefill == 0:
            return full, full
        cache = model.new_cache(ids.shape[0])
        first = model(ids[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache).logits
        rest = model(ids[:, prefill:], attention_mask=mask, past_key_values=cache).logits
    return full, torch.cat([first, rest], dim=1)


BACKEND_MODELS: dict[str, optkit.Model] = {}  # one model per backend, across hypothesis examples
BACKENDS = [pytest.param(name, id=name) for name in usable_backends()] + [
    pytest.param({"name": "chunked", "params": {"chunk_size": 3}}, id="chunked(example plugin, 3)")]


@pytest.mark.parametrize("attention", BACKENDS)
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=padded_batches(vocab=512))
def test_every_attention_backend_gives_eagers_open_llama_logits(tiny_eager, chunked_registry, attention, batch):
    """Every backend usable here on cpu/float32 (and the example plugin's), uncached and through the
    KV cache: eager's logits at every real position, within 1e-5."""
    registry = chunked_registry if isinstance(attention, dict) else None
    model = BACKEND_MODELS.get(str(attention))
    if model is None:
        model = BACKEND_MODELS[str(attention)] = with_backend(tiny_eager, attention, registry)
    ids, mask, prefill = batch
    got, got_cached = logits_and_cached(model, ids, mask, prefill)
    expected, expected_cached = logits_and_cached(tiny_eager, ids, mask, prefill)
    label = attention["name"] if isinstance(attention, dict) else attention
    err = max(max_err(got, expected, mask), max_err(got_cached, expected_cached, mask))
    PARITY[f"open-llama-tiny: {label} vs eager (hypothesis)"] = max(
        err, PARITY.get(f"open-llama-tiny: {label} vs eager (hypothesis)", 0.0))
    assert err <= ATOL



def test_backend_list_covers_this_machine():
    assert {"eager", "sdpa"} <= set(usable_backends())


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_third_party_example_backend_on_open_llama_fixtures(chunked_registry, chunk_size):
    """The example plugin (examples/third_party_attention_plugin) on 4.31's checkpoints: eager's
    logits on every fixture forward, and 4.31's tokens through optkit's KV cache."""
    attention = {"name": "chunked", "params": {"chunk_size": chunk_size}}
    for name, run in FORWARDS:
        eager = load(name)
        model = with_backend(eager, attention, chunked_registry)
        assert model.attention_backend == "chunked"
        inputs = case(name).inputs(run)
        positions = real_positions(inputs, case(name).head)
        err = max_err(ours(model, inputs), ours(eager, inputs), positions)
        label = f"chunked({chunk_size}) vs eager, fixtures"
        PARITY[label] = max(err, PARITY.get(label, 0.0))
        assert err <= ATOL, (name, run)
        assert max_err(ours(model, inputs), case(name).output(run, LOGIT_KEYS[case(name).head]), positions) <= ATOL
    for name, run in GENERATE:
        fixture = case(name)
        inputs, steps = fixture.inputs(run), fixture.run(run)["steps"]
        model = with_backend(load(name), attention, chunked_registry)
        got = model.generate(inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                             max_new_tokens=steps, eos_token_id=[])
        assert torch.equal(got, fixture.output(run, "tokens")), (name, run)
