"""Adversarial parity audit of the Open-Llama family: config edges, checkpoint round trips, and the
forward / KV-cache numerics against an independent pure-torch reference written here from the
transformers 4.31 semantics (docs/open-llama.md, the reference study §3): RMSNorm cast back before the
weight, half-split RoPE, scores scaled after the matmul, and a rotary module that rebuilds its tables
(with a new dynamic-NTK base) whenever ``past + new`` tokens exceed what it has built so far.
tests/test_open_llama.py covers the fixtures written by 4.31; this file covers what they do not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from safetensors.torch import load_file

import optkit
from optkit.errors import CheckpointError, SpecValidationError
from optkit.formats.open_llama import OPEN_LLAMA, config_from_spec, spec_from_config
from tests.helpers.models import OPEN_LLAMA_TINY as TINY
from tests.helpers.models import tiny_open_llama

ATOL = 1e-5
DYNAMIC = dict(rope_scaling={"type": "dynamic", "factor": 2.0})
LINEAR = dict(rope_scaling={"type": "linear", "factor": 2.0})
ACTS = {"silu": F.silu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


# -- an independent reference (4.31 semantics, unpadded, with a KV cache) ---------------------------
class Reference:
    """Open-Llama's forward from its formulas, over a transformers-layout state dict.

    The rotary tables are state, as in 4.31: built for ``max_position_embeddings`` positions and rebuilt
    for ``past + new`` when that is longer, dynamic NTK then taking the new length's base (and keeping it).
    """

    def __init__(self, weights: dict[str, torch.Tensor], config: dict):
        self.w, self.c = weights, config
        self.heads = config["num_attention_heads"]
        self.head_dim = config["hidden_size"] // self.heads
        scaling = config.get("rope_scaling") or {}
        self.kind, self.factor = scaling.get("type", "none"), float(scaling.get("factor", 1.0))
        self.trained = config["max_position_embeddings"]
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._build(self.trained)

    def _build(self, length: int) -> None:
        base, dim = 10000.0, self.head_dim
        if self.kind == "dynamic" and length > self.trained:
            base = base * ((self.factor * length / self.trained) - (self.factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        t = torch.arange(length, dtype=torch.float32)
        if self.kind == "linear":
            t = t / self.factor
        freqs = torch.outer(t, inv)
        table = torch.cat((freqs, freqs), dim=-1)
        self.built, self.cos, self.sin = length, table.cos(), table.sin()

    def _rms(self, x: torch.Tensor, key: str) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.c.get("rms_norm_eps", 1e-6))
        return self.w[key] * h.to(x.dtype)

    def __call__(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        w, c, (b, n) = self.w, self.c, ids.shape
        past = self.cache[0][0].shape[2] if self.cache else 0
        if past + n > self.built:
            self._build(past + n)
        pos = torch.arange(past, past + n) if position_ids is None else position_ids
        cos, sin = self.cos[pos], self.sin[pos]
        rot = lambda t: torch.cat((-t[..., self.head_dim // 2:], t[..., :self.head_dim // 2]), dim=-1)
        x = F.embedding(ids, w["model.embed_tokens.weight"])
        if c.get("use_stable_embedding", True):
            x = F.layer_norm(x, x.shape[-1:], w["model.embed_layer_norm.weight"], w["model.embed_layer_norm.bias"])
        causal = torch.full((n, past + n), torch.finfo(x.dtype).min).triu(past + 1)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._rms(x, p + "input_layernorm.weight")
            q, k, v = (F.linear(h, w[f"{p}self_attn.{m}_proj.weight"]).view(b, n, self.heads, -1).transpose(1, 2)
                       for m in "qkv")
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            if len(self.cache) > i:
                k, v = torch.cat((self.cache[i][0], k), 2), torch.cat((self.cache[i][1], v), 2)
                self.cache[i] = (k, v)
            else:
                self.cache.append((k, v))
            scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + causal
            attn = F.softmax(scores.float(), dim=-1).to(q.dtype) @ v
            x = x + F.linear(attn.transpose(1, 2).reshape(b, n, -1), w[p + "self_attn.o_proj.weight"])
            h = self._rms(x, p + "post_attention_layernorm.weight")
            act = ACTS[c.get("hidden_act", "silu")]
            x = x + F.linear(act(F.linear(h, w[p + "mlp.gate_proj.weight"])) * F.linear(h, w[p + "mlp.up_proj.weight"]),
                             w[p + "mlp.down_proj.weight"])
        x = self._rms(x, "model.norm.weight")
        shared = c.get("shared_input_output_embedding", True)
        return x @ (w["model.embed_tokens.weight"] if shared else w["lm_head.weight"]).T


def saved(model: optkit.Model, directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    directory = model.save_pretrained(directory)
    return load_file(str(directory / "model.safetensors")), json.loads((directory / "config.json").read_text())


def chunked(model: optkit.Model, ids: torch.Tensor, splits: list[int], kind: str = "dynamic") -> torch.Tensor:
    """optkit's logits fed through one KV cache in chunks ending at ``splits`` (then one token per step)."""
    cache = model.new_cache(ids.shape[0], max_length=ids.shape[1], kind=kind)
    ends = splits + list(range(splits[-1] + 1, ids.shape[1] + 1))
    out, start = [], 0
    for end in ends:
        out.append(model(ids[:, start:end], attention_mask=torch.ones_like(ids[:, :end]), past_key_values=cache).logits)
        start = end
    return torch.cat(out, dim=1)


