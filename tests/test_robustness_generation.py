"""Bad generation and tokenizer inputs: one InputError each, naming the argument, before any compute
(issue 13 §5); GenerationConfig, the typed form of generate's settings (issue 20 §5); and generate
on one model from several threads.
"""

from __future__ import annotations

import copy
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import batch, make_text_model_dir, saved_pair

import optkit
from optkit.errors import InputError, OptkitError
from optkit.generation import check
from optkit.generation_config import GenerationConfig
from optkit.pipelines import pipeline
from optkit.tokenizer import Tokenizer, TokenizerNotFoundError

PAD = 1
PROMPT = 7


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """(transformers model, optkit model) with the same weights (vocab 99, 64 positions)."""
    return saved_pair(tmp_path_factory.mktemp("pair"), seed=0, init_std=0.2)


@pytest.fixture(scope="module")
def model(pair):
    return pair[1]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_model_dir(tmp_path_factory.mktemp("text_model"))


@pytest.fixture(scope="module")
def tok(text_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(text_dir)


@pytest.fixture()
def no_compute(model, monkeypatch):
    """The model must not run: every check comes first."""
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran the model despite bad arguments"))
    return model


def prompts():
    return batch(0, batch_size=3, length=PROMPT)  # rows left-padded by 0 / 2 / 4


# -- mistyped or non-finite settings -----------------------------------------------------------------
BAD_SETTINGS = [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", "0.7"),
    ("repetition_penalty", math.inf), ("repetition_penalty", math.nan), ("length_penalty", math.nan),
    ("length_penalty", -math.inf), ("top_p", "0.9"), ("top_p", math.nan), ("top_p", True),
    ("eos_token_id", "</s>"), ("eos_token_id", [2, "</s>"]), ("eos_token_id", 2.0), ("pad_token_id", 1.5),
    ("pad_token_id", "<pad>"), ("max_new_tokens", 3.0), ("max_new_tokens", True), ("max_new_tokens", "3"),
    ("top_k", 5.5), ("num_beams", True), ("num_return_sequences", "2"), ("do_sample", "yes"), ("do_sample", 1),
    ("early_stopping", "sometimes"), ("min_new_tokens", False), ("no_repeat_ngram_size", 2.0),
    ("cache_implementation", 3), ("cache_implementation", ""), ("decode_graph", "auto"), ("compile", "no"),
]


@pytest.mark.parametrize("name, value", BAD_SETTINGS, ids=[f"{n}={v!r}" for n, v in BAD_SETTINGS])
def test_mistyped_or_non_finite_setting_is_one_input_error(no_compute, name, value):
    ids, mask = prompts()
    with pytest.raises(InputError) as info:
        no_compute.generate(ids, attention_mask=mask, **{"max_new_tokens": 3, name: value})
    assert str(info.value).startswith(f"{name}=") and "must be" in str(info.value)
    with pytest.raises(InputError, match=f"^{name}="):
        GenerationConfig(**{name: value})


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(GenerationConfig.model_fields)),
       value=st.one_of(st.text(max_size=5), st.floats(allow_nan=True, allow_infinity=True).filter(
           lambda f: not math.isfinite(f)), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)))
def test_any_string_non_finite_float_or_dict_is_refused_by_every_setting(name, value):
    """No setting reads a string, a NaN/inf or a dict (cache_implementation takes names: strings only)."""
    if name == "cache_implementation" and isinstance(value, str) and value:
        return
    with pytest.raises(InputError, match=f"^{name}="):
        GenerationConfig(**{name: value})


def test_unknown_setting_names_it_and_the_nearest(no_compute):
    ids, mask = prompts()
    with pytest.raises(InputError, match=r"^top_pp: not a generation setting; did you mean 'top_p'\?"):
        no_compute.generate(ids, attention_mask=mask, top_pp=0.9)


