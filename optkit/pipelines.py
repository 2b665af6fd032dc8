"""``pipeline("text-generation")``: text in, text out, shaped like transformers' pipeline.

Without a model it runs the small model bundled in ``optkit/default_model``.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any

import torch

from optkit.errors import CheckpointNotFoundError, InputError

SUPPORTED_TASKS = ("text-generation",)
DEFAULT_MAX_NEW_TOKENS = 256  # transformers' text-generation pipeline default, capped to the model's positions


def default_model_dir() -> Path:
    """Where the bundled default model (weights + tokenizer files) lives."""
    return Path(str(importlib.resources.files("optkit") / "default_model"))


def _bundled_model() -> Path:
    directory = default_model_dir()
    if not (directory / "config.json").is_file():
        raise CheckpointNotFoundError(
            f"the bundled default model is not available yet ({directory} has no config.json); "
            "pass model=<checkpoint directory or hub id> (on the command line: --model)")
    return directory


def _dtype(value: torch.dtype | str | None) -> torch.dtype | str | None:
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"dtype={value!r} is not a torch dtype; use float32, float16, bfloat16 or auto")
    return dtype


def _load_tokenizer(source: Any) -> Any:
    from optkit.tokenizer import Tokenizer, TokenizerNotFoundError

    if not isinstance(source, (str, os.PathLike)):
        return source  # an already-built tokenizer
    try:
        return Tokenizer.from_pretrained(source)
    except TokenizerNotFoundError as exc:
        raise CheckpointNotFoundError(str(exc)) from None


def _load_model(source: Any, dtype: Any, device: Any, attention: str | None, linear: str | None = None) -> Any:
    from optkit.builder import set_backend
    from optkit.loading import from_pretrained
    from optkit.model import Model

    if not isinstance(source, Model):
        return from_pretrained(source, attention=attention, linear=linear, dtype=_dtype(dtype), device=device)
    dtype = None if dtype == "auto" else _dtype(dtype)  # a loaded model has no checkpoint dtype to follow
    if dtype is not None or device is not None:
        source = source.to(device=device, dtype=dtype)
    return set_backend(source, attention=attention, **({"linear": linear} if linear else {}))


class TextGenerationPipeline:
    """Prompt(s) -> ``[{"generated_text": ...}]`` per prompt; batches are left-padded and run together."""

    task = "text-generation"

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer

    def __call__(self, text_inputs: str | list[str], max_length: int | None = None,
                 max_new_tokens: int | None = None, num_return_sequences: int = 1, do_sample: bool = False,
                 return_full_text: bool = True, **generate_kwargs: Any) -> list[Any]:
        """Generate for one text (a list of dicts) or a list of texts (a list of such lists).

        Other keywords (``temperature``, ``top_k``, ``top_p``, ``num_beams``, ``generator``,
        ``streamer``...) go to ``optkit.generation.generate``. Without lengths, up to 256 new tokens
        (as transformers), fewer when the model has fewer positions.
        """
        single = isinstance(text_inputs, str)
        texts = [text_inputs] if single else list(text_inputs)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text-generation pipeline: pass a string or a non-empty list of strings")
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if max_length is None and max_new_tokens is None:
            room = self.model.spec.decoder.max_positions - ids.shape[1]
            max_new_tokens = max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
        output = self.model.generate(ids, attention_mask=mask, max_length=max_length, max_new_tokens=max_new_tokens,
                                     num_return_sequences=num_return_sequences, do_sample=do_sample,
                                     **generate_kwargs)
        new_texts = self.tokenizer.batch_decode(output[:, ids.shape[1]:], skip_special_tokens=True)
        results = [[{"generated_text": (prompt if return_full_text else "") + new}
                    for new in new_texts[i * num_return_sequences:(i + 1) * num_return_sequences]]
                   for i, prompt in enumerate(texts)]
        return results[0] if single else results


def pipeline(task: str, model: Any = None, tokenizer: Any = None, dtype: torch.dtype | str | None = None,
             device: torch.device | str | None = None, attention: str | None = None,
             linear: str | None = None) -> TextGenerationPipeline:
    """A ready-to-call pipeline. ``model``: checkpoint directory, hub id, optkit Model, or None (bundled).

    ``tokenizer`` defaults to the one stored with the model; pass it when ``model`` is a Model.
    """
    if task not in SUPPORTED_TASKS:
        raise InputError(f"unknown task {task!r}; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    source = _bundled_model() if model is None else model
    from optkit.model import Model

    if tokenizer is None and isinstance(source, Model):
        raise InputError("pipeline(model=<Model>) needs tokenizer=<directory or optkit Tokenizer>: a loaded model "
                         "does not know where its tokenizer files are")
    loaded_tokenizer = _load_tokenizer(source if tokenizer is None else tokenizer)  # cheap: fail fast
    return TextGenerationPipeline(_load_model(source, dtype, device, attention, linear), loaded_tokenizer)