def reference_chunked(ref: Reference, ids: torch.Tensor, splits: list[int]) -> torch.Tensor:
    ends = splits + list(range(splits[-1] + 1, ids.shape[1] + 1))
    out, start = [], 0
    for end in ends:
        out.append(ref(ids[:, start:end]))
        start = end
    return torch.cat(out, dim=1)


# -- numerics ---------------------------------------------------------------------------------------
CASES = {
    "v1": {},
    "v2-gelu": dict(use_stable_embedding=False, shared_input_output_embedding=False, rms_norm_eps=1e-5,
                    hidden_act="gelu_new"),
    "linear": dict(LINEAR, shared_input_output_embedding=False),
    "dynamic": dict(DYNAMIC, use_stable_embedding=False),
}


@pytest.mark.parametrize("case", CASES)
def test_uncached_forward_past_the_trained_length_matches_the_reference(case, tmp_path):
    """A fresh reference over one input: 44 tokens with scaling (past the trained 32), 30 without."""
    model = tiny_open_llama(**CASES[case])
    weights, config = saved(model, tmp_path)
    ids = torch.randint(3, TINY["vocab_size"], (2, 44 if "rope_scaling" in CASES[case] else 30),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids).logits - Reference(weights, config)(ids)).abs().max() <= ATOL


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("case", CASES)
def test_chunked_cached_decoding_rebuilds_rotary_like_the_reference(case, kind, tmp_path):
    """Prefill 20, a chunk that crosses the trained 32 (to 36), then one token per step to 44: the cache
    keeps each key's base, each chunk uses the base of ``past + new``, exactly as 4.31 rebuilds its table."""
    model = tiny_open_llama(**CASES[case])
    weights, config = saved(model, tmp_path)
    ids = torch.randint(3, TINY["vocab_size"], (1, 44 if "rope_scaling" in CASES[case] else 32),
                        generator=torch.Generator().manual_seed(2))
    splits = [20, 28] if "rope_scaling" not in CASES[case] else [20, 36]
    with torch.no_grad():
        ours, theirs = chunked(model, ids, splits, kind), reference_chunked(Reference(weights, config), ids, splits)
    assert (ours - theirs).abs().max() <= ATOL
    if CASES[case].get("rope_scaling", {}).get("type") != "dynamic":  # otherwise cache != full by design
        with torch.no_grad():
            assert (ours - model(ids).logits).abs().max() <= ATOL


