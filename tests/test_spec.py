"""optkit.spec: presets, example files, `extends`, YAML round trips and all-at-once validation."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
from optkit.errors import SpecValidationError
from optkit.presets import preset_names, registry_file
from optkit.spec import ModelSpec, load_spec, spec_from_yaml, validate_spec
from optkit_torch_components.heads import SequenceClassificationParams
from optkit_torch_components.layers import FeedForwardParams

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PRESETS = ("opt-125m, opt-350m, opt-1.3b, opt-2.7b, opt-6.7b, opt-13b, opt-30b, opt-66b, opt-175b, opt-tiny, "
           "optkit-default, opt-tiny-350m-style, open-llama-7b, open-llama-tiny, open-llama-tiny-v2-style")
ACTIVATIONS = typing.get_args(FeedForwardParams.model_fields["activation"].annotation)
PROBLEM_TYPES = typing.get_args(typing.get_args(SequenceClassificationParams.model_fields["problem_type"].annotation)[0])
FLSH = "unknown attention 'flsh' (available: eager, flash, sdpa, xformers); did you mean 'flash'?"


def problems(excinfo) -> list[str]:
    return excinfo.value.problems


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- presets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", preset_names())
def test_preset_validates(name):
    spec = load_spec(name)
    assert isinstance(spec, ModelSpec) and spec.family == ("open-llama" if name.startswith("open-llama") else "opt")
    assert spec.decoder.hidden_size % spec.decoder.num_heads == 0


@pytest.mark.parametrize("name", [n for n in preset_names() if registry_file().presets[n].aliases])
def test_aliases_resolve_to_the_same_spec(name):
    for alias in registry_file().presets[name].aliases:
        assert alias == f"facebook/{name}"
        assert load_spec(alias) == load_spec(name)


def test_preset_shapes():
    assert load_spec("opt-125m").decoder.model_dump(include={"hidden_size", "num_layers", "num_heads", "ffn_dim"}) == {
        "hidden_size": 768, "num_layers": 12, "num_heads": 12, "ffn_dim": 3072}
    d = load_spec("opt-350m").decoder
    assert (d.word_embed_proj_dim, d.embed_dim, d.norm_position, d.final_norm) == (512, 512, "post", False)
    assert "opt-base" not in preset_names()


def test_unknown_preset_lists_the_presets():
    with pytest.raises(SpecValidationError) as info:
        load_spec("opt-12m")
    assert problems(info) == [f"unknown preset 'opt-12m' (presets: {PRESETS}); or give the path of a .yaml spec file"]
    assert str(info.value).startswith("1 problem(s) in model spec:\n  - unknown preset 'opt-12m'")


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecValidationError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert problems(info) == [f"spec file {tmp_path / 'nope.yaml'} does not exist"]


# -- examples --------------------------------------------------------------------------------
def _is_model_spec(path: Path) -> bool:
    """YAML inside a packaged example project (a directory with a pyproject.toml) may be other config."""
    if not any((EXAMPLES / d / "pyproject.toml").is_file() for d in path.relative_to(EXAMPLES).parents):
        return True
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return isinstance(data, dict) and ("decoder" in data or "extends" in data)


EXAMPLE_SPECS = sorted(p for p in EXAMPLES.rglob("*.yaml") if _is_model_spec(p))


def test_examples_exist():
    assert EXAMPLE_SPECS, f"no model spec YAML found under {EXAMPLES}"


@pytest.mark.parametrize("path", EXAMPLE_SPECS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_validates(path):
    assert path.read_text(encoding="utf-8").startswith("#"), "examples start with a comment saying what they show"
    assert isinstance(load_spec(path), ModelSpec)


def test_example_contents():
    specs = EXAMPLES / "specs"
    assert load_spec(specs / "opt-125m-sdpa.yaml") == load_spec("opt-125m", decoder={"attention": "sdpa"})
    written_out = yaml.safe_load((specs / "opt-350m.yaml").read_text(encoding="utf-8"))
    assert "extends" not in written_out
    assert load_spec(specs / "opt-350m.yaml") == load_spec("opt-350m")
    classifier = load_spec(specs / "tiny-classifier.yaml")
    assert classifier.head.model_dump() == {"name": "sequence_classification", "params": {"num_labels": 3}}
    assert classifier.decoder == load_spec("opt-tiny").decoder


# -- extends ---------------------------------------------------------------------------------
def test_extends_deep_merges(tmp_path):
    path = write(tmp_path / "child.yaml", """
