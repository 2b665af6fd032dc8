"""Specs fail early and clearly (issue 13, section 3).

Every bad spec is one SpecValidationError (or, for bad build() arguments, an InputError /
BackendUnavailableError) whose message names the field or file at fault -- never a
UnicodeDecodeError, RecursionError, TypeError, raw pydantic ValidationError or an allocation
that runs for a minute and dies in torch's allocator. Messages quote user data only in bounded form.
"""

from __future__ import annotations

import codecs
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optkit
from optkit import spec as spec_module
from optkit.errors import BackendUnavailableError, InputError, SpecValidationError
from optkit.spec import (
    MAX_DEPTH,
    MAX_EXTENDS,
    MAX_SPEC_BYTES,
    MAX_VALUES,
    load_spec,
    memory_problems,
    spec_from_yaml,
    validate_spec,
)

MESSAGE_LIMIT = 4_000  # no message about a spec needs more; a YAML bomb must not make one of megabytes
TINY = "extends: opt-tiny\n"


def problems_of(excinfo: pytest.ExceptionInfo) -> list[str]:
    assert len(str(excinfo.value)) < MESSAGE_LIMIT
    return excinfo.value.problems


def refused(text: str) -> list[str]:
    with pytest.raises(SpecValidationError) as info:
        spec_from_yaml(text)
    return problems_of(info)


