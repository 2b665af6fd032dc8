"""``pipeline("text-generation")``: text in, text out, shaped like transformers' pipeline.

Without a model it runs the small model bundled in ``optkit/default_model``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from optkit.bundled import default_model_dir
from optkit.errors import CheckpointNotFoundError, InputError
from optkit.generation import check, config_for
from optkit.generation_config import GenerationConfig, ignored_sampling_settings, resolve
from optkit.streaming import notify_failure

SUPPORTED_TASKS = ("text-generation",)
RUN_ARGS = ("generator", "streamer", "stop_strings", "stopping_criteria")  # generate's per-call objects, not settings
DEFAULT_MAX_NEW_TOKENS = 256  # transformers' text-generation pipeline default, capped to the model's positions


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


def _known_ids(ids: torch.Tensor, tokenizer: Any) -> list[list[int]]:
    """Rows without the ids the tokenizer has no token for: OPT's embedding has a few more rows than its
    vocabulary (50272 vs 50265), a model may emit one, and it has no text (transformers drops it too)."""
    size = len(tokenizer)
    return [[i for i in row if i < size] for row in ids.tolist()]


class TextGenerationPipeline:
    """Prompt(s) -> ``[{"generated_text": ...}]`` per prompt; batches are left-padded and run together."""

    task = "text-generation"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = _checked_batch_size(batch_size)

    def __call__(self, text_inputs: str | list[str], return_full_text: bool = True,
                 generation_config: GenerationConfig | None = None, batch_size: int | None = None,
                 **generate_kwargs: Any) -> list[Any]:
        """Generate for one text (a list of dicts) or a list of texts (a list of such lists).

        ``generation_config`` and the keywords (``max_new_tokens``, ``do_sample``, ``temperature``,
        ``num_return_sequences`` ..., ``generator``, ``streamer``, ``stop_strings``) go to
        ``optkit.generation.generate``, over the model's ``generation_config``. Without lengths there either,
        up to 256 new tokens (as transformers), fewer when the model has fewer positions. ``batch_size``
        (default: the pipeline's, else every text at once) is how many texts run together, left-padded;
        the texts come out the same either way. If it raises, a ``streamer`` with ``fail`` gets the error
        (see ``optkit.generation.generate``), so a consumer in another thread does not wait forever.
        """
        try:
            return self._call(text_inputs, return_full_text, generation_config, batch_size, generate_kwargs)
        except BaseException as error:
            notify_failure(generate_kwargs.get("streamer"), error)
            raise

    def _call(self, text_inputs: str | list[str], return_full_text: bool, generation_config: GenerationConfig | None,
              batch_size: int | None, generate_kwargs: dict[str, Any]) -> list[Any]:
        texts = _texts(text_inputs)
        _warn_ignored(config_for(self.model, generation_config), generate_kwargs)
        size = _checked_batch_size(batch_size) or self.batch_size or len(texts)
        results = []
        for start in range(0, len(texts), size):
            results += self._generate(texts[start:start + size], return_full_text, generation_config, generate_kwargs)
        return results[0] if isinstance(text_inputs, str) else results

    def _generate(self, texts: list[str], return_full_text: bool, generation_config: GenerationConfig | None,
                  generate_kwargs: dict[str, Any]) -> list[list[dict[str, str]]]:
        texts, ids, mask, cfg, run_args = self._prepare(texts, generation_config, generate_kwargs)
        output = self.model.generate(ids, attention_mask=mask, generation_config=cfg, **run_args)
        new_texts = self.tokenizer.batch_decode(_known_ids(output[:, ids.shape[1]:], self.tokenizer),
                                                skip_special_tokens=True)
        n = cfg.num_return_sequences
        return [[{"generated_text": (prompt if return_full_text else "") + new}
                 for new in new_texts[i * n:(i + 1) * n]] for i, prompt in enumerate(texts)]

    def check(self, text_inputs: str | list[str], generation_config: GenerationConfig | None = None,
              **generate_kwargs: Any) -> None:
        """Raise the InputError a call with these arguments would raise, without generating (e.g. to
        check every prompt before printing any)."""
        _, ids, mask, cfg, run_args = self._prepare(text_inputs, generation_config, generate_kwargs)
        check(self.model, ids, attention_mask=mask, generation_config=cfg, **run_args)

    def _prepare(self, text_inputs: Any, generation_config: GenerationConfig | None,
                 generate_kwargs: dict[str, Any]) -> tuple[list[str], torch.Tensor, torch.Tensor, GenerationConfig,
                                                           dict[str, Any]]:
        """Texts, their left-padded ids and mask, the resolved config (default length filled in) and the
        per-call objects (generator, streamer)."""
        texts = _texts(text_inputs)
        settings = dict(generate_kwargs)
        run_args = {k: settings.pop(k) for k in RUN_ARGS if k in settings}
        if "stop_strings" in run_args:
            run_args["tokenizer"] = self.tokenizer
        cfg = resolve(config_for(self.model, generation_config), settings, "pipeline()")
        batch = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if cfg.max_length is None and cfg.max_new_tokens is None:
            room = self.model.spec.decoder.max_positions - ids.shape[1]
            cfg = cfg.replace(max_new_tokens=max(1, min(DEFAULT_MAX_NEW_TOKENS, room)))
        return list(texts), ids, mask, cfg, run_args


def _warn_ignored(own: GenerationConfig, generate_kwargs: dict[str, Any]) -> None:
    """As ``generate`` (and transformers' pipeline): a sampling-only keyword in a greedy call is a warning."""
    settings = {k: v for k, v in generate_kwargs.items() if k not in RUN_ARGS}
    ignored = ignored_sampling_settings(resolve(own, settings, "pipeline()"), settings)
    if ignored:
        warnings.warn(f"pipeline(): {', '.join(ignored)}: only used when sampling, and do_sample is False, so greedy "
                      "decoding ignores them; pass do_sample=True or drop them", UserWarning, stacklevel=4)


def _texts(text_inputs: Any) -> list[str]:
    texts = [text_inputs] if isinstance(text_inputs, str) else text_inputs
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise InputError("text-generation pipeline: pass a string or a non-empty list of strings, "
                         f"got {type(text_inputs).__name__}")
    return list(texts)


def _checked_batch_size(batch_size: Any) -> int | None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise InputError(f"batch_size={repr(batch_size)[:40]}: must be a positive integer (texts generated together) "
                         "or None (all at once)")
    return batch_size


def _device(device: Any) -> Any:
    """transformers' integer devices: -1 is the CPU, n >= 0 is cuda:n; a name is checked here (torch's own
    complaint lists every device type it knows), and meta, which holds no weights, is refused."""
    if isinstance(device, int) and not isinstance(device, bool):
        if device < -1:
            raise InputError(f"device={device}: use -1 (CPU), a CUDA index >= 0, or a name such as 'cpu' or 'cuda:0'")
        return "cpu" if device == -1 else f"cuda:{device}"
    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device={repr(device)[:80]}: not a device; use 'cpu', 'cuda', 'cuda:1' ..., or a CUDA "
                         "index (-1: the CPU)") from None
    if kind == "meta":
        raise InputError("device='meta' holds shapes without weights, so a pipeline cannot generate there; "
                         "use 'cpu' or 'cuda'")
    return device


def pipeline(task: str | None = None, model: Any = None, tokenizer: Any = None,
             dtype: torch.dtype | str | None = None, device: torch.device | str | int | None = None,
             attention: str | None = None, linear: str | None = None, torch_dtype: torch.dtype | str | None = None,
             batch_size: int | None = None) -> TextGenerationPipeline:
    """A ready-to-call pipeline. ``model``: checkpoint directory, hub id, optkit Model, or None (bundled).

    ``tokenizer`` defaults to the one stored with the model; pass it when ``model`` is a Model.
    As in transformers: ``task`` may be left out when ``model`` is given (optkit's models generate text),
    ``torch_dtype`` is ``dtype``, ``device=-1`` is the CPU and ``n`` is ``cuda:n``, and ``batch_size`` is
    how many texts each generate call takes.
    """
    if task is None and model is None:
        raise InputError("pipeline(): pass a task ('text-generation') or a model to infer it from")
    if torch_dtype is not None and dtype is not None:
        raise InputError("pass dtype or torch_dtype (transformers' name for it), not both")
    dtype, device, task = torch_dtype if dtype is None else dtype, _device(device), task or "text-generation"
    if task not in SUPPORTED_TASKS:
        raise InputError(f"unknown task {task!r}; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    source = _bundled_model() if model is None else model
    from optkit.model import Model

    if tokenizer is None and isinstance(source, Model):
        raise InputError("pipeline(model=<Model>) needs tokenizer=<directory or optkit Tokenizer>: a loaded model "
                         "does not know where its tokenizer files are")
    loaded_tokenizer = _load_tokenizer(source if tokenizer is None else tokenizer)  # cheap: fail fast
    return TextGenerationPipeline(_load_model(source, dtype, device, attention, linear), loaded_tokenizer,
                                  _checked_batch_size(batch_size))