def test_several_bad_settings_are_listed_in_one_error(no_compute):
    ids, mask = prompts()
    with pytest.raises(InputError, match=r"^bad generate\(\) arguments: temperature=nan.*; pad_token_id=1.5"):
        no_compute.generate(ids, attention_mask=mask, temperature=math.nan, pad_token_id=1.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(generation_config={"top_k": 3}), r"^generation_config: expected an optkit.GenerationConfig, got dict"),
    (dict(generator=123), r"^generator: expected a torch.Generator or None, got int"),
    (dict(streamer="print"), r"^bad generate\(\) arguments: streamer: expected an object with put\(ids\) and end"),
])
def test_mistyped_objects(no_compute, kwargs, message):
    ids, mask = prompts()
    with pytest.raises(InputError, match=message):
        no_compute.generate(ids, attention_mask=mask, max_new_tokens=2, **kwargs)


# -- attention masks -----------------------------------------------------------------------------------
MASKS = [
    (lambda m: m.tolist(), r"^attention_mask: expected a tensor of 0/1 shaped like input_ids, got list"),
    (lambda m: m * 2, r"^attention_mask: contains 2; only 0 \(padding\) and 1 \(token\) are allowed"),
    (lambda m: m.float() * 0.5, r"^attention_mask: contains 0.5"),
    (lambda m: m.flip(1), r"^attention_mask: row 1 is not left-padded \(\[1, 1, 1, 1, 1, 0, 0\]\); generate "
                          r"appends new tokens on the right, so pad on the left"),
    (lambda m: torch.tensor([[1, 1, 0, 1, 1, 1, 1]] * 3), r"^attention_mask: row 0 is not left-padded"),
    (lambda m: m.index_fill(0, torch.tensor([2]), 0), r"^attention_mask: row 2 is all 0 \(no tokens\)"),
]


@pytest.mark.parametrize("make, message", MASKS, ids=["list", "twos", "halves", "right", "hole", "empty-row"])
def test_bad_attention_mask_is_one_input_error(no_compute, make, message):
    ids, mask = prompts()
    with pytest.raises(InputError, match=message):
        no_compute.generate(ids, attention_mask=make(mask), max_new_tokens=2)


def test_bool_mask_is_accepted_and_equals_the_integer_one(model):
    ids, mask = prompts()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(model.generate(ids, attention_mask=mask.bool(), max_new_tokens=5, eos_token_id=[]), expected)


def test_right_padding_without_a_mask_is_refused_not_masked(no_compute):
    """Without a mask pad tokens are masked (as transformers); on the right that would silently give other
    tokens than the row alone, so it is an error."""
    ids, _ = batch(0, batch_size=3, length=PROMPT, padding="right")
    with pytest.raises(InputError, match=r"^input_ids: row 1 has pad_token_id=1 after its first token"):
        no_compute.generate(ids, max_new_tokens=2)


def _mask_row(width: int) -> st.SearchStrategy[list[int]]:
    left_padded = st.integers(0, width - 1).map(lambda pads: [0] * pads + [1] * (width - pads))
    return st.one_of(left_padded, st.lists(st.integers(0, 1), min_size=width, max_size=width))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_mask_gives_each_row_its_tokens_alone_or_one_input_error(model, data):
    """Never a silently different continuation: every row gets exactly what it gets alone, or the call fails."""
    width, rows = 6, data.draw(st.integers(1, 3))
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(3, 98), min_size=width, max_size=width),
                                          min_size=rows, max_size=rows)))
    mask = torch.tensor(data.draw(st.lists(_mask_row(width), min_size=rows, max_size=rows)))
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    except InputError as exc:
        assert str(exc).startswith("attention_mask: row ")
        return
    for row in range(rows):
        real = ids[row][mask[row].bool()]
        alone = model.generate(real[None], max_new_tokens=4, eos_token_id=[])
        assert torch.equal(out[row, width:], alone[0, len(real):])


# -- generation config ---------------------------------------------------------------------------------
def test_config_and_keywords_give_the_same_tokens_and_keywords_win(model):
    ids, mask = prompts()
    cfg = GenerationConfig(max_new_tokens=6, repetition_penalty=1.3, eos_token_id=[], pad_token_id=PAD)
    by_config = model.generate(ids, attention_mask=mask, generation_config=cfg)
    by_keywords = model.generate(ids, attention_mask=mask, max_new_tokens=6, repetition_penalty=1.3, eos_token_id=[],
                                 pad_token_id=PAD)
    assert torch.equal(by_config, by_keywords)
    overridden = model.generate(ids, attention_mask=mask, generation_config=cfg, max_new_tokens=3)
    assert overridden.shape[1] == PROMPT + 3 and torch.equal(overridden, by_config[:, :PROMPT + 3])
    assert cfg.max_new_tokens == 6  # the override made a new config; the shared one is unchanged


