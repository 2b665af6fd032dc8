"""A transformers user's keywords, each run side by side with transformers on the same weights and files.

Each one either behaves as in transformers (same tensors, same texts) or, where optkit deliberately
differs, raises one optkit error naming what to use instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.helpers import batch, build_tiny_bpe, hf_model, make_text_model_dir, saved_pair

import optkit
from optkit import GenerationConfig
from optkit.errors import InputError, OptkitError
from optkit.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    return saved_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_model_dir(tmp_path_factory.mktemp("text_model"))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory):
    directory = build_tiny_bpe(tmp_path_factory.mktemp("bpe"))
    return Tokenizer.from_pretrained(directory), transformers.GPT2Tokenizer.from_pretrained(directory)


# -- from_pretrained keywords -------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, dtype, backend", [
    (dict(torch_dtype=torch.float16), torch.float16, None),
    (dict(torch_dtype="bfloat16"), torch.bfloat16, None),
    (dict(dtype="bfloat16"), torch.bfloat16, None),
    (dict(attn_implementation="sdpa", low_cpu_mem_usage=True), torch.float32, "sdpa"),
    (dict(attn_implementation="eager", low_cpu_mem_usage=False), torch.float32, "eager"),
])
def test_from_pretrained_takes_transformers_keywords(tmp_path, kwargs, dtype, backend):
    hf_model().save_pretrained(tmp_path)
    model = optkit.from_pretrained(tmp_path, **kwargs)
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path, **kwargs)
    assert model.dtype == hf.dtype == dtype
    if backend is not None:
        assert model.attention_backend == backend == hf.config._attn_implementation


def test_flash_attention_2_maps_to_the_flash_backend(tmp_path):
    hf_model().save_pretrained(tmp_path)
    try:
        model = optkit.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    except OptkitError as exc:  # no flash-attn on this machine: optkit's own error names the backend
        assert "flash" in str(exc)
    else:
        assert model.attention_backend == "flash"


@pytest.mark.parametrize("kwargs, message", [
    (dict(attn_implementation="flex_attention"), "attn_implementation='flex_attention': optkit maps eager, sdpa, "
                                                 "flash_attention_2; for other kernels pass attention="),
    (dict(torch_dtype="float99"), "dtype='float99' is not a floating torch dtype"),
    (dict(torch_dtype=torch.float16, dtype=torch.float32), "pass dtype or torch_dtype"),
    (dict(attn_implementation="sdpa", attention="eager"), "pass attention or attn_implementation"),
])
def test_bad_transformers_keywords_are_one_input_error(tmp_path, kwargs, message):
    hf_model().save_pretrained(tmp_path)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        optkit.from_pretrained(tmp_path, **kwargs)


# -- model.config, num_parameters ---------------------------------------------------------------------
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings",
                 "ffn_dim", "model_type", "word_embed_proj_dim", "do_layer_norm_before", "activation_function",
                 "pad_token_id", "eos_token_id", "bos_token_id")


def test_config_view_has_transformers_fields(pair):
    hf, model = pair
    assert {name: getattr(model.config, name) for name in CONFIG_FIELDS} == \
           {name: getattr(hf.config, name) for name in CONFIG_FIELDS}
    assert model.config["hidden_size"] == hf.config.hidden_size
    assert model.config.to_dict()["model_type"] == "opt"


def test_config_view_is_read_only_and_names_fields(pair):
    _, model = pair
    with pytest.raises(InputError, match="model.config is a read-only view of model.spec; to change hidden_size"):
        model.config.hidden_size = 64
    with pytest.raises(AttributeError, match="model.config has no field 'hiden_size'"):
        model.config.hiden_size


@pytest.mark.parametrize("kwargs", [{}, dict(exclude_embeddings=True), dict(only_trainable=True)])
def test_num_parameters_counts_as_transformers(pair, kwargs):
    hf, model = pair
    assert model.num_parameters(**kwargs) == hf.num_parameters(**kwargs)


# -- generate: outputs, configs, keywords ---------------------------------------------------------------
def both_generate(hf, model, **kwargs):
    ids, mask = batch()
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    return expected, model.generate(ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=6),
    dict(max_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(max_new_tokens=5, do_sample=True, top_k=1, temperature=0.7),  # sampling from one token: deterministic
])
def test_return_dict_scores_and_logits_equal_transformers(pair, settings):
    hf, model = pair
    expected, got = both_generate(hf, model, return_dict_in_generate=True, output_scores=True, output_logits=True,
                                  **settings)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == len(got.logits) == len(expected.logits)
    for mine, theirs in zip(got.scores + got.logits, expected.scores + expected.logits):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got["sequences"] is got[0] is got.sequences


def test_return_dict_without_scores_has_sequences_only(pair):
    hf, model = pair
    expected, got = both_generate(hf, model, max_new_tokens=4, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.scores is None and got.logits is None and expected.scores is None


def test_use_cache_false_gives_transformers_tokens(pair):
    hf, model = pair
    expected, got = both_generate(hf, model, max_new_tokens=6, use_cache=False)
    assert torch.equal(got, expected)


def test_generation_config_argument_lays_its_set_fields_over_the_models(pair):
    """transformers 5: fields a passed config leaves unset come from model.generation_config."""
    hf, model = pair
    old_hf, old = hf.generation_config, model.generation_config
    try:
        hf.generation_config = transformers.GenerationConfig(repetition_penalty=1.5, max_new_tokens=3)
        model.generation_config = GenerationConfig(repetition_penalty=1.5, max_new_tokens=3)
        ids, mask = batch()
        expected = hf.generate(ids, attention_mask=mask, generation_config=transformers.GenerationConfig(max_new_tokens=7))
        mine = model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=7))
        assert torch.equal(mine, expected) and expected.shape[1] == ids.shape[1] + 7
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=7, repetition_penalty=1.0)
        assert not torch.equal(mine, plain)  # the model's penalty was applied
    finally:
        hf.generation_config, model.generation_config = old_hf, old


def test_sampling_keyword_in_a_greedy_call_warns_as_transformers_logs(pair):
    _, model = pair
    ids, mask = batch()
    with pytest.warns(UserWarning, match=r"temperature=0.5: only used when sampling"):
        greedy_warm = model.generate(ids, attention_mask=mask, max_new_tokens=3, temperature=0.5)
    assert torch.equal(greedy_warm, model.generate(ids, attention_mask=mask, max_new_tokens=3))


def test_stop_strings_end_rows_like_transformers(text_model_dir):
    hf = transformers.OPTForCausalLM.from_pretrained(text_model_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(text_model_dir)
    model, tok = optkit.from_pretrained(text_model_dir), Tokenizer.from_pretrained(text_model_dir)
    ids = torch.tensor([tok.encode("Hello world")])
    full = model.generate(ids, max_new_tokens=20)
    text = tok.decode([i for i in full[0, ids.shape[1]:].tolist() if i < len(tok)])
    for stop in (text[6:8], text[10:13], [text[15:17], "never there"]):
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, stop_strings=stop,
                               tokenizer=hf_tok)
        got = model.generate(ids, max_new_tokens=20, stop_strings=stop, tokenizer=tok)
        assert torch.equal(got, expected), stop
        assert got.shape[1] < full.shape[1]


def test_stop_strings_without_tokenizer_names_it(pair):
    _, model = pair
    with pytest.raises(InputError, match=r"^stop_strings: matching them needs the model's tokenizer; pass tokenizer="):
        model.generate(batch()[0], max_new_tokens=3, stop_strings="\n")


# -- generation_config.json ------------------------------------------------------------------------------
def test_a_transformers_generation_config_file_sets_the_defaults(tmp_path):
    hf = hf_model()
    hf.generation_config = transformers.GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=2,
                                                         max_new_tokens=7, pad_token_id=1, eos_token_id=2)
    hf.save_pretrained(tmp_path)
    model = optkit.from_pretrained(tmp_path)
    assert model.generation_config.repetition_penalty == 1.3
    ids, mask = batch()
    assert torch.equal(model.generate(ids, attention_mask=mask), hf.generate(ids, attention_mask=mask))
    override = dict(repetition_penalty=1.0, max_new_tokens=4)  # explicit keywords win, in both
    assert torch.equal(model.generate(ids, attention_mask=mask, **override),
                       hf.generate(ids, attention_mask=mask, **override))


def test_save_pretrained_writes_a_file_transformers_follows(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "plain")
    model = optkit.from_pretrained(tmp_path / "plain")
    model.generation_config = GenerationConfig(no_repeat_ngram_size=2, max_new_tokens=6)
    model.save_pretrained(tmp_path / "tuned")
    reloaded = transformers.OPTForCausalLM.from_pretrained(tmp_path / "tuned")
    assert reloaded.generation_config.no_repeat_ngram_size == 2
    ids, mask = batch()
    assert torch.equal(optkit.from_pretrained(tmp_path / "tuned").generate(ids, attention_mask=mask),
                       reloaded.generate(ids, attention_mask=mask))


def test_saving_ignored_sampling_settings_is_refused_as_in_transformers(tmp_path, pair):
    _, model = pair
    with pytest.raises(ValueError, match="temperature"):
        transformers.GenerationConfig(do_sample=False, temperature=0.7).save_pretrained(tmp_path / "hf")
    old = model.generation_config
    try:
        model.generation_config = GenerationConfig(do_sample=False, temperature=0.7)
        with pytest.raises(InputError, match=r"generation config: temperature=0.7: only used when sampling"):
            model.save_pretrained(tmp_path / "mine")
        assert not (tmp_path / "mine" / "config.json").exists()
    finally:
        model.generation_config = old


# -- tokenizer -------------------------------------------------------------------------------------------
def test_return_tensors_np(tokenizers):
    tok, hf = tokenizers
    hf.padding_side = "left"
    mine = tok(["hello", "a b c"], padding=True, return_tensors="np")
    theirs = hf(["hello", "a b c"], padding=True, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        assert isinstance(mine[key], np.ndarray) and mine[key].dtype == theirs[key].dtype
        np.testing.assert_array_equal(mine[key], theirs[key])


def test_pad_token_is_settable(tokenizers):
    tok, _ = tokenizers
    hf = transformers.GPT2Tokenizer.from_pretrained(tok.name_or_path)
    old = tok.pad_token
    try:
        tok.pad_token = hf.pad_token = tok.eos_token
        assert (tok.pad_token, tok.pad_token_id) == (hf.pad_token, hf.pad_token_id)
        with pytest.raises(InputError, match=r"pad_token='<newpad>': not a token of this vocabulary; use one it has"):
            tok.pad_token = "<newpad>"
    finally:
        tok.pad_token = old


@pytest.mark.parametrize("text", ["hello world </s> x", "def f(x):\n    return x", "  spaced   out "])
def test_tokenize(tokenizers, text):
    tok, hf = tokenizers
    assert tok.tokenize(text) == hf.tokenize(text)
    assert tok.tokenize(text, add_special_tokens=True) == hf.tokenize(text, add_special_tokens=True)


def test_text_pairs(tokenizers):
    tok, hf = tokenizers
    assert dict(tok("hello world", "the cat")) == dict(hf("hello world", "the cat"))
    assert dict(tok("hello world", "the cat", add_special_tokens=False)) == \
           dict(hf("hello world", "the cat", add_special_tokens=False))
    hf.padding_side = "left"
    assert dict(tok(["hello", "a b"], ["x", "yy zz"], padding=True)) == \
           dict(hf(["hello", "a b"], ["x", "yy zz"], padding=True))
    with pytest.raises(InputError, match=r"text_pair: pass one second text per text \(2 text\(s\), got 1\)"):
        tok(["hello", "a b"], ["x"])


# -- pipeline ------------------------------------------------------------------------------------------
PROMPTS = ["Hello world", "the quick brown fox jumps", "a"]


def test_pipeline_infers_the_task_and_takes_transformers_keywords(text_model_dir):
    hf_pipe = transformers.pipeline("text-generation", model=str(text_model_dir), device=-1)
    expected = [hf_pipe(p, max_new_tokens=8, do_sample=False) for p in PROMPTS]
    pipe = optkit.pipeline(model=text_model_dir, torch_dtype="float32", device=-1, batch_size=2)
    assert pipe.task == "text-generation" and pipe.model.device.type == "cpu"
    assert pipe(PROMPTS, max_new_tokens=8, do_sample=False) == expected
    assert pipe(PROMPTS, max_new_tokens=8, batch_size=1) == expected


def test_pipeline_batch_size_splits_the_generate_calls(text_model_dir, monkeypatch):
    pipe = optkit.pipeline(model=text_model_dir, batch_size=2)
    calls = []
    generate = pipe.model.generate
    monkeypatch.setattr(pipe.model, "generate", lambda ids, **kw: calls.append(ids.shape[0]) or generate(ids, **kw))
    pipe(PROMPTS, max_new_tokens=3)
    assert calls == [2, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size=0: must be a positive integer"),
    (dict(device=-2), "device=-2: use -1 (CPU)"),
    (dict(dtype="float32", torch_dtype="float32"), "pass dtype or torch_dtype"),
])
def test_pipeline_bad_keywords(text_model_dir, kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        optkit.pipeline(model=text_model_dir, **kwargs)


def test_pipeline_needs_a_task_or_a_model():
    with pytest.raises(InputError, match=r"pipeline\(\): pass a task \('text-generation'\) or a model"):
        optkit.pipeline()


def test_generation_warnings_do_not_leak_from_plain_calls(pair):
    _, model = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(batch()[0], attention_mask=batch()[1], max_new_tokens=2, do_sample=True, temperature=0.5)


def test_from_transformers_carries_the_generation_config():
    hf = hf_model()
    hf.generation_config = transformers.GenerationConfig(repetition_penalty=1.3, max_new_tokens=5, eos_token_id=2)
    model = optkit.from_transformers(hf)
    assert model.generation_config.explicit().items() >= {"repetition_penalty": 1.3, "max_new_tokens": 5}.items()
    ids, mask = batch()
    assert torch.equal(model.generate(ids, attention_mask=mask), hf.generate(ids, attention_mask=mask))