def write_bytes(tmp_path: Path, data: bytes, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused_file(path: Path) -> list[str]:
    with pytest.raises(SpecValidationError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    return problems_of(info)


# -- numbers: no booleans, strings or non-finite values where numbers belong -------------------------
@pytest.mark.parametrize(("field", "value", "expected"), [
    ("num_layers", "true", "decoder.num_layers: Input should be a valid integer (got True)"),
    ("hidden_size", "false", "decoder.hidden_size: Input should be a valid integer (got False)"),
    ("num_layers", '"2"', "decoder.num_layers: Input should be a valid integer (got '2')"),
    ("num_layers", "2.0", "decoder.num_layers: Input should be a valid integer (got 2.0)"),
    ("init_std", ".inf", "decoder.init_std: Input should be a finite number (got inf)"),
    ("dropout", ".nan", "decoder.dropout: Input should be a finite number (got nan)"),
    ("dropout", "true", "decoder.dropout: Input should be a valid number (got True)"),
    ("bias", "1", "decoder.bias: Input should be a valid boolean (got 1)"),
    ("final_norm", "yes please", "decoder.final_norm: Input should be a valid boolean (got 'yes please')"),
])
def test_decoder_numbers_are_strict(field, value, expected):
    assert refused(f"{TINY}decoder: {{{field}: {value}}}\n") == [expected]


def test_token_ids_refuse_booleans():
    assert refused(f"{TINY}tokens: {{pad_token_id: true}}\n") == [
        "tokens.pad_token_id: Input should be a valid integer (got True)"]


def test_non_finite_component_params_are_refused_with_their_path():
    problems = refused(f"{TINY}decoder: {{norm: {{name: layernorm, params: {{eps: .inf}}}}}}\n")
    assert problems == ["decoder.norm.params.eps: inf is not a finite number"]


def test_exponent_floats_read_as_numbers():
    """YAML 1.1 reads `1e-3` as a string; specs read it as the number everyone means."""
    spec = spec_from_yaml(f"{TINY}decoder: {{init_std: 1e-3, dropout: 0}}\n")
    assert spec.decoder.init_std == 1e-3 and spec.decoder.dropout == 0.0


# -- sizes: refused before any allocation, with the estimate and the field --------------------------
def test_a_size_no_machine_holds_is_a_validation_error():
    with pytest.raises(SpecValidationError) as info:
        load_spec("opt-tiny", decoder={"vocab_size": 2**63})
    (problem,) = problems_of(info)
    assert problem.startswith("decoder.vocab_size: the model would have about 5.9e+20 parameters "
                              "(mostly decoder.vocab_size=9223372036854775808 x 64 in the token embedding)")
    with pytest.raises(SpecValidationError, match="decoder.vocab_size: the model would have"):
        optkit.build({"extends": "opt-tiny", "decoder": {"vocab_size": 2**63}}, device="meta")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_ten_million_layers_are_refused_at_once(device):
    spec = load_spec("opt-tiny", decoder={"num_layers": 10_000_000})
    start = time.perf_counter()
    with pytest.raises(SpecValidationError) as info:
        optkit.build(spec, device=device)
    assert time.perf_counter() - start < 2.0
    (problem,) = problems_of(info)
    assert problem.startswith("decoder.num_layers: ")
    assert "decoder.num_layers=10000000 layers" in problem and "B of host memory" in problem


def test_parameters_beyond_host_memory_name_the_estimate(monkeypatch):
    monkeypatch.setattr(spec_module, "_host_memory", lambda: 100 * 10**6)
    with pytest.raises(SpecValidationError) as info:
        optkit.build("opt-125m")
    (problem,) = problems_of(info)
    assert problem == (
        "decoder.num_layers: the parameters and the layers' modules need about 501 MB of host memory (mostly "
        "decoder.num_layers=12 layers of hidden_size=768, ffn_dim=3072), more than this machine's memory and swap "
        "(100 MB); make the model smaller, or build it on device='meta' to inspect it")
    with pytest.raises(SpecValidationError, match="about 251 MB of host memory"):
        optkit.build("opt-125m", dtype=torch.float16)  # the estimate is in the build dtype


def test_parameters_beyond_an_accelerator_name_the_estimate(monkeypatch):
    monkeypatch.setattr(spec_module, "_device_memory", lambda device: 80 * 10**9)
    spec = load_spec("opt-175b")
    (problem,) = memory_problems(spec, torch.device("cuda", 0), torch.float16)
    assert re.fullmatch(r"decoder.num_layers: the parameters need about 3\d\d GB in float16 \(mostly "
                        r"decoder.num_layers=96 layers of hidden_size=12288, ffn_dim=49152\), more than cuda:0 "
                        r"can ever hold \(80 GB\); make the model smaller, or build it on device='meta' to inspect it",
                        problem)


def test_huge_presets_still_build_on_meta():
    model = optkit.build("opt-175b", device="meta")
    assert model.decoder.layers[0].self_attn.q_proj.weight.shape == (12288, 12288)
    assert model.decoder.embed_tokens.weight.is_meta


# -- build() arguments -------------------------------------------------------------------------------
def test_a_component_override_that_is_no_name():
    with pytest.raises(SpecValidationError) as info:
        optkit.build("opt-tiny", attention=5)
    assert problems_of(info) == [
        "decoder.attention: expected a component name or {name: ..., params: {...}}, got 5 (int)"]
    with pytest.raises(SpecValidationError) as info:
        optkit.build("opt-tiny", head={"name": 7})
    assert problems_of(info) == ["head.name: Input should be a valid string (got 7)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it():
    with pytest.raises(BackendUnavailableError, match=r"^device='cuda' is not available: "):
        optkit.build("opt-tiny", device="cuda")
    with pytest.raises(BackendUnavailableError, match=r"^target_device='cuda:1' is not available: "):
        optkit.build("opt-tiny", device="meta", target_device="cuda:1")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "cpuu"}, r"^device='cpuu' is not a device: "),
    ({"dtype": "float16"}, r"^dtype must be a floating-point torch.dtype such as torch.float16, got 'float16' \(str\)$"),
    ({"dtype": torch.int64}, r"^dtype must be a floating-point torch.dtype .* got torch.int64 \(dtype\)$"),
])
def test_bad_build_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        optkit.build("opt-tiny", **kwargs)


def test_a_spec_that_is_no_spec():
    with pytest.raises(SpecValidationError) as info:
        optkit.build(5)
    assert problems_of(info) == ["expected a preset name, a YAML path or a mapping, got 5 (int)"]


