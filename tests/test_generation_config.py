"""generation_config.json: read into ``model.generation_config``, used as the defaults of generate, pipelines
and ``optkit run``, overridden by explicit arguments, written by ``save_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import batch, hf_model, make_text_model_dir

import optkit
from optkit import GenerationConfig
from optkit.bundled import default_model_dir
from optkit import cli_run
from optkit.cli import main
from optkit.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("ckpt")
    hf_model().save_pretrained(directory)
    return directory


def with_file(directory, settings: dict):
    (directory / "generation_config.json").write_text(json.dumps(settings))
    return directory


def test_no_file_means_the_defaults(tmp_path, checkpoint):
    import shutil

    directory = shutil.copytree(checkpoint, tmp_path / "c")
    assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"] == 2  # transformers wrote it
    explicit = optkit.from_pretrained(directory).generation_config.explicit()
    assert {"eos_token_id": 2, "pad_token_id": 1, "bos_token_id": 2}.items() <= explicit.items()
    (directory / "generation_config.json").unlink()
    model = optkit.from_pretrained(directory)
    assert model.generation_config == GenerationConfig() and model.generation_config.explicit() == {}


def test_the_file_becomes_the_defaults_and_keywords_override_it(tmp_path, checkpoint):
    import shutil

    directory = with_file(shutil.copytree(checkpoint, tmp_path / "c"),
                          {"repetition_penalty": 1.4, "no_repeat_ngram_size": 2, "max_new_tokens": 5,
                           "transformers_version": "4.40.0", "_from_model_config": True, "my_custom_entry": 3})
    model = optkit.from_pretrained(directory)
    ids, mask = batch()
    defaults = model.generate(ids, attention_mask=mask)
    assert defaults.shape[1] == ids.shape[1] + 5
    explicit = model.generate(ids, attention_mask=mask, max_new_tokens=5, repetition_penalty=1.4,
                              no_repeat_ngram_size=2, generation_config=GenerationConfig())
    assert torch.equal(defaults, explicit)
    plain = model.generate(ids, attention_mask=mask, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert not torch.equal(plain, defaults)


@pytest.mark.parametrize("content, message", [
    ({"typical_p": 0.5}, r"typical_p=0.5: not implemented by optkit"),
    ({"top_kk": 5}, r"top_kk=5 \(did you mean 'top_k'\?\)"),
    ({"top_p": "0.9"}, r"top_p='0.9': must be in \(0, 1\]"),
    ([1, 2], r"expected a JSON object of settings, got list"),
])
def test_a_bad_file_is_one_checkpoint_error_naming_it(tmp_path, checkpoint, content, message):
    import shutil

    directory = with_file(shutil.copytree(checkpoint, tmp_path / "c"), content)
    with pytest.raises(CheckpointError, match=r"generation config '.*generation_config.json': " + message):
        optkit.from_pretrained(directory)


def test_sampling_settings_without_sampling_warn_on_load(tmp_path, checkpoint):
    import shutil

    directory = with_file(shutil.copytree(checkpoint, tmp_path / "c"), {"do_sample": False, "temperature": 0.6})
    with pytest.warns(UserWarning, match=r"temperature=0.6: only used when sampling, but do_sample is False"):
        optkit.from_pretrained(directory)


def test_save_pretrained_round_trips_the_explicit_settings(tmp_path, checkpoint):
    model = optkit.from_pretrained(checkpoint)
    model.generation_config = GenerationConfig(do_sample=True, top_p=0.9, max_new_tokens=12)
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert written == {"max_new_tokens": 12, "do_sample": True, "top_p": 0.9}
    assert optkit.from_pretrained(tmp_path / "saved").generation_config == model.generation_config


def test_a_save_without_settings_does_not_inherit_the_previous_models_file(tmp_path, checkpoint):
    """The old generation_config.json belongs to the old weights: a later save into the same folder drops it
    (other files there stay)."""
    model = optkit.from_pretrained(checkpoint)
    model.generation_config = GenerationConfig(repetition_penalty=1.4, max_new_tokens=12)
    target = tmp_path / "saved"
    model.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    model.generation_config = GenerationConfig()
    model.save_pretrained(target)
    assert not (target / "generation_config.json").exists()
    assert (target / "notes.txt").read_text() == "mine"
    assert optkit.from_pretrained(target).generation_config == GenerationConfig()
    model.generation_config = GenerationConfig(max_new_tokens=5)  # and a save with settings writes it again
    model.save_pretrained(target)
    assert json.loads((target / "generation_config.json").read_text()) == {"max_new_tokens": 5}


def test_model_generation_config_must_be_a_generation_config(checkpoint):
    model = optkit.from_pretrained(checkpoint)
    with pytest.raises(InputError, match=r"model.generation_config: expected an optkit.GenerationConfig, got dict"):
        model.generation_config = {"top_k": 5}


@settings(max_examples=25, deadline=None)
@given(explicit=st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(1, 30), "do_sample": st.booleans(), "top_k": st.integers(0, 60),
    "repetition_penalty": st.floats(0.5, 2.0), "no_repeat_ngram_size": st.integers(0, 4)}),
    base=st.fixed_dictionaries({}, optional={"max_new_tokens": st.integers(1, 30), "top_k": st.integers(0, 60),
                                             "repetition_penalty": st.floats(0.5, 2.0)}))
def test_a_passed_config_lays_only_its_explicit_settings_over_the_base(explicit, base):
    merged = GenerationConfig(**explicit).over(GenerationConfig(**base))
    assert merged == GenerationConfig(**{**base, **explicit})
    assert merged.explicit() == {**base, **explicit} or set(merged.explicit()) == set(base) | set(explicit)


def test_replace_keeps_unset_settings_unset():
    assert GenerationConfig(top_k=5).replace(top_p=0.5).explicit() == {"top_k": 5, "top_p": 0.5}


def test_pipeline_and_cli_follow_the_model_config(tmp_path, capsys):
    directory = make_text_model_dir(tmp_path / "m")
    with_file(directory, {"max_new_tokens": 4, "repetition_penalty": 1.3})
    pipe = optkit.pipeline(model=directory)
    text = pipe("Hello world")[0]["generated_text"]
    assert text == pipe("Hello world", max_new_tokens=4, repetition_penalty=1.3,
                        generation_config=GenerationConfig())[0]["generated_text"]
    assert main(["run", "--model", str(directory), "--prompt", "Hello world", "--no-stream"]) == 0
    assert capsys.readouterr().out == text + "\n"


@pytest.mark.parametrize("default", [5, 64])
def test_cli_default_length_without_a_config(tmp_path, capsys, monkeypatch, default):
    """64 new tokens (here: what fits in the text model's 64 positions after the prompt) unless told otherwise."""
    directory = make_text_model_dir(tmp_path / "m")
    monkeypatch.setattr(cli_run, "DEFAULT_MAX_NEW_TOKENS", default)
    pipe = optkit.pipeline(model=directory)
    room = 64 - len(pipe.tokenizer.encode("Hello world"))
    expected = pipe("Hello world", max_new_tokens=min(default, room))[0]["generated_text"]
    assert main(["run", "--model", str(directory), "--prompt", "Hello world", "--no-stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.skipif(not (default_model_dir() / "generation_config.json").is_file(), reason="no bundled config yet")
def test_bundled_model_ships_a_valid_generation_config():
    config = GenerationConfig.from_file(default_model_dir())
    assert config.explicit() and (config.repetition_penalty > 1 or config.no_repeat_ngram_size > 0)
    config.to_json()  # valid to save, as transformers checks


# -- optkit run: code blocks, the terminal hint ---------------------------------------------------------------
@pytest.mark.parametrize("continuation, block", [
    ("\n    return n\n\ndef other():\n    pass", "\n    return n"),
    ("\n    a = 1\n\n    b = 2\n\nclass X:", "\n    a = 1\n\n    b = 2"),  # an indented line after a blank continues
    ("\n    return n\n", "\n    return n\n"),
])
def test_code_block_ends_at_a_blank_line_then_an_unindented_one(continuation, block):
    assert cli_run.code_block(continuation) == block


@pytest.mark.parametrize("prompt, code", [("def fibonacci(n):", True), ("class Stack:\n    \"\"\"", True),
                                          ("import os", True), ("The meaning of life is", False)])
def test_code_prompts_are_recognised(prompt, code):
    assert cli_run.looks_like_code(prompt) is code


@settings(max_examples=30, deadline=None)
@given(pieces=st.lists(st.sampled_from(["\n", "\n\n", "    x = 1", "y", " ", "def g():", "\t"]), max_size=12))
def test_streamed_code_block_prints_what_the_final_text_prints(pieces):
    printed = []
    printer = cli_run.CodeBlockPrinter("def f():")
    import builtins

    real_print = builtins.print
    builtins.print = lambda text, end="\n", flush=False: printed.append(text + end)
    try:
        for piece in ["def f():", *pieces]:
            printer.on_text(piece, False)
        printer.on_text("", True)
    finally:
        builtins.print = real_print
    assert "".join(printed) == "def f():" + cli_run.code_block("".join(pieces)) + "\n"


def test_code_prompt_stops_generating_after_the_block(monkeypatch):
    """CodeBlockEnd ends a row once its new text has left the block."""
    class Tok:
        def __len__(self):
            return 10

        def batch_decode(self, rows, skip_special_tokens=True):
            return ["".join("\n" if i == 0 else "x" for i in row) for row in rows]

    stop = cli_run.CodeBlockEnd(Tok(), "def f():")
    scores = torch.zeros(2, 10)
    assert stop(torch.tensor([[5, 5, 1], [5, 5, 0]]), scores).tolist() == [False, False]
    assert stop(torch.tensor([[5, 5, 1, 0, 0, 1], [5, 5, 0, 0, 0, 0]]), scores).tolist() == [True, False]


class _Terminal:
    """A stdin that is a terminal holding one typed line."""

    def __init__(self, text: str):
        import io

        self.buffer = io.BytesIO(text.encode())
        self.closed = False

    def isatty(self) -> bool:
        return True


def test_a_terminal_without_prompt_gets_a_hint(tmp_path, capsys, monkeypatch):
    import sys

    directory = make_text_model_dir(tmp_path / "m")
    monkeypatch.setattr(sys, "stdin", _Terminal("Hello\n"))
    assert main(["run", "--model", str(directory), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "optkit: type prompts, one per line, then Ctrl-D" in err and "--prompt TEXT" in err


@pytest.mark.skipif(not (default_model_dir() / "generation_config.json").is_file(), reason="no bundled config yet")
@pytest.mark.parametrize("prompt", ["def fibonacci(n):", "The meaning of life is"])
def test_first_run_is_short_and_streams_what_it_prints_at_the_end(capsys, prompt):
    from optkit.tokenizer import Tokenizer

    assert main(["run", "--prompt", prompt]) == 0
    streamed = capsys.readouterr().out
    assert main(["run", "--prompt", prompt, "--no-stream"]) == 0
    assert capsys.readouterr().out == streamed
    tok = Tokenizer.from_pretrained(default_model_dir())
    new = streamed[len(prompt):].rstrip("\n")
    assert len(tok.encode(new, add_special_tokens=False)) <= cli_run.DEFAULT_MAX_NEW_TOKENS + 1
    if cli_run.looks_like_code(prompt):  # a code prompt stops at the end of its block; prose runs to the limit
        assert cli_run.code_block(new) == new