def test_dynamic_ntk_changes_nothing_up_to_the_trained_length_and_something_past_it():
    plain, dynamic = tiny_open_llama(), tiny_open_llama(**DYNAMIC)
    ids = torch.randint(3, TINY["vocab_size"], (1, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(plain(ids[:, :32]).logits, dynamic(ids[:, :32]).logits)
        assert (dynamic(ids).logits[:, :32] - dynamic(ids[:, :32]).logits).abs().max() > 1e-4  # a new base


def test_explicit_position_ids_equal_the_default_and_only_relative_positions_matter(tmp_path):
    model = tiny_open_llama()
    ids = torch.randint(3, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        default = model(ids).logits
        explicit = model(ids, position_ids=torch.arange(12).expand(2, 12)).logits
        shifted = model(ids, position_ids=torch.arange(5, 17).expand(2, 12)).logits
        weights, config = saved(model, tmp_path)
        reference = Reference(weights, config)(ids, position_ids=torch.arange(12))
    assert torch.equal(default, explicit)
    assert (shifted - default).abs().max() <= ATOL
    assert (default - reference).abs().max() <= ATOL


@pytest.mark.parametrize("scaling", ["dynamic", "linear"])
def test_left_padded_batch_generation_past_the_trained_length_equals_single_prompts(scaling):
    """Prompts of 30 and 22 tokens, 8 new tokens each: the long one crosses 32 while generating."""
    model = tiny_open_llama(**{"dynamic": DYNAMIC, "linear": LINEAR}[scaling])
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, TINY["vocab_size"], (n,), generator=g) for n in (30, 22)]
    ids = torch.full((2, 30), TINY["pad_token_id"])
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, 30 - len(prompt):], mask[row, 30 - len(prompt):] = prompt, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=8, eos_token_id=[])
        assert torch.equal(batch[row, -8:], alone[0, -8:]), row


