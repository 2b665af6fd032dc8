"""optkit.pipeline("text-generation"): transformers' output format, built on optkit's generate."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from tests.helpers import TEXT_MODEL_MAX_POSITIONS, make_text_model_dir

import optkit
import optkit.generation
from optkit.errors import CheckpointNotFoundError, InputError, OptkitError
from optkit.pipelines import pipeline
from optkit.tokenizer import Tokenizer

MAX_POSITIONS = TEXT_MODEL_MAX_POSITIONS
PIPELINE_MODULE = importlib.import_module("optkit.pipelines")  # optkit.pipeline may be the function


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_model_dir(tmp_path_factory.mktemp("text_model"))


@pytest.fixture(scope="module")
def pipe(model_dir: Path):
    return pipeline("text-generation", model=str(model_dir))


def test_string_gives_a_list_with_one_dict(pipe):
    out = pipe("Hello world", max_new_tokens=8)
    assert isinstance(out, list) and len(out) == 1
    assert set(out[0]) == {"generated_text"}
    assert out[0]["generated_text"].startswith("Hello world")
    assert len(out[0]["generated_text"]) > len("Hello world")


def test_list_gives_one_list_per_prompt(pipe):
    prompts = ["Hello world", "the quick brown fox jumps"]
    out = pipe(prompts, max_new_tokens=6, do_sample=True, num_return_sequences=3,
               generator=torch.Generator().manual_seed(0))
    assert len(out) == 2 and all(len(group) == 3 for group in out)
    for prompt, group in zip(prompts, out):
        assert all(item["generated_text"].startswith(prompt) for item in group)


def test_text_is_prompt_plus_decoded_new_tokens(pipe, model_dir):
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = optkit.from_pretrained(model_dir)
    batch = tokenizer(["Hello world"], padding=True, return_tensors="pt")
    ids = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=10)
    new_ids = [i for i in ids[0, batch["input_ids"].shape[1]:].tolist() if i < len(tokenizer)]  # 800 rows, 663 tokens
    new_text = tokenizer.decode(new_ids, skip_special_tokens=True)
    assert pipe("Hello world", max_new_tokens=10) == [{"generated_text": "Hello world" + new_text}]
    assert pipe("Hello world", max_new_tokens=10, return_full_text=False) == [{"generated_text": new_text}]


def test_batched_prompts_equal_prompts_alone(pipe):
    prompts = ["Hello", "the quick brown fox jumps over the lazy dog", "café naïve"]
    together = pipe(prompts, max_new_tokens=12)
    assert together == [pipe(p, max_new_tokens=12) for p in prompts]


def test_max_length_counts_the_prompt(pipe, monkeypatch):
    shapes = []
    real = optkit.generation.generate

    def spy(model, input_ids, **kwargs):
        out = real(model, input_ids, **kwargs)
        shapes.append((input_ids.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(optkit.generation, "generate", spy)
    pipe("Hello world", max_length=9, eos_token_id=[])
    pipe("Hello world", eos_token_id=[])  # no length: as many as the model's positions allow (<= 256)
    assert shapes[0][1] == 9
    assert shapes[1][1] == MAX_POSITIONS


def test_model_instance_and_tokenizer_instance(model_dir, pipe):
    model = optkit.from_pretrained(model_dir)
    own = pipeline("text-generation", model=model, tokenizer=Tokenizer.from_pretrained(model_dir))
    assert own.model is model
    assert own("Hello world", max_new_tokens=5) == pipe("Hello world", max_new_tokens=5)


def test_sdpa_does_not_change_text(model_dir, pipe):
    sdpa = pipeline("text-generation", model=model_dir, attention="sdpa", dtype="float32")
    assert sdpa.model.attention_backend == "sdpa"
    assert sdpa("Hello world", max_new_tokens=8) == pipe("Hello world", max_new_tokens=8)


def test_model_instance_needs_a_tokenizer(model_dir):
    with pytest.raises(InputError, match="needs tokenizer="):
        pipeline("text-generation", model=optkit.from_pretrained(model_dir))


def test_unknown_task_lists_supported_tasks(model_dir):
    with pytest.raises(InputError, match=r"unknown task 'summarization'; supported tasks: text-generation"):
        pipeline("summarization", model=model_dir)


def test_bad_dtype(model_dir):
    with pytest.raises(InputError, match="dtype='float99' is not a torch dtype"):
        pipeline("text-generation", model=model_dir, dtype="float99")


def test_directory_without_tokenizer_is_an_optkit_error(tmp_path, model_dir):
    model = optkit.from_pretrained(model_dir)
    model.save_pretrained(tmp_path)  # weights only
    with pytest.raises(CheckpointNotFoundError, match="No tokenizer files"):
        pipeline("text-generation", model=tmp_path)


def test_missing_bundled_model_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(PIPELINE_MODULE, "default_model_dir", lambda: tmp_path)
    with pytest.raises(OptkitError, match="bundled default model is not available yet"):
        pipeline("text-generation")


def test_bundled_model_location():
    assert PIPELINE_MODULE.default_model_dir() == Path(optkit.__file__).parent / "default_model"


@pytest.mark.skipif(not (PIPELINE_MODULE.default_model_dir() / "config.json").is_file(),
                    reason="the bundled default model is not there yet")
def test_bundled_model_generates():
    out = pipeline("text-generation")("Hello", max_new_tokens=3)
    assert out[0]["generated_text"].startswith("Hello")


def test_optkit_pipeline_is_callable_even_after_importing_the_module(model_dir, pipe):
    import optkit.pipelines  # noqa: F401 - the implementation module never shadows the function

    assert optkit.pipeline("text-generation", model=model_dir)("Hi", max_new_tokens=4) == pipe("Hi", max_new_tokens=4)