extends: opt-tiny
decoder:
  num_layers: 3
  mlp: {params: {activation: gelu}}
  norm: {params: {eps: 1.0e-6}}
tokens: {pad_token_id: 0}
""")
    spec = load_spec(path)
    tiny = load_spec("opt-tiny")
    assert spec.decoder.num_layers == 3 and spec.decoder.hidden_size == tiny.decoder.hidden_size
    assert spec.decoder.mlp.model_dump() == {"name": "ffn", "params": {"activation": "gelu"}}
    assert spec.decoder.norm.model_dump() == {"name": "layernorm", "params": {"eps": 1e-6, "elementwise_affine": True}}
    assert (spec.tokens.pad_token_id, spec.tokens.eos_token_id) == (0, 2)
    assert spec == tiny.model_copy(update={
        "decoder": tiny.decoder.model_copy(update={"num_layers": 3, "mlp": spec.decoder.mlp, "norm": spec.decoder.norm}),
        "tokens": spec.tokens})


def test_extends_chain_of_relative_files(tmp_path):
    write(tmp_path / "base" / "parent.yaml", """
extends: grand.yaml
head: {name: causal_lm, params: {tie_word_embeddings: false}}
decoder: {num_layers: 4}
""")
    write(tmp_path / "base" / "grand.yaml", "extends: opt-tiny\ndecoder: {attention: sdpa, num_layers: 5}\n")
    child = write(tmp_path / "child.yaml", "extends: base/parent.yaml\ndecoder: {ffn_dim: 256}\n")
    spec = load_spec(child)
    assert (spec.decoder.attention.name, spec.decoder.num_layers, spec.decoder.ffn_dim) == ("sdpa", 4, 256)
    assert spec.head.params == {"tie_word_embeddings": False}


def test_override_by_another_name_replaces_params(tmp_path):
    write(tmp_path / "parent.yaml", "extends: opt-tiny\nhead: {name: causal_lm, params: {tie_word_embeddings: false}}\n")
    child = write(tmp_path / "child.yaml", """
extends: parent.yaml
head: {name: sequence_classification, params: {num_labels: 3}}
decoder:
  positional_embedding: {name: learned, params: {offset: 0}}