def test_config_matches_transformers_generation_config(pair):
    from transformers import GenerationConfig as HFGenerationConfig

    hf, ok = pair
    ids, mask = prompts()
    values = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.5, no_repeat_ngram_size=2,
                  eos_token_id=2, pad_token_id=PAD)
    expected = hf.generate(ids, attention_mask=mask, generation_config=HFGenerationConfig(**values))
    assert torch.equal(ok.generate(ids, attention_mask=mask, generation_config=GenerationConfig(**values)), expected)


def test_the_models_own_config_is_the_default(model, monkeypatch):
    ids, mask = prompts()
    monkeypatch.setattr(model, "generation_config", GenerationConfig(max_new_tokens=3, eos_token_id=[]),
                        raising=False)
    assert model.generate(ids, attention_mask=mask).shape[1] == PROMPT + 3
    assert model.generate(ids, attention_mask=mask, max_new_tokens=5).shape[1] == PROMPT + 5


def test_config_is_immutable_and_replace_validates():
    cfg = GenerationConfig(top_k=5)
    with pytest.raises(InputError, match=r"immutable.*cfg.replace\(top_k=...\)"):
        cfg.top_k = 7
    assert cfg.replace(top_k=7).top_k == 7 and cfg.top_k == 5
    with pytest.raises(InputError, match="^top_k='7'"):
        cfg.replace(top_k="7")


def test_ints_are_accepted_for_floats_and_tuples_for_eos():
    cfg = GenerationConfig(temperature=1, top_p=1, length_penalty=2, eos_token_id=(2, 3))
    assert cfg.temperature == 1.0 and isinstance(cfg.temperature, float) and cfg.eos_token_id == [2, 3]


def test_transformers_generation_config_json_loads(tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig

    HFGenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=40, bos_token_id=2, eos_token_id=2,
                       pad_token_id=1, max_length=512, typical_p=1.0).save_pretrained(tmp_path)
    cfg = GenerationConfig.from_file(tmp_path)  # the directory, or the file itself
    assert cfg == GenerationConfig.from_file(tmp_path / "generation_config.json")
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k, cfg.eos_token_id, cfg.pad_token_id,
            cfg.max_length) == (True, 0.6, 0.9, 40, 2, 1, 512)


def test_opt_125m_generation_config_loads(tmp_path):
    """facebook/opt-125m's file: metadata is dropped; bos_token_id is kept (as transformers keeps it)."""
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"_from_model_config": True, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
                                "transformers_version": "4.27.0.dev0"}))
    assert GenerationConfig.from_file(path) == GenerationConfig(eos_token_id=2, pad_token_id=1, bos_token_id=2)


@pytest.mark.parametrize("data, message", [
    ({"typical_p": 0.5, "top_p": 0.9}, r"typical_p=0.5: not implemented by optkit, so generation would not follow it"),
    ({"top_pp": 0.9}, r"top_pp=0.9 \(did you mean 'top_p'\?\)"),
    ({"top_p": "0.9"}, r"top_p='0.9': must be in \(0, 1\]"),
    ({"temperature": 0.7, "num_beams": 0}, r"num_beams=0: must be an integer >= 1"),
    ([1, 2], r"expected a JSON object of settings, got list"),
])
def test_bad_generation_config_file_names_the_file_and_the_key(tmp_path, data, message):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"^generation config '{path}': {message}"):
        GenerationConfig.from_file(path)