# -- files: encodings, sizes, binary ------------------------------------------------------------------
@pytest.mark.parametrize(("data", "expected"), [
    (codecs.BOM_UTF16_LE + TINY.encode("utf-16-le"), "the file is UTF-16 text; save it as UTF-8"),
    (codecs.BOM_UTF16_BE + TINY.encode("utf-16-be"), "the file is UTF-16 text; save it as UTF-8"),
    (codecs.BOM_UTF32_LE + TINY.encode("utf-32-le"), "the file is UTF-32 text; save it as UTF-8"),
    (TINY.encode("utf-16-le"), "the file contains NUL bytes: it is binary (or UTF-16/32 without a byte order mark), "
                               "not a UTF-8 YAML spec"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "the file contains NUL bytes: it is binary (or UTF-16/32 without a "
                                             "byte order mark), not a UTF-8 YAML spec"),
    ("extends: opt-tiny\nfamily: café\n".encode("latin-1"),
     "the file is not UTF-8 text (byte 0xe9 at offset 29); save it as UTF-8"),
])
def test_files_that_are_not_utf8_yaml(tmp_path, data, expected):
    assert refused_file(write_bytes(tmp_path, data)) == [expected]


def test_utf8_with_a_byte_order_mark_is_fine(tmp_path):
    path = write_bytes(tmp_path, codecs.BOM_UTF8 + TINY.encode("utf-8"))
    assert load_spec(path) == load_spec("opt-tiny")


def test_a_file_too_large_to_be_a_spec(tmp_path):
    path = write_bytes(tmp_path, TINY.encode() + b"#" * MAX_SPEC_BYTES)
    (problem,) = refused_file(path)
    assert problem == f"the file is {MAX_SPEC_BYTES + len(TINY)} bytes; a model spec is at most {MAX_SPEC_BYTES} " \
                      "(is this the right file?)"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_any_bytes_are_a_spec_or_a_validation_error(tmp_path, data):
    path = write_bytes(tmp_path, data, "fuzz.yaml")
    try:
        load_spec(path)
    except SpecValidationError as exc:
        assert len(str(exc)) < MESSAGE_LIMIT and exc.problems


# -- YAML structure: duplicates, nesting, aliases, extends ------------------------------------------
def test_duplicate_keys_are_errors_with_their_path():
    assert refused("extends: opt-tiny\ndecoder:\n  num_layers: 2\n  num_heads: 4\n  num_layers: 3\n"
                   "extends: opt-125m\n") == [
        "decoder.num_layers: duplicate key (lines 3 and 5); keep one",
        "extends: duplicate key (lines 1 and 6); keep one"]


def test_a_key_given_after_a_merge_key_is_no_duplicate():
    spec = spec_from_yaml(f"{TINY}decoder:\n  <<: {{num_layers: 3, num_heads: 2}}\n  num_layers: 5\n")
    assert (spec.decoder.num_layers, spec.decoder.num_heads) == (5, 2)


@pytest.mark.parametrize("text", [
    "a: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "a: " + "{b: " * 5_000 + "1" + "}" * 5_000 + "\n",
    "".join("  " * i + f"k{i}:\n" for i in range(2_000)) + "  " * 2_000 + "x\n",
])
def test_very_deep_nesting(text):
    (problem,) = refused(text)
    assert problem.startswith(f"nested deeper than {MAX_DEPTH} levels (line ")