""")
    spec = load_spec(child)
    assert spec.head.model_dump() == {"name": "sequence_classification", "params": {"num_labels": 3}}
    assert spec.decoder.positional_embedding.params == {"offset": 0}
    bare = write(tmp_path / "bare.yaml", "extends: parent.yaml\nhead: base\n")
    assert load_spec(bare).head.model_dump() == {"name": "base", "params": {}}


def test_keyword_overrides():
    spec = load_spec("opt-tiny", decoder={"mlp": {"params": {"activation": "silu"}}, "attention": "sdpa"})
    assert spec.decoder.mlp.params == {"activation": "silu"} and spec.decoder.attention.name == "sdpa"


def test_extends_self_cycle(tmp_path):
    path = write(tmp_path / "loop.yaml", "extends: loop.yaml\n")
    with pytest.raises(SpecValidationError) as info:
        load_spec(path)
    loop = path.resolve()
    assert problems(info) == [f"extends: cycle {loop} -> {loop}"]


def test_extends_two_file_cycle(tmp_path):
    a = write(tmp_path / "a.yaml", "extends: sub/b.yaml\n").resolve()
    b = write(tmp_path / "sub" / "b.yaml", "extends: ../a.yaml\n").resolve()
    with pytest.raises(SpecValidationError) as info:
        load_spec(a)
    assert problems(info) == [f"extends: cycle {a} -> {b} -> {a}"]


def test_extends_must_be_a_string(tmp_path):
    with pytest.raises(SpecValidationError) as info:
        load_spec(write(tmp_path / "x.yaml", "extends: [opt-tiny]\n"))
    assert problems(info) == ["extends: expected a preset name or a path, got ['opt-tiny']"]


# -- YAML ------------------------------------------------------------------------------------
def test_bad_yaml_text():
    with pytest.raises(SpecValidationError) as info:
        spec_from_yaml("decoder: [1, 2\n")
    (problem,) = problems(info)
    assert problem.startswith("not valid YAML: while parsing a flow sequence")


def test_bad_yaml_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "decoder: [1, 2\n")
    with pytest.raises(SpecValidationError) as info:
        load_spec(path)
    (problem,) = problems(info)
    assert problem.startswith("not valid YAML: while parsing a flow sequence")
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"1 problem(s) in model spec in {path}:\n  - not valid YAML")


@pytest.mark.parametrize(("text", "kind"), [("- 1\n- 2\n", "list"), ("just text\n", "str"), ("", "NoneType")])
def test_non_mapping_document(tmp_path, text, kind):
    with pytest.raises(SpecValidationError) as info:
        spec_from_yaml(text)
    assert problems(info) == [f"expected a mapping at the top level, got {kind}"]
    path = write(tmp_path / "doc.yaml", text)
    with pytest.raises(SpecValidationError) as info:
        load_spec(path)
    assert problems(info) == [f"expected a mapping at the top level, got {kind}"]


def test_to_yaml_is_plain_yaml():
    spec = load_spec("opt-350m")
    data = yaml.safe_load(spec.to_yaml())
    assert data == spec.to_dict()
    assert list(data) == ["family", "decoder", "head", "tokens"]
    assert spec_from_yaml(spec.to_yaml()) == spec


small_float = st.floats(min_value=0.0, max_value=0.99, allow_nan=False, allow_infinity=False)
HEADS = st.one_of(
    st.just({"name": "base", "params": {}}),
    st.builds(lambda tie: {"name": "causal_lm", "params": {"tie_word_embeddings": tie}}, st.booleans()),
    st.builds(lambda n, p: {"name": "sequence_classification", "params": {"num_labels": n, "problem_type": p}},
              st.integers(1, 1000), st.sampled_from((None,) + PROBLEM_TYPES)),
    st.just({"name": "question_answering", "params": {}}),
    st.just("causal_lm"),
)


@st.composite
def specs(draw) -> dict:
    num_heads = draw(st.integers(1, 16))
    vocab_size = draw(st.integers(4, 60_000))
    token = st.one_of(st.none(), st.integers(0, vocab_size - 1))
    return {
        "family": "opt",
        "decoder": {
            "vocab_size": vocab_size,
            "hidden_size": num_heads * draw(st.integers(1, 128)),
            "num_layers": draw(st.integers(1, 96)),
            "num_heads": num_heads,
            "ffn_dim": draw(st.integers(1, 50_000)),
            "max_positions": draw(st.integers(1, 8192)),
            "word_embed_proj_dim": draw(st.one_of(st.none(), st.integers(1, 4096))),
            "norm_position": draw(st.sampled_from(["pre", "post"])),
            "final_norm": draw(st.booleans()),
            "bias": draw(st.booleans()),
            "dropout": draw(small_float),
            "attention_dropout": draw(small_float),
            "layerdrop": draw(st.floats(0.0, 1.0)),
            "init_std": draw(st.floats(1e-6, 1.0)),
            "query_scaling": draw(st.sampled_from(["projection", "scores"])),
            "positional_embedding": {"name": "learned", "params": {"offset": draw(st.integers(0, 8))}},
            "attention": draw(st.sampled_from(["eager", "sdpa", {"name": "sdpa", "params": {}}])),
            "mlp": {"name": "ffn", "params": {"activation": draw(st.sampled_from(ACTIVATIONS))}},
            "norm": {"name": "layernorm", "params": {"eps": draw(st.floats(1e-12, 1e-2)),
                                                     "elementwise_affine": draw(st.booleans())}},
            "kv_cache": draw(st.one_of(st.just("dynamic"), st.builds(
                lambda n: {"name": "static", "params": {"max_length": n}}, st.one_of(st.none(), st.integers(1, 8192))))),
        },
        "head": draw(HEADS),
        "tokens": {"pad_token_id": draw(token), "bos_token_id": draw(token), "eos_token_id": draw(token)},
    }


@settings(max_examples=40, deadline=None)
@given(specs())
def test_yaml_round_trip(data):
    spec = validate_spec(data)
    assert spec_from_yaml(spec.to_yaml()) == spec
    assert validate_spec(spec.to_dict()) == spec


# -- validation ------------------------------------------------------------------------------
def test_every_problem_at_once():
    with pytest.raises(SpecValidationError) as info:
        spec_from_yaml("""