def test_unreadable_generation_config_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        GenerationConfig.from_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{'top_k': 3")
    with pytest.raises(InputError, match="not valid JSON"):
        GenerationConfig.from_file(tmp_path / "broken.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="cannot be read"):
        GenerationConfig.from_file(tmp_path / "binary.json")


CONFIGS = st.builds(
    GenerationConfig,
    max_new_tokens=st.none() | st.integers(1, 500), min_new_tokens=st.integers(0, 10), do_sample=st.booleans(),
    temperature=st.none() | st.floats(0.01, 5), top_k=st.none() | st.integers(0, 100),
    top_p=st.none() | st.floats(0.01, 1.0), repetition_penalty=st.floats(0.1, 3), num_beams=st.integers(1, 8),
    early_stopping=st.sampled_from([True, False, "never"]),
    eos_token_id=st.none() | st.integers(0, 50_000) | st.lists(st.integers(0, 50_000), max_size=3),
    cache_implementation=st.sampled_from(["static", "dynamic", None]),
    decode_graph=st.sampled_from([None, True, False]),
)


@settings(max_examples=40, deadline=None)
@given(cfg=CONFIGS)
def test_to_dict_round_trips_through_json(tmp_path_factory, cfg):
    assert GenerationConfig(**cfg.to_dict()) == cfg
    path = tmp_path_factory.mktemp("cfg") / "generation_config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert GenerationConfig.from_file(path) == cfg


def test_pipeline_follows_the_config(text_dir):
    pipe = pipeline("text-generation", model=text_dir)
    cfg = GenerationConfig(max_new_tokens=4, do_sample=True, num_return_sequences=3, top_k=0)
    out = pipe(["Hello", "the quick brown fox"], generation_config=cfg, generator=torch.Generator().manual_seed(0))
    assert [len(group) for group in out] == [3, 3]
    again = pipe(["Hello", "the quick brown fox"], max_new_tokens=4, do_sample=True, num_return_sequences=3, top_k=0,
                 generator=torch.Generator().manual_seed(0))
    assert out == again


def test_check_raises_what_generate_would_without_running(no_compute):
    ids, mask = prompts()
    with pytest.raises(InputError, match="^top_p=1.5"):
        check(no_compute, ids, attention_mask=mask, top_p=1.5)
    check(no_compute, ids, attention_mask=mask, max_new_tokens=3)  # valid: returns, runs nothing


# -- one model, several threads --------------------------------------------------------------------------
def test_generate_never_changes_the_model(model):
    def state():
        return ([(n, id(m), type(m)) for n, m in model.named_modules()], sorted(vars(model)),
                [(n, p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()], model.training,
                {k: v.clone() for k, v in model.state_dict().items()})

    before = state()
    ids, mask = prompts()
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, num_beams=2)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, decode_graph=True)
    after = state()
    assert before[:4] == after[:4]
    assert all(torch.equal(before[4][k], after[4][k]) for k in before[4])


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_threads_share_a_model_and_a_bad_call_fails_alone(model, device):
    """Per-call state belongs to the call: one thread's out-of-range id is its own InputError, and the
    others produce exactly the tokens they produce alone (on CUDA: with captured decode graphs)."""
    model = model if device == "cpu" else copy.deepcopy(model).to(device)
    g = torch.Generator().manual_seed(5)
    jobs = [dict(ids=torch.randint(3, 99, (1, n), generator=g), kwargs=options)
            for n, options in [(3, {}), (6, dict(num_beams=2)), (4, dict(decode_graph=True)), (5, {})] * 2]
    bad = torch.tensor([[5, 7, 500]])
    alone = [model.generate(job["ids"], max_new_tokens=8, eos_token_id=[], **job["kwargs"]) for job in jobs]
    results: dict[int, object] = {}
    start = threading.Barrier(len(jobs) + 1)

    def work(index: int, ids: torch.Tensor, kwargs: dict) -> None:
        start.wait()
        try:
            for _ in range(3):
                results[index] = model.generate(ids, max_new_tokens=8, eos_token_id=[], **kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded and checked below
            results[index] = exc

    threads = [threading.Thread(target=work, args=(i, job["ids"], job["kwargs"])) for i, job in enumerate(jobs)]
    threads.append(threading.Thread(target=work, args=(len(jobs), bad, {})))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert isinstance(results[len(jobs)], InputError)
    assert "input_ids: token id 500 is outside the vocabulary (0..98)" in str(results[len(jobs)])
    for index, expected in enumerate(alone):
        assert isinstance(results[index], torch.Tensor), results[index]
        assert torch.equal(results[index], expected), f"thread {index} got other tokens than alone"
    with pytest.raises(InputError, match="outside the vocabulary"):  # afterwards too: never a raw IndexError
        model.generate(bad, max_new_tokens=2)


# -- tokenizer inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    (5, r"^text: expected a str or a list of str, got int 5"),
    (None, r"^text: expected a str or a list of str, got NoneType None"),
    ({"text": "Hello"}, r"^text: expected a str or a list of str, got dict"),
    (b"Hello", r"^text: got bytes; decode it first"),
    (["Hello", 5], r"^text\[1\]: expected a str, got int 5"),
    (["ok", None], r"^text\[1\]: expected a str, got NoneType"),
    ("a\ud800b", r"^text: lone surrogate U\+D800 at character 1 is not valid Unicode"),
    (["fine", "x\udcff"], r"^text\[1\]: lone surrogate U\+DCFF at character 1"),
])
def test_tokenizer_refuses_what_is_not_text(tok, text, message):
    with pytest.raises(InputError, match=message):
        tok(text)
    if not isinstance(text, list):
        with pytest.raises(InputError, match=r"^(encode\(text\): expected a str, got|text: lone surrogate)"):
            tok.encode(text)