def test_deep_nesting_in_a_mapping_given_in_python():
    data: dict = {"extends": "opt-tiny"}
    inner = data
    for _ in range(10_000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(SpecValidationError) as info:
        load_spec(data)
    assert problems_of(info) == [f"nested deeper than {MAX_DEPTH} levels; a model spec is a few levels deep"]


def yaml_bomb(levels: int, target: str) -> str:
    """The classic billion-laughs document: each anchor lists the previous one nine times."""
    lines = ['a0: &a0 [l,l,l,l,l,l,l,l,l]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n{target}: *a{levels - 1}\n"


@pytest.mark.parametrize("target", ["extends", "decoder", "head"])
def test_a_yaml_bomb_is_refused_with_a_short_message(target):
    text = yaml_bomb(9, target)
    assert len(text) < 500
    start = time.perf_counter()
    assert refused(text) == [
        f"expands to more than {MAX_VALUES} values (YAML aliases repeating an anchor?); a model spec has a few dozen"]
    assert time.perf_counter() - start < 2.0


def test_a_small_bomb_in_extends_is_quoted_briefly():
    """Under the expansion limit: the wrong type is reported, and its quote stays short."""
    (problem,) = refused(yaml_bomb(3, "extends"))
    assert problem.startswith("extends: expected a preset name or a path, got [[[")
    assert len(problem) < 400


def test_an_alias_inside_its_own_anchor():
    assert refused(f"{TINY}head: &h {{name: base, params: {{x: *h}}}}\n") == [
        "contains itself (a YAML alias inside its own anchor)"]


def test_a_long_extends_chain(tmp_path):
    for i in range(1, 1_000):
        (tmp_path / f"s{i}.yaml").write_text(f"extends: s{i - 1}.yaml\n", encoding="utf-8")
    (tmp_path / "s0.yaml").write_text(TINY, encoding="utf-8")
    with pytest.raises(SpecValidationError) as info:
        load_spec(tmp_path / "s999.yaml")
    (problem,) = problems_of(info)
    assert problem.startswith(f"extends: a chain of more than {MAX_EXTENDS} specs (")
    assert str(tmp_path / "s999.yaml") in problem
    longest = tmp_path / f"s{MAX_EXTENDS - 3}.yaml"  # with the files it extends, opt-tiny and opt-base
    assert load_spec(longest).decoder.num_layers == 2


# -- bounded quotes of user data --------------------------------------------------------------------
def test_long_names_are_quoted_briefly():
    name = "x" * 1_000_000
    with pytest.raises(SpecValidationError) as info:
        optkit.build("opt-tiny", attention=name)
    (problem,) = problems_of(info)
    assert problem.startswith("decoder.attention: unknown attention 'xxxx") and "more characters" in problem
    with pytest.raises(SpecValidationError) as info:
        load_spec(name)
    assert "more characters" in problems_of(info)[0]
    with pytest.raises(SpecValidationError) as info:
        load_spec({"extends": "opt-tiny", "decoder": {name: 1}})
    assert "more characters" in problems_of(info)[0]


def test_a_thousand_problems_make_a_short_message():
    decoder = {f"unknown_{i}": i for i in range(1_000)}
    with pytest.raises(SpecValidationError) as info:
        load_spec({"extends": "opt-tiny", "decoder": decoder})
    assert len(info.value.problems) == 1_000
    message = str(info.value)
    assert message.startswith("1000 problem(s) in model spec:\n  - decoder.unknown_0: unknown field")
    assert message.endswith("\n  ... and 950 more") and len(message) < MESSAGE_LIMIT


def test_odd_paths_are_missing_files_not_os_errors():
    for path in ("spec\x00.yaml", "/" + "d" * 5_000 + ".yaml"):
        with pytest.raises(SpecValidationError) as info:
            load_spec(path)
        assert "does not exist" in problems_of(info)[0]


# -- any YAML document: a spec or one SpecValidationError --------------------------------------------
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                    st.text(max_size=20), st.sampled_from(["auto", "eager", "opt-tiny", "learned", "causal_lm"]))
KEYS = st.sampled_from(["extends", "family", "decoder", "head", "tokens", "name", "params", "vocab_size",
                        "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_positions", "attention", "mlp",
                        "norm", "dropout", "init_std", "pad_token_id", "x"])
DOCUMENTS = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=5)), max_leaves=25)


@settings(max_examples=60, deadline=None)
@given(document=st.dictionaries(KEYS, DOCUMENTS, max_size=5))
def test_any_yaml_document_is_a_spec_or_a_validation_error(document):
    text = yaml.safe_dump(document)
    try:
        spec_from_yaml(text)
    except SpecValidationError as exc:
        assert exc.problems and len(str(exc)) < MESSAGE_LIMIT


@settings(max_examples=40, deadline=None)
@given(decoder=st.dictionaries(KEYS, DOCUMENTS, max_size=6))
def test_any_decoder_over_a_preset_is_a_spec_or_a_validation_error(decoder):
    try:
        validate_spec(spec_module.resolve_raw({"extends": "opt-tiny", "decoder": decoder}))
    except SpecValidationError as exc:
        assert exc.problems and len(str(exc)) < MESSAGE_LIMIT


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("{}[]:,-&*!|>'\"#%@` \n\tab1.e")), max_size=200))
def test_any_text_is_a_spec_or_a_validation_error(text):
    try:
        spec_from_yaml(text)
    except SpecValidationError as exc:
        assert exc.problems and len(str(exc)) < MESSAGE_LIMIT