extends: opt-tiny
decoder:
  attention: flsh
  num_heads: 0
  hidden_sise: 64
  mlp: {params: {activation: relux}}
""")
    assert problems(info) == [
        "decoder.num_heads: Input should be greater than 0",
        "decoder.hidden_sise: unknown field (not allowed here)",
        f"decoder.attention: {FLSH}",
        "decoder.mlp.params.activation: Input should be 'relu', 'gelu', 'gelu_new', 'gelu_pytorch_tanh', "
        "'silu' or 'swish' (got 'relux')",
    ]
    assert str(info.value) == "4 problem(s) in model spec:\n" + "\n".join(f"  - {p}" for p in problems(info))


def test_every_problem_when_the_shape_is_right():
    with pytest.raises(SpecValidationError) as info:
        load_spec("opt-tiny", decoder={"hidden_size": 65, "attention": "sdp", "norm": {"params": {"epsilon": 1}}},
                  head={"name": "sequence_classification", "params": {"num_labels": 0}},
                  tokens={"pad_token_id": -1, "eos_token_id": 512})
    assert problems(info) == [
        "decoder.hidden_size: 65 is not divisible by num_heads=4",
        "tokens.pad_token_id: -1 is outside the vocabulary [0, 512)",
        "tokens.eos_token_id: 512 is outside the vocabulary [0, 512)",
        "decoder.attention: unknown attention 'sdp' (available: eager, flash, sdpa, xformers); did you mean 'sdpa'?",
        "decoder.norm.params.epsilon: unknown field (not allowed here)",
        "head.params.num_labels: Input should be greater than 0",
    ]
    assert info.value.source == "opt-tiny"


def test_problems_in_component_refs():
    data = load_spec("opt-tiny").to_dict()
    data["decoder"]["mlp"] = 5
    data["decoder"]["attention"] = {"name": ""}
    data["head"] = {"nme": "base"}
    with pytest.raises(SpecValidationError) as info:
        validate_spec(data)
    assert problems(info) == [
        "decoder.attention.name: String should have at least 1 character",
        "decoder.mlp: Input should be a valid dictionary or instance of ComponentRef",
        "head.name: required field is missing",
        "head.nme: unknown field (not allowed here)",
    ]


def test_missing_fields():
    with pytest.raises(SpecValidationError) as info:
        validate_spec({"decoder": {"vocab_size": 8, "hidden_size": 8, "num_layers": 1, "num_heads": 2}})
    assert problems(info) == ["decoder.ffn_dim: required field is missing",
                              "decoder.max_positions: required field is missing"]
    with pytest.raises(SpecValidationError) as info:
        validate_spec({})
    assert problems(info) == ["decoder: required field is missing"]


def test_auto_is_allowed_for_backends_only():
    spec = load_spec("opt-tiny", decoder={"attention": "auto", "linear": "auto", "kv_cache": "auto"})
    assert spec.decoder.attention.name == "auto"
    with pytest.raises(SpecValidationError) as info:
        load_spec("opt-tiny", decoder={"attention": {"name": "auto", "params": {"x": 1}}, "norm": "auto"})
    assert problems(info) == ["decoder.attention.params: 'auto' takes no params",
                              "decoder.norm: unknown norm 'auto' (available: layernorm, rmsnorm)"]


def test_with_components():
    spec = load_spec("opt-tiny").with_components(attention="sdpa", head={"name": "base"}, mlp=None)
    assert (spec.decoder.attention.name, spec.head.name, spec.decoder.mlp.name) == ("sdpa", "base", "ffn")
    with pytest.raises(SpecValidationError) as info:
        load_spec("opt-tiny").with_components(tokenizer="bpe")
    assert problems(info) == ["tokenizer: not a component kind (kinds: head, token_embedding, positional_embedding, "
                              "attention, mlp, norm, linear, kv_cache, block)"]


def test_lazy_exports():
    assert optkit.load_spec is load_spec and optkit.ModelSpec is ModelSpec