# -- checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stable,shared", [(True, True), (True, False), (False, True), (False, False)])
def test_save_and_reload_gives_identical_logits_and_round_trips_the_config(stable, shared, tmp_path):
    fields = dict(DYNAMIC, use_stable_embedding=stable, shared_input_output_embedding=shared, rms_norm_eps=1e-5)
    model = tiny_open_llama(**fields)
    directory = model.save_pretrained(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    assert {k: config[k] for k in fields} == fields and config["tie_word_embeddings"] is False
    assert ("lm_head.weight" in load_file(str(directory / "model.safetensors"))) is not shared
    ids = torch.randint(3, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, optkit.from_pretrained(directory)(ids).logits)


def test_a_shared_checkpoint_whose_head_differs_names_open_llamas_own_fields(tmp_path):
    """Refused as for OPT, with the fix in Open-Llama's terms: its head is tied by shared_input_output_embedding
    (or tie_word_embeddings), so the message names both; following it loads the stored head."""
    from safetensors.torch import save_file

    directory = tiny_open_llama().save_pretrained(tmp_path / "m")
    weights = load_file(str(directory / "model.safetensors"))
    weights["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match='Set "shared_input_output_embedding": false and '
                                              '"tie_word_embeddings": false in config.json'):
        optkit.from_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(shared_input_output_embedding=False, tie_word_embeddings=False)
    (directory / "config.json").write_text(json.dumps(config))
    model = optkit.from_pretrained(directory)
    assert torch.equal(model.head.weight, weights["lm_head.weight"])


def test_tie_word_embeddings_without_the_shared_embedding_ties_the_head(tmp_path):
    """4.31 ties lm_head to the embedding when tie_word_embeddings is set; optkit saves it as shared."""
    spec = spec_from_config({**TINY, "shared_input_output_embedding": False, "tie_word_embeddings": True})
    assert spec.head.params["tie_word_embeddings"] is True
    assert config_from_spec(spec)["shared_input_output_embedding"] is True


# -- config edges -----------------------------------------------------------------------------------
@pytest.mark.parametrize("factor,problem", [
    (float("inf"), "rope_scaling: factor must be finite, got inf"),
    (float("nan"), "rope_scaling: factor must be finite, got nan"),
    (True, "rope_scaling: factor must be a number > 1, got True"),
    ("2.0", "rope_scaling: factor must be a number > 1, got '2.0'"),
    (0.5, "rope_scaling: factor must be a number > 1, got 0.5"),
])
def test_rope_scaling_factor_edges_are_spec_errors(factor, problem):
    with pytest.raises(SpecValidationError) as info:
        spec_from_config({**TINY, "rope_scaling": {"type": "dynamic", "factor": factor}}, source="config.json")
    assert info.value.problems == [problem]


def test_a_non_finite_factor_in_a_checkpoint_is_a_spec_error_not_an_overflow(tmp_path):
    directory = tiny_open_llama().save_pretrained(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": float("inf")}
    (directory / "config.json").write_text(json.dumps(config))  # json writes Infinity, and reads it back
    with pytest.raises(SpecValidationError, match="rope_scaling: factor must be finite"):
        optkit.from_pretrained(directory)


def test_a_huge_rope_scaling_value_is_quoted_capped():
    with pytest.raises(SpecValidationError) as info:
        spec_from_config({**TINY, "rope_scaling": {"type": "x" * 5000, "factor": 2.0}})
    assert len(str(info.value)) < 400


def test_grouped_query_attention_is_refused_by_name():
    assert spec_from_config({**TINY, "num_key_value_heads": TINY["num_attention_heads"]}) == spec_from_config(TINY)
    with pytest.raises(SpecValidationError) as info:
        spec_from_config({**TINY, "num_key_value_heads": 2}, source="config.json")
    (problem,) = info.value.problems
    assert problem.startswith("num_key_value_heads: Open-Llama has no grouped-query attention")
    assert "num_attention_heads=4" in problem


def test_a_non_integer_num_key_value_heads_is_a_checkpoint_error(tmp_path):
    directory = tiny_open_llama().save_pretrained(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_key_value_heads": "4"}))
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        optkit.from_pretrained(directory)


@pytest.mark.parametrize("act", ["tanh", "quick_gelu"])
def test_activations_optkit_lacks_are_spec_errors_naming_the_field(act):
    with pytest.raises(SpecValidationError, match="decoder.mlp.params.activation"):
        spec_from_config({**TINY, "hidden_act": act})


def test_dynamic_ntk_with_a_head_dim_of_two_is_refused_at_build_not_divided_by_zero_later():
    config = {**TINY, "hidden_size": 8, "intermediate_size": 16, **DYNAMIC}  # 4 heads of 2
    with pytest.raises(SpecValidationError, match="dynamic NTK needs head_dim >= 4, got 2"):
        optkit.build(spec_from_config(config))
    optkit.build(spec_from_config({**config, **LINEAR}))  # linear has no such exponent


def test_a_reloaded_shared_embedding_is_one_parameter_and_a_separate_head_is_not(tmp_path):
    shared = optkit.from_pretrained(tiny_open_llama().save_pretrained(tmp_path / "s"))
    separate = optkit.from_pretrained(
        tiny_open_llama(shared_input_output_embedding=False).save_pretrained(tmp_path / "p"))
    assert shared.head.weight is shared.decoder.embed_tokens.weight
    assert separate.head.weight is not separate.decoder.embed_tokens.weight


JSON_LEAF = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5)
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["type", "factor", "x"]), inner, max_size=3), max_leaves=6)
ROPE = st.fixed_dictionaries({"type": st.sampled_from(["linear", "dynamic"]), "factor": JSON_LEAF})
FIELDS = ["rope_scaling", "rms_norm_eps", "rope_theta", "hidden_act", "num_key_value_heads", "use_stable_embedding",
          "shared_input_output_embedding", "max_position_embeddings", "hidden_dropout_prob", "attention_dropout_prob",
          "tie_word_embeddings"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(FIELDS), value=JSON | ROPE)
def test_any_json_value_in_an_open_llama_field_is_a_spec_or_an_optkit_error(field, value):
    """What the loader does with config.json (type check, then conversion): nothing but optkit errors."""
    config = {**TINY, field: value}
    try:
        OPEN_LLAMA.check_config(config, "config.json")
        spec_from_config(config, source="config.json")
    except (CheckpointError, SpecValidationError) as error:
        assert field in str(error) or field.replace("hidden_dropout_prob", "dropout") in str(error) or "decoder." in str(error)
