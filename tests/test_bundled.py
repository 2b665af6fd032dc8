"""The bundled model's public handle ``"optkit-default"`` and the preset of its shape (issue 19 §5)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

import optkit
from optkit.bundled import BUNDLED_MODEL, bundled_directory, default_model_dir


def test_the_handle_loads_the_bundled_model_and_tokenizer_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = optkit.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    tokenizer = optkit.Tokenizer.from_pretrained(BUNDLED_MODEL)
    direct = optkit.from_pretrained(default_model_dir(), dtype=torch.float32)
    ids = torch.tensor([tokenizer("def fibonacci(n):")["input_ids"]])
    assert torch.equal(model(ids).logits, direct(ids).logits)


def test_a_local_directory_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bundled_directory(BUNDLED_MODEL) == default_model_dir()
    (tmp_path / BUNDLED_MODEL).mkdir()
    assert bundled_directory(BUNDLED_MODEL) is None
    assert bundled_directory("facebook/opt-125m") is None


def test_the_preset_has_the_bundled_models_shape():
    """``build("optkit-default")`` is the bundled model with random weights: same names, same shapes."""
    built = optkit.build(BUNDLED_MODEL, device="meta")
    loaded = optkit.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in loaded.state_dict().items()}


def test_training_the_preset_with_the_bundled_tokenizer(tmp_path):
    """The preset fits the bundled tokenizer, so ``optkit train --spec optkit-default`` works from scratch."""
    from optkit.training import train

    text = Path(os.__file__).read_text(encoding="utf-8")[:20_000]
    result = train(BUNDLED_MODEL, [text], out_dir=tmp_path / "out", steps=2, batch_size=2, seq_len=32,
                   warmup_steps=1, eval_every=2, log_every=1, stream=io.StringIO())
    assert result.step == 2 and len(result.losses) == 2
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_mismatched_preset_says_which_fits(tmp_path):
    from optkit.training import train

    with pytest.raises(optkit.InputError, match="vocabulary has 512 entries.*'optkit-default' fits"):
        train("opt-tiny", ["def f(x):\n    return x\n" * 50], out_dir=tmp_path / "out", steps=1, batch_size=1,
              seq_len=32, stream=io.StringIO())