@pytest.mark.parametrize("kwargs", [dict(padding=True), dict(padding="max_length", max_length=4),
                                    dict(return_tensors="pt")])
def test_empty_batch_with_padding_or_tensors(tok, kwargs):
    with pytest.raises(InputError, match=r"^text: empty batch \(\[\]\)"):
        tok([], **kwargs)
    assert tok([]) == {"input_ids": [], "attention_mask": []}  # as transformers, when nothing needs a shape


@pytest.mark.parametrize("ids, message", [
    ([5, 10**9], r"^decode\(\): token id 1000000000 at position 1 is outside the vocabulary \(0\.\.\d+\)"),
    ([-1], r"^decode\(\): token id -1 at position 0 is outside the vocabulary"),
    ([5, 1.5], r"^decode\(\): token ids must be integers; got float 1.5 at position 1"),
    ([True], r"^decode\(\): token ids must be integers; got bool True"),
    (["5"], r"^decode\(\): token ids must be integers; got str '5'"),
    (torch.tensor([1.0, 2.0]), r"^decode\(\): token ids must be integers; got float 1.0"),
    ("hello", r"^decode\(\): expected token ids \(a list of int or a 1-D integer tensor\), got str"),
    (None, r"^decode\(\): expected token ids"),
    ([[5, 6], [7]], r"^decode\(\): takes one sequence of ids, got a nested sequence; use batch_decode\(\)"),
])
def test_decode_refuses_ids_it_cannot_decode(tok, ids, message):
    with pytest.raises(InputError, match=message):
        tok.decode(ids)


def test_batch_decode_names_the_row(tok):
    with pytest.raises(InputError, match=r"^batch_decode\(\) row 1: token id 99999 at position 2"):
        tok.batch_decode([[5, 6], [7, 8, 99999]])
    with pytest.raises(InputError, match=r"^batch_decode\(\): expected a batch of id sequences"):
        tok.batch_decode(5)


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(-2**40, 2**40), max_size=6))
def test_decode_gives_text_or_one_input_error(tok, ids):
    try:
        text = tok.decode(ids)
    except InputError as exc:
        assert any(not 0 <= i < len(tok) for i in ids) and "outside the vocabulary" in str(exc)
    else:
        assert isinstance(text, str) and all(0 <= i < len(tok) for i in ids)


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(exclude_categories=()), max_size=20))  # surrogates included
def test_any_text_encodes_or_is_one_input_error(tok, text):
    """Every str either encodes (and decodes back) or, holding a surrogate, is an InputError."""
    try:
        ids = tok.encode(text, add_special_tokens=False)
    except InputError as exc:
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text) and "lone surrogate" in str(exc)
    else:
        assert tok.decode(ids) == text


def test_tokenizer_not_found_is_an_optkit_error(tmp_path):
    assert issubclass(TokenizerNotFoundError, OptkitError) and issubclass(TokenizerNotFoundError, OSError)
    with pytest.raises(OptkitError, match="No tokenizer files"):
        Tokenizer.from_pretrained(tmp_path)


def test_streamer_refuses_non_integer_ids(tok):
    from optkit.streaming import TextStreamer

    with pytest.raises(InputError, match=r"^streamer.put: token ids must be integers"):
        TextStreamer(tok, on_text=lambda text, final: None).put([1.5])


def test_generate_exports(model):
    assert optkit.GenerationConfig is GenerationConfig and "GenerationConfig" in optkit.__all__
