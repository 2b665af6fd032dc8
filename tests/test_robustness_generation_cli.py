"""Adversarial inputs to generation, the pipeline, streaming, the tokenizer and the command line that used to
escape as bare TypeError / RuntimeError / OverflowError, hang a streaming consumer, or give another result than
transformers: each is now one optkit error naming the argument, or transformers' result.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import batch, make_text_model_dir, saved_pair

import optkit
from optkit.cli import main
from optkit.errors import InputError
from optkit.generation_config import GenerationConfig
from optkit.pipelines import pipeline
from optkit.streaming import TextIteratorStreamer
from optkit.tokenizer import Tokenizer, TokenizerNotFoundError


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """(transformers model, optkit model) with the same weights (vocab 99, 64 positions)."""
    return saved_pair(tmp_path_factory.mktemp("pair"), seed=0, init_std=0.2)


@pytest.fixture(scope="module")
def model(pair):
    return pair[1]


@pytest.fixture()
def no_compute(model, monkeypatch):
    """The model must not run: every check comes first."""
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("ran the model despite bad arguments"))
    return model


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_model_dir(tmp_path_factory.mktemp("text_model"))


@pytest.fixture(scope="module")
def tok(text_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(text_dir)


@pytest.fixture(scope="module")
def pipe(text_dir: Path):
    return pipeline("text-generation", model=text_dir)


def prompts():
    return batch(0, batch_size=3, length=7)


# -- generate: stopping criteria ----------------------------------------------------------------------
@pytest.mark.parametrize("criteria, message", [
    (5, r"^stopping_criteria: expected a list of callables .* got int; wrap a single criterion in a list"),
    (lambda ids, scores: True, r"^stopping_criteria: expected a list of callables .* got function"),
    ([None], r"^stopping_criteria\[0\]: expected a callable .* got NoneType"),
])
def test_stopping_criteria_that_are_no_list_of_callables(no_compute, criteria, message):
    ids, mask = prompts()
    with pytest.raises(InputError, match=message):
        no_compute.generate(ids, attention_mask=mask, max_new_tokens=2, stopping_criteria=criteria)


@pytest.mark.parametrize("answer, message", [
    ([True, False, True], r"^stopping_criteria\[0\] returned list; a criterion returns a bool tensor of shape \(3,\)"),
    (torch.ones(3, 1, dtype=torch.bool), r"^stopping_criteria\[0\] returned a torch.bool tensor of shape \(3, 1\)"),
    (torch.ones(2, dtype=torch.bool), r"^stopping_criteria\[0\] returned a torch.bool tensor of shape \(2,\)"),
])
def test_a_criterion_answer_that_is_no_flag_per_row(model, answer, message):
    ids, mask = prompts()
    with pytest.raises(InputError, match=message):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, stopping_criteria=[lambda i, s: answer])


ANSWERS = st.one_of(
    st.booleans(), st.integers(-2, 2), st.none(), st.lists(st.booleans(), max_size=4),
    st.builds(lambda shape, dtype: torch.ones(shape, dtype=dtype),
              st.lists(st.integers(0, 3), max_size=2).map(tuple),
              st.sampled_from([torch.bool, torch.int64, torch.uint8, torch.float32])))


@settings(max_examples=25, deadline=None)
@given(answer=ANSWERS)
def test_any_criterion_answer_stops_rows_or_is_one_input_error(model, answer):
    """A bool or an integer/bool tensor of one value or one per row (3 here) is used; anything else is refused."""
    ids, mask = prompts()
    usable = isinstance(answer, bool) or (isinstance(answer, torch.Tensor) and answer.dim() <= 1
                                          and answer.numel() in (1, 3) and not answer.is_floating_point())
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, stopping_criteria=[lambda i, s: answer])
    except InputError as exc:
        assert not usable and str(exc).startswith("stopping_criteria[0] returned "), exc
    else:
        assert usable
        stops = bool(answer) if isinstance(answer, bool) else bool(answer.bool().all())
        assert out.shape[1] == ids.shape[1] + (1 if stops else 3)


def test_a_criterion_answering_one_bool_stops_like_transformers(pair):
    hf, model = pair
    ids, mask = prompts()
    stop_after = lambda i, s: i.shape[1] >= 9  # noqa: E731 - a plain bool, which transformers ORs into its flags
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                           stopping_criteria=transformers.StoppingCriteriaList([stop_after]))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, stopping_criteria=[stop_after])
    assert torch.equal(got, expected)


def test_check_knows_stopping_criteria(pipe, model):
    pipe.check("Hello", max_new_tokens=2, stopping_criteria=[lambda i, s: False])  # no "not a generation setting"
    ids, mask = prompts()
    with pytest.raises(InputError, match=r"^stopping_criteria: not supported with beam search"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, num_beams=2, stopping_criteria=[lambda i, s: False])


# -- generate: settings that overflow float arithmetic --------------------------------------------------
def test_a_length_penalty_whose_power_overflows(no_compute):
    ids, mask = prompts()
    with pytest.raises(InputError, match=r"^length_penalty=1000.0: beam scores are divided by new_tokens \*\* "
                                         r"length_penalty, which overflows with up to 4 new tokens; use "
                                         r"length_penalty <= 511"):
        no_compute.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, length_penalty=1000.0)


@pytest.mark.parametrize("settings", [dict(temperature=1e-40), dict(repetition_penalty=1e-300)])
def test_sampling_scores_scaled_beyond_float32(model, settings):
    ids, mask = prompts()
    with pytest.raises(InputError, match=r"^sampling: the next-token probabilities hold inf or nan: temperature="):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=True, **settings)


# -- beam search ids after a finished hypothesis -----------------------------------------------------
def test_beam_search_fills_finished_rows_like_transformers_when_pad_is_0(pair):
    """transformers fills with `pad_token_id or eos_token_id[0]`: pad id 0 (LLaMA-style vocabularies) means EOS."""
    hf, model = pair
    ids, mask = batch(0, batch_size=2, length=7)
    settings = dict(max_new_tokens=5, num_beams=2, repetition_penalty=2.0, no_repeat_ngram_size=2, min_new_tokens=1,
                    length_penalty=-1.0, pad_token_id=0)
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, **settings)
    got = model.generate(ids, attention_mask=mask, **settings)
    assert (expected[:, 7:] == 2).sum() > 1  # a row that ended early, then filled
    assert torch.equal(got, expected)


# -- generate: tensors without values -----------------------------------------------------------------
def test_meta_inputs_and_models_are_refused(model):
    ids, mask = prompts()
    with pytest.raises(InputError, match=r"^input_ids: on the meta device"):
        model.generate(ids.to("meta"), max_new_tokens=2)
    with pytest.raises(InputError, match=r"^attention_mask: on the meta device"):
        model.generate(ids, attention_mask=mask.to("meta"), max_new_tokens=2)
    with pytest.raises(InputError, match=r"^the model is on the meta device"):
        copy.deepcopy(model).to("meta").generate(ids, attention_mask=mask, max_new_tokens=2)


# -- streaming: a failure reaches the consumer ----------------------------------------------------------
def _consume(streamer: TextIteratorStreamer) -> list[str]:
    """Iterate in another thread; a consumer still waiting after 20 s is a hang."""
    seen: list[str] = []

    def run() -> None:
        try:
            seen.extend(streamer)
            seen.append("<end>")
        except Exception as exc:  # noqa: BLE001 - the test looks at what arrived
            seen.append(f"<{type(exc).__name__}: {exc}>")

    consumer = threading.Thread(target=run, daemon=True)
    consumer.start()
    consumer.join(20)
    assert not consumer.is_alive(), "the consumer still waits for text that never comes"
    return seen


def test_a_generation_failing_midway_ends_the_stream_with_its_error(pipe):
    def boom(ids, scores):
        if ids.shape[1] > 4:
            raise ValueError("criterion failed")
        return torch.zeros(ids.shape[0], dtype=torch.bool)

    streamer = TextIteratorStreamer(pipe.tokenizer)
    with pytest.raises(ValueError, match="criterion failed"):
        pipe("Hello", max_new_tokens=6, streamer=streamer, stopping_criteria=[boom])
    seen = _consume(streamer)
    assert seen[-1] == "<ValueError: criterion failed>" and "<end>" not in seen


def test_arguments_refused_before_generating_end_the_stream(pipe):
    streamer = TextIteratorStreamer(pipe.tokenizer)
    with pytest.raises(InputError):
        pipe("Hello", max_new_tokens=0, streamer=streamer)
    seen = _consume(streamer)
    assert len(seen) == 1 and seen[0].endswith(": max_new_tokens=0: must be a positive integer (the number of tokens "
                                               "to add) or None>")
    streamer = TextIteratorStreamer(pipe.tokenizer)
    with pytest.raises(InputError):
        pipe(123, streamer=streamer)
    assert _consume(streamer)[0].startswith("<InputError: text-generation pipeline: pass a string")
    expected = pipe("Hello", max_new_tokens=2)[0]["generated_text"]
    pipe("Hello", max_new_tokens=2, streamer=streamer)  # the streamer works again after a failure
    assert "".join(_consume(streamer)[:-1]) == pipe.tokenizer.decode(pipe.tokenizer.encode(expected))


def test_the_pipeline_warns_about_sampling_settings_it_ignores(pipe):
    with pytest.warns(UserWarning, match=r"^pipeline\(\): temperature=0.5: only used when sampling"):
        pipe("Hello", max_new_tokens=1, temperature=0.5)


# -- pipeline devices ------------------------------------------------------------------------------
@pytest.mark.parametrize("device, message", [
    ("nope", r"^device='nope': not a device; use 'cpu', 'cuda'"),
    (3.5, r"^device=3.5: not a device"),
    ("meta", r"^device='meta' holds shapes without weights, so a pipeline cannot generate there"),
])
def test_pipeline_devices_that_cannot_generate(text_dir, device, message):
    with pytest.raises(InputError, match=message):
        pipeline("text-generation", model=text_dir, device=device)


# -- tokenizer ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tok(text_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(text_dir))


def test_unknown_token_strings_map_to_the_unknown_id(tok, hf_tok):
    tokens = ["zzqq-no-such-token", tok.convert_ids_to_tokens(5)]
    assert tok.convert_tokens_to_ids(tokens) == hf_tok.convert_tokens_to_ids(tokens) == [tok.unk_token_id, 5]
    assert tok.convert_tokens_to_ids("zzqq-no-such-token") == hf_tok.unk_token_id


@pytest.mark.parametrize("call, message", [
    (lambda t: t.convert_tokens_to_ids(5), r"^convert_tokens_to_ids\(\): expected a token string or a list .* int 5"),
    (lambda t: t.convert_tokens_to_ids(["a", None]), r"^convert_tokens_to_ids\(\): tokens are strings; got NoneType "
                                                     r"None at position 1"),
    (lambda t: t.convert_ids_to_tokens([4, -1]), r"^convert_ids_to_tokens\(\): token id -1 at position 1 is negative"),
    (lambda t: t("a b", truncation="sideways", max_length=2), r"^truncation='sideways': must be True, False, None"),
    (lambda t: t("a b", truncation="only_second", max_length=2), r"^truncation='only_second'.*text_pair"),
    (lambda t: t("a b", add_special_tokens="no"), r"^add_special_tokens='no': must be True or False"),
    (lambda t: t.encode("a b", add_special_tokens=None), r"^add_special_tokens=None: must be True or False"),
    (lambda t: Tokenizer.from_pretrained(None), r"^tokenizer: expected a directory or a Hugging Face Hub id, got "
                                                r"NoneType"),
    (lambda t: Tokenizer.from_pretrained(""), r"^tokenizer: expected a directory .* got str ''"),
])
def test_tokenizer_arguments_of_the_wrong_kind(tok, call, message):
    with pytest.raises(InputError, match=message):
        call(tok)


def test_ids_past_the_vocabulary_have_no_token(tok, hf_tok):
    assert tok.convert_ids_to_tokens(len(tok)) is None and hf_tok.convert_ids_to_tokens(len(tok)) is None
    assert tok.convert_ids_to_tokens(2**70) is None  # transformers: OverflowError


def test_batch_decode_of_one_sequence_is_one_text_as_in_transformers(tok, hf_tok):
    ids = tok.encode("Hello there")
    with pytest.warns(UserWarning, match=r"batch_decode\(\) got one sequence"):
        assert tok.batch_decode(ids) == hf_tok.batch_decode(ids) == [tok.decode(ids)]


def test_save_and_load_paths(tok, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match=r"^save_pretrained\(\): '.*notes.txt' is a file; pass a directory"):
        tok.save_pretrained(a_file)
    with pytest.raises(TokenizerNotFoundError, match=r"^'\./no/such/dir' is not a local directory \(nothing is "
                                                     r"there\); pass the directory holding"):
        Tokenizer.from_pretrained("./no/such/dir")  # a path, never asked of the Hub


# -- command line ------------------------------------------------------------------------------------
def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), (code, out, err)
    assert err.startswith("optkit: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["info", "--device", "nope"], "--device 'nope': not a device; use cpu, cuda, cuda:1"),
    (["plugins", "--device", "nope"], "--device 'nope': not a device"),
    (["run", "--prompt", "hi", "--device", "nope"], "device='nope': not a device"),
    (["run", "--prompt", "hi", "--device", "meta"], "device='meta' holds shapes without weights"),
    (["run", "--prompt", "hi", "--do-sample", "--seed", str(2**64)], f"--seed {2**64}: out of range; use an integer "
                                                                     "from 0 to 2**64 - 1"),
    (["bench", "--threads", "0"], "--threads: expected a positive integer, got 0"),
    (["bench", "--device", "nope"], "--device 'nope': not a device"),
    (["bench", "--plot", "/no/such/dir/bars.svg"], "--plot '/no/such/dir/bars.svg' goes into '/no/such/dir', which is "
                                                   "no directory; pass a file in an existing directory"),
    (["train", "--spec", "opt-tiny", "--data", "x", "--out", "y", "--threads", "-1"],
     "--threads -1: expected a positive number of CPU threads"),
])
def test_command_line_values_that_are_refused_in_one_line(capsys, text_dir, argv, message):
    if argv[0] == "run":
        argv = [*argv, "--model", str(text_dir)]
    assert message in one_line_error(capsys, argv)


def test_run_with_a_model_path_that_does_not_exist(capsys, tmp_path):
    missing = tmp_path / "no" / "model"
    err = one_line_error(capsys, ["run", "--prompt", "hi", "--model", str(missing)])
    assert f"'{missing}' is not a local directory (nothing is there)" in err and "Hub download" not in err


def test_a_directory_given_as_a_spec_is_named_as_one(capsys, tmp_path):
    (tmp_path / "child.yaml").write_text(f"extends: {tmp_path}\n", encoding="utf-8")
    for argv in (["spec", "validate", str(tmp_path)], ["spec", "validate", str(tmp_path / "child.yaml")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"  - {tmp_path} is a directory; give a preset name or a .yaml spec file" in err, err


def test_a_generation_config_file_with_a_key_given_twice(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text('{"do_sample": true, "top_k": 5, "top_k": 50}', encoding="utf-8")
    with pytest.raises(InputError, match=r"generation config '.*generation_config.json': 'top_k' is given twice "
                                         r"\(JSON keeps the last one silently\); keep one"):
        GenerationConfig.from_file(tmp_path)


def test_generate_takes_the_prompt_as_inputs_like_transformers():
    """transformers' first parameter is ``inputs``; code that names it runs unchanged, and a prompt given twice or
    not at all is one InputError."""
    model = optkit.build("opt-tiny").eval()
    ids = torch.tensor([[5, 6, 7]])
    expected = model.generate(ids, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(model.generate(inputs=ids, max_new_tokens=3, eos_token_id=[]), expected)
    with pytest.raises(InputError, match="the prompt came twice"):
        model.generate(ids, inputs=ids, max_new_tokens=3)
    with pytest.raises(InputError, match="no prompt; pass input_ids"):
        model.generate(max_new_tokens=3)
