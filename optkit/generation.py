"""Text generation over the KV cache: greedy, sampling and beam search, like transformers' ``generate``.

The prompt is run once (prefill), then one token per step with ``logits_to_keep=1``. Semantics follow
transformers 5.x so its ``generate`` can serve as the oracle: the default length (20 new tokens, fewer
when the model's positions run out), the default ``top_k=50`` when sampling, EOS handling (finished rows
are padded with ``pad_token_id``), the logits processors and their order, and beam search with
``length_penalty`` / ``early_stopping``.

The settings are one :class:`optkit.GenerationConfig` (``generation_config.py``: types and ranges);
keywords replace its fields, as in transformers. Per-call state stays in the call: ``generate`` never
changes the model and may run in several threads on one model.

Deliberate differences:

* every bad argument is one ``InputError`` raised before any compute (transformers warns about some and
  fails later, or deep inside the model, on others, e.g. a prompt + max_new_tokens beyond the positions),
  a right-padded mask included (transformers warns and continues each row after its padding);
* ``no_repeat_ngram_size`` ignores left padding, as the repetition penalty does in transformers, so a
  left-padded row behaves exactly as it does alone (transformers counts n-grams over pad tokens too).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from optkit.inference.decode_graph import unsupported_reason
from optkit.inference.session import session_for
from optkit.errors import InputError
from optkit.generation_config import GenerationConfig, ignored_sampling_settings, resolve
from optkit.outputs import GenerateOutput
from optkit.streaming import notify_failure

if TYPE_CHECKING:
    from optkit.inference.decode_graph import DecodeStep
    from optkit.interfaces import KVCache
    from optkit.model import Model

DEFAULT_MAX_NEW_TOKENS = 20  # transformers 5.x without max_length/max_new_tokens: 20 new, within the positions
DEFAULT_TOP_K = 50  # transformers' default when sampling and top_k is unset
NEG_LARGE = -1.0e9  # transformers' "impossible" beam score; kept so beam rankings match bit for bit

LogitsProcessor = Callable[[Tensor, Tensor], Tensor]
"""(token ids so far (rows, length), next-token scores (rows, vocab)) -> processed scores."""
StoppingCriterion = Callable[[Tensor, Tensor], Tensor]
"""(ids including the new token (rows, length), that step's scores) -> (rows,) bool: the row is done
(transformers' StoppingCriteria call; a row that is done is padded from then on, as after EOS)."""


class Streamer(Protocol):
    def put(self, value: Tensor) -> None: ...

    def end(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    """Validated generation arguments, lengths resolved."""

    max_length: int  # prompt + new tokens
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int  # 0: off
    top_p: float | None
    repetition_penalty: float
    no_repeat_ngram_size: int
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    cache_implementation: str | None = "static"  # preallocated, written in place: no copy per step
    decode_graph: bool = False  # decode through optkit.decode_graph (a captured CUDA graph on CUDA)
    compile: bool = False  # ... with that step compiled by torch.compile
    output_scores: bool = False  # keep each step's processed scores (return_dict_in_generate)
    output_logits: bool = False  # keep each step's raw logits (return_dict_in_generate)
    return_dict: bool = False  # return a GenerateOutput instead of the ids


@dataclass
class _Trace:
    """What generate records per step when asked (transformers' output_scores / output_logits)."""

    scores: list[Tensor] = dataclasses.field(default_factory=list)
    logits: list[Tensor] = dataclasses.field(default_factory=list)

    def record(self, scores: Tensor | None, logits: Tensor | None) -> None:
        """Copies: a captured decode step overwrites its logits buffer in the next step."""
        if scores is not None:
            self.scores.append(scores.clone())
        if logits is not None:
            self.logits.append(logits.clone())


class StopStrings:
    """Ends a row once its text ends in a stop string, the last token holding at least the string's last
    character (transformers' StopStringCriteria: a string wholly inside earlier tokens never stops a row).

    Tokens are decoded one at a time, as transformers matches them (an id without a token, beyond the
    tokenizer's vocabulary, breaks a match); only the tail that can still hold a stop string is kept per row.
    """

    def __init__(self, stop_strings: Sequence[str], tokenizer: Any, prompts: Tensor):
        self.stop_strings = tuple(stop_strings)
        self.tokenizer = tokenizer
        self.keep = max(len(text) for text in self.stop_strings)
        self.tails = ["".join(self._text(i) for i in row[-self.keep:]) for row in prompts.tolist()]

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if 0 <= token < len(self.tokenizer) else ""

    def __call__(self, ids: Tensor, scores: Tensor) -> Tensor:
        """Per row: does the token just appended complete a stop string?"""
        done = []
        for row, token in enumerate(ids[:, -1].tolist()):
            piece = self._text(token)
            text = self.tails[row] + piece
            start = len(text) - len(piece)
            done.append(bool(piece) and any(stop in text[max(0, start - len(stop) + 1):] for stop in self.stop_strings))
            self.tails[row] = text[-(self.keep + len(piece)):] if piece else ""  # a textless id breaks a match
        return torch.tensor(done, dtype=torch.bool, device=ids.device)


# -- logits processors: small functions, composed in transformers' order -------------------------
def repetition_penalty(penalty: float, prompt_start: Tensor) -> LogitsProcessor:
    """Rescale tokens already in the row (CTRL; > 1 discourages repeats); left padding is ignored."""

    def process(ids: Tensor, scores: Tensor) -> Tensor:
        vocab = scores.shape[-1]
        positions = torch.arange(ids.shape[1], device=ids.device)
        seen_ids = ids.masked_fill(positions[None, :] < prompt_start[:, None], vocab)  # pads -> a spare column
        seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        seen.scatter_(1, seen_ids, True)
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(seen[:, :vocab], penalised, scores)

    return process


def no_repeat_ngram(size: int, prompt_start: Tensor) -> LogitsProcessor:
    """Ban every token that would repeat an n-gram already in the row (left padding ignored)."""

    def process(ids: Tensor, scores: Tensor) -> Tensor:
        banned = torch.zeros_like(scores, dtype=torch.bool)
        for row, (tokens, start) in enumerate(zip(ids.tolist(), prompt_start.tolist())):
            tokens = tokens[start:]
            if len(tokens) < size:
                continue
            prefix = tuple(tokens[len(tokens) - size + 1:])
            for i in range(len(tokens) - size + 1):
                if tuple(tokens[i:i + size - 1]) == prefix:
                    banned[row, tokens[i + size - 1]] = True
        return scores.masked_fill(banned, -float("inf"))

    return process


def suppress_eos(min_new_tokens: int, prompt_length: int, eos_token_ids: Sequence[int]) -> LogitsProcessor:
    """Forbid EOS until ``min_new_tokens`` tokens have been generated."""

    def process(ids: Tensor, scores: Tensor) -> Tensor:
        if ids.shape[1] - prompt_length >= min_new_tokens:
            return scores
        scores = scores.clone()
        scores[:, list(eos_token_ids)] = -float("inf")
        return scores

    return process


def temperature_scaling(temperature: float) -> LogitsProcessor:
    """Sharpen (< 1) or flatten (> 1) the distribution."""
    return lambda ids, scores: scores / temperature


def top_k_filter(top_k: int, min_keep: int = 1) -> LogitsProcessor:
    """Keep the ``top_k`` highest scores (ties with the k-th kept too)."""

    def process(ids: Tensor, scores: Tensor) -> Tensor:
        k = min(max(top_k, min_keep), scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]
        return scores.masked_fill(scores < kth, -float("inf"))

    return process


def top_p_filter(top_p: float, min_keep: int = 1) -> LogitsProcessor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus)."""

    def process(ids: Tensor, scores: Tensor) -> Tensor:
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -min_keep:] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        return scores.masked_fill(drop, -float("inf"))

    return process


def build_processors(s: Settings, prompt_length: int, prompt_start: Tensor) -> list[LogitsProcessor]:
    """The processors these settings ask for, in the order transformers applies them."""
    processors: list[LogitsProcessor] = []
    if s.repetition_penalty != 1.0:
        processors.append(repetition_penalty(s.repetition_penalty, prompt_start))
    if s.no_repeat_ngram_size > 0:
        processors.append(no_repeat_ngram(s.no_repeat_ngram_size, prompt_start))
    if s.min_new_tokens > 0 and s.eos_token_ids:
        processors.append(suppress_eos(s.min_new_tokens, prompt_length, s.eos_token_ids))
    if s.do_sample:  # the "warpers": sampling only
        min_keep = max(2, len(s.eos_token_ids) + 1) if s.num_beams > 1 else 1  # beams keep a non-EOS option
        if s.temperature != 1.0:
            processors.append(temperature_scaling(s.temperature))
        if s.top_k:
            processors.append(top_k_filter(s.top_k, min_keep))
        if s.top_p is not None and s.top_p < 1.0:
            processors.append(top_p_filter(s.top_p, min_keep))
    return processors


def apply_processors(processors: Sequence[LogitsProcessor], ids: Tensor, scores: Tensor) -> Tensor:
    for process in processors:
        scores = process(ids, scores)
    return scores


# -- argument checks ------------------------------------------------------------------------------
# The types and ranges of single settings are GenerationConfig's; here: what depends on the model,
# the inputs, or several settings together.
def _as_id_tuple(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(value)


def _total_length(prompt_length: int, max_new_tokens: int | None, max_length: int | None, max_positions: int) -> int:
    """Prompt + new tokens: max_new_tokens wins, then max_length; by default 20 new tokens within the positions."""
    if max_new_tokens is not None:
        return prompt_length + max_new_tokens
    if max_length is not None:
        return max_length
    return min(prompt_length + DEFAULT_MAX_NEW_TOKENS, max_positions)


def _length_problems(prompt_length: int, max_new_tokens: int | None, max_length: int | None,
                     max_positions: int) -> list[str]:
    if prompt_length >= max_positions:
        return [f"the prompt has {prompt_length} tokens but the model has only {max_positions} positions "
                "(no room for new tokens); shorten the prompt"]
    total = _total_length(prompt_length, max_new_tokens, max_length, max_positions)
    if total <= prompt_length:
        return [f"max_length={max_length} counts the prompt, which already has {prompt_length} tokens; pass "
                f"max_new_tokens=N instead (or max_length > {prompt_length})"]
    if total > max_positions:
        asked = f"max_new_tokens={max_new_tokens}" if max_new_tokens is not None else f"max_length={total}"
        return [f"prompt ({prompt_length} tokens) + new tokens = {total} exceeds the model's {max_positions} "
                f"positions ({asked}); use max_new_tokens <= {max_positions - prompt_length}"]
    return []


def _call_problems(cfg: GenerationConfig, batch_size: int, streamer: Any, generator: Any,
                     device: torch.device) -> list[str]:
    problems = []
    temperature = 1.0 if cfg.temperature is None else cfg.temperature
    if cfg.do_sample and temperature <= 0:
        problems.append(f"temperature={temperature!r}: must be > 0 when sampling (use do_sample=False for greedy)")
    if cfg.num_beams > 1 and cfg.num_return_sequences > cfg.num_beams:
        problems.append(f"num_return_sequences={cfg.num_return_sequences} > num_beams={cfg.num_beams}: beam search "
                        f"returns at most num_beams sequences; raise num_beams or lower num_return_sequences")
    elif cfg.num_beams == 1 and not cfg.do_sample and cfg.num_return_sequences > 1:
        problems.append(f"num_return_sequences={cfg.num_return_sequences} with greedy search would repeat one "
                        "sequence; pass do_sample=True or num_beams >= num_return_sequences")
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        problems.append(f"streamer: expected an object with put(ids) and end() (e.g. optkit.streaming.TextStreamer), "
                        f"got {type(streamer).__name__}")
    if streamer is not None and (batch_size != 1 or cfg.num_beams != 1 or cfg.num_return_sequences != 1):
        problems.append("streamer: streaming needs one sequence (batch size 1, num_beams=1, "
                        "num_return_sequences=1); drop the streamer or generate one prompt at a time")
    if generator is not None and not isinstance(generator, torch.Generator):
        problems.append(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    elif generator is not None and generator.device.type != device.type:
        problems.append(f"generator: on {generator.device} but the model is on {device}; "
                        f"use torch.Generator(device='{device}').manual_seed(...)")
    return problems


def _token_problems(eos: tuple[int, ...], pad: int | None, vocab_size: int) -> list[str]:
    problems = []
    for name, ids in (("eos_token_id", eos), ("pad_token_id", () if pad is None else (pad,))):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            problems.append(f"{name}={bad[0]}: outside the vocabulary (0..{vocab_size - 1})")
    return problems


def _ids_problems(input_ids: Any, vocab_size: int) -> list[str]:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        shape = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, Tensor)
                 else type(input_ids).__name__)
        return [f"input_ids: expected an integer tensor of shape (batch, length), got {shape}; "
                "wrap a single prompt as ids[None]"]
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        return [f"input_ids: empty batch or prompt {tuple(input_ids.shape)}; pass at least one token per row"]
    if input_ids.device.type == "meta":
        return ["input_ids: on the meta device (a shape without values); pass the token ids as a real tensor"]
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        return [f"input_ids: token id {low if low < 0 else high} is outside the vocabulary "
                f"(0..{vocab_size - 1}); was the text encoded with another tokenizer?"]
    return []


def _not_left_padded_row(mask: Tensor) -> int | None:
    """The first row of a bool mask that is not zeros then ones up to the end (None: every row is)."""
    bad = ((mask[:, 1:] < mask[:, :-1]).any(dim=1) | ~mask[:, -1]).nonzero()
    return int(bad[0]) if len(bad) else None


def _short_row(row: Tensor, limit: int = 24) -> str:
    values = row.int().tolist()
    return str(values) if len(values) <= limit else f"{values[:limit // 2]} ... {values[-limit // 2:]}"


def _mask_problems(attention_mask: Any, input_ids: Tensor) -> list[str]:
    """The mask must be a 0/1 tensor shaped like the ids, padded on the left: new tokens are appended on
    the right, so a right-padded row would continue after its padding and get other tokens than alone."""
    if attention_mask is None:
        return []
    if not isinstance(attention_mask, Tensor):
        return [f"attention_mask: expected a tensor of 0/1 shaped like input_ids, got {type(attention_mask).__name__}; "
                "use the tokenizer's mask with return_tensors='pt' (or torch.tensor(mask))"]
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        return [f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids "
                f"{tuple(input_ids.shape)}; pass the tokenizer's mask for the same batch"]
    if attention_mask.device.type == "meta":
        return ["attention_mask: on the meta device (a shape without values); pass the mask as a real tensor"]
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
        value = odd[0].item() if len(odd) else attention_mask.dtype
        return [f"attention_mask: contains {value!r}; only 0 (padding) and 1 (token) are allowed"]
    mask = attention_mask.bool()
    row = _not_left_padded_row(mask)
    if row is not None and not bool(mask[row].any()):
        return [f"attention_mask: row {row} is all 0 (no tokens); drop it from the batch"]
    if row is not None:
        return [f"attention_mask: row {row} is not left-padded ({_short_row(mask[row])}); generate appends new "
                "tokens on the right, so pad on the left (optkit's Tokenizer does by default)"]
    return []


def _length_penalty_problems(length_penalty: float, max_new_tokens: int) -> list[str]:
    """Beam scores are divided by ``new_tokens ** length_penalty`` (a Python float, as in transformers, which
    fails there with an OverflowError): refuse a penalty for which that power overflows."""
    try:
        float(max_new_tokens) ** length_penalty
    except OverflowError:
        bound = 709.0 / math.log(max_new_tokens)  # exp(709) is about the largest float
        return [f"length_penalty={length_penalty!r}: beam scores are divided by new_tokens ** length_penalty, which "
                f"overflows with up to {max_new_tokens} new tokens; use length_penalty <= {bound:.0f}"]
    return []


def _stop_criteria_problems(stopping_criteria: Any) -> list[str]:
    """transformers' ``stopping_criteria``: a list of callables ``(ids, scores) -> (rows,) bool``."""
    if isinstance(stopping_criteria, (str, bytes, dict)) or not isinstance(stopping_criteria, (list, tuple)):
        return [f"stopping_criteria: expected a list of callables (ids, scores) -> bool tensor, got "
                f"{type(stopping_criteria).__name__}; wrap a single criterion in a list"]
    bad = [i for i, criterion in enumerate(stopping_criteria) if not callable(criterion)]
    if bad:
        return [f"stopping_criteria[{bad[0]}]: expected a callable (ids, scores) -> bool tensor, got "
                f"{type(stopping_criteria[bad[0]]).__name__}"]
    return []


def _stop_flags(result: Any, index: int, rows: int, device: torch.device) -> Tensor:
    """A criterion's answer as a (rows,) bool tensor: a bool, or a tensor of one value or one per row, as
    transformers accepts (it ORs the answer into its own (rows,) flags); anything else is an InputError."""
    if isinstance(result, bool):
        return torch.full((rows,), result, dtype=torch.bool, device=device)
    if isinstance(result, Tensor) and result.dim() <= 1 and result.numel() in (1, rows) and (
            result.dtype == torch.bool or not (result.is_floating_point() or result.is_complex())):
        return result.to(device=device, dtype=torch.bool).expand(rows)
    got = (f"a {result.dtype} tensor of shape {tuple(result.shape)}" if isinstance(result, Tensor)
           else type(result).__name__)
    raise InputError(f"stopping_criteria[{index}] returned {got}; a criterion returns a bool tensor of shape "
                     f"({rows},) (one flag per row, True: the row is done) or a single bool")


def _raise(problems: list[str]) -> None:
    if problems:
        raise InputError(problems[0] if len(problems) == 1 else "bad generate() arguments: " + "; ".join(problems))


# -- the two decoding loops -----------------------------------------------------------------------
def _forward_last(model: Model, ids: Tensor, mask: Tensor | None, cache: KVCache) -> Tensor:
    """Next-token logits (rows, vocab) in fp32, appending ``ids`` to the cache.

    ``mask`` is None when nothing is padded: positions are then just the cache length, with no
    per-step mask work and no host synchronisation.
    """
    out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1,
                check_inputs=False)  # generate checked the prompt; new ids come from the vocabulary
    return out.logits[:, -1].float()


def _pick(scores: Tensor, s: Settings, generator: torch.Generator | None) -> Tensor:
    if not s.do_sample:
        return scores.argmax(dim=-1)
    return _draw(scores.softmax(dim=-1), 1, generator, s).squeeze(1)


def _draw(probs: Tensor, num_samples: int, generator: torch.Generator | None, s: Settings) -> Tensor:
    """``torch.multinomial``, whose refusal of a distribution holding inf / nan (the scores overflowed float32;
    transformers fails the same way) becomes an InputError naming the settings that scale the scores."""
    try:
        return torch.multinomial(probs, num_samples=num_samples, generator=generator)
    except RuntimeError as exc:
        if "probability tensor contains" not in str(exc):
            raise
        raise InputError(f"sampling: the next-token probabilities hold inf or nan: temperature={s.temperature!r} or "
                         f"repetition_penalty={s.repetition_penalty!r} scaled the scores beyond float32's range (or "
                         "the model's logits overflowed); use a temperature >= 1e-4, a repetition_penalty closer to "
                         "1, or do_sample=False for greedy decoding") from None


class _StopCheck:
    """Has every row produced EOS? On CUDA the answer is copied to the host while the next step is
    already queued, so the GPU never idles while Python waits for it (one discarded step at the end);
    elsewhere it is read at once."""

    def __init__(self, unfinished: Tensor):
        self.deferred = unfinished.device.type == "cuda"
        if self.deferred:
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(unfinished.any(), non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._any_left = bool(unfinished.any())

    def all_finished(self) -> bool:
        if self.deferred:
            self._ready.synchronize()
            return not bool(self._host)
        return not self._any_left


def _greedy_or_sample(model: Model, ids: Tensor, mask: Tensor, s: Settings, processors: list[LogitsProcessor],
                      generator: torch.Generator | None, streamer: Streamer | None, stops: list[StoppingCriterion],
                      trace: _Trace | None) -> Tensor:
    loop = dict(generator=generator, streamer=streamer, stops=stops, trace=trace)
    if s.decode_graph and s.max_length > ids.shape[1] + 1:
        session = session_for(model)
        with session.decode_step(model, ids.shape[0], s.max_length, s.cache_implementation, s.compile) as step:
            return _decode_loop(model, ids, mask, s, processors, cache=step.cache, step=step, **loop)
    cache = model.new_cache(ids.shape[0], max_length=s.max_length, kind=s.cache_implementation)
    return _decode_loop(model, ids, mask, s, processors, cache=cache, step=None, **loop)


def _decode_loop(model: Model, ids: Tensor, mask: Tensor, s: Settings, processors: list[LogitsProcessor], *,
                 generator: torch.Generator | None, streamer: Streamer | None, cache: KVCache,
                 step: DecodeStep | None, stops: list[StoppingCriterion], trace: _Trace | None) -> Tensor:
    """Prefill, then one token per iteration: through ``step`` (device-side state) or the plain forward."""
    eos = torch.tensor(s.eos_token_ids, dtype=ids.dtype, device=ids.device)
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    padded = not bool(mask.all())
    logits = _forward_last(model, ids, mask if padded else None, cache)
    if step is not None:
        step.start(mask)
    while True:
        scores = apply_processors(processors, ids, logits)
        if trace is not None:
            trace.record(scores if s.output_scores else None, logits if s.output_logits else None)
        token = _pick(scores, s, generator)
        if len(eos):
            token = torch.where(unfinished, token, s.pad_token_id)
            unfinished &= ~torch.isin(token, eos)
        ids = torch.cat([ids, token[:, None]], dim=1)
        for index, stop_here in enumerate(stops):
            unfinished &= ~_stop_flags(stop_here(ids, scores), index, ids.shape[0], unfinished.device)
        if step is None and padded:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if streamer is not None:
            streamer.put(token.cpu())
        if ids.shape[1] >= s.max_length:
            return ids
        stop = _StopCheck(unfinished) if len(eos) or stops else None
        if stop is not None and not stop.deferred and stop.all_finished():
            return ids
        if step is not None:
            logits = step(token)
        else:
            logits = _forward_last(model, token[:, None], mask if padded else None, cache)
        if stop is not None and stop.deferred and stop.all_finished():  # the step just queued is never used
            return ids


@dataclass
class _Beams:
    """Per prompt: ``num_beams`` live hypotheses and the best ``num_beams`` finished ones, best first."""

    running: Tensor  # (batch, beams, max_length) ids; unwritten slots hold the fill id
    running_scores: Tensor  # (batch, beams) summed log-probs
    finished: Tensor  # (batch, beams, max_length)
    finished_scores: Tensor  # (batch, beams) length-penalised; NEG_LARGE when empty
    finished_lengths: Tensor  # (batch, beams) new tokens in each finished hypothesis
    is_finished: Tensor  # (batch, beams) slot holds a real hypothesis
    may_improve: Tensor  # (batch, 1) a live beam could still beat the worst finished one


def _new_beams(ids: Tensor, batch: int, num_beams: int, max_length: int, fill: int) -> _Beams:
    running = ids.new_full((batch, num_beams, max_length), fill)
    running[:, :, :ids.shape[1]] = ids.view(batch, num_beams, -1)
    scores = torch.zeros(batch, num_beams, device=ids.device)
    scores[:, 1:] = NEG_LARGE  # all beams start equal: expand only the first one at step one
    return _Beams(running=running, running_scores=scores, finished=running.clone(),
                  finished_scores=torch.full_like(scores, NEG_LARGE),
                  finished_lengths=torch.zeros(batch, num_beams, dtype=torch.long, device=ids.device),
                  is_finished=torch.zeros(batch, num_beams, dtype=torch.bool, device=ids.device),
                  may_improve=torch.ones(batch, 1, dtype=torch.bool, device=ids.device))


def _take(tensor: Tensor, index: Tensor) -> Tensor:
    """Rows of dim 1 per batch entry: ``tensor[b, index[b, j]]``."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _top_candidates(totals: Tensor, k: int, s: Settings,
                    generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """k (score, flat index) pairs per prompt over all beams x vocab, best first."""
    if not s.do_sample:
        return torch.topk(totals, k)
    index = _draw(totals.softmax(dim=-1), k, generator, s)
    scores, order = totals.gather(1, index).sort(dim=-1, descending=True)
    return scores, index.gather(1, order)


def _keep_finished(b: _Beams, cand: Tensor, cand_scores: Tensor, done: Tensor, new_length: int, num_beams: int,
                   s: Settings) -> None:
    """Merge candidates that just ended (among the top ``num_beams``) into the finished set."""
    eligible = done.clone()
    eligible[:, num_beams:] = False  # the extra candidates only keep enough beams alive
    scores = cand_scores / (new_length**s.length_penalty)
    full = b.is_finished.all(dim=-1, keepdim=True) & (s.early_stopping is True)
    scores = scores + full.float() * NEG_LARGE
    scores = scores + (~b.may_improve).float() * NEG_LARGE
    scores = scores + (~eligible).float() * NEG_LARGE
    merged_scores = torch.cat([b.finished_scores, scores], dim=1)
    best = torch.topk(merged_scores, num_beams).indices
    b.finished = _take(torch.cat([b.finished, cand], dim=1), best)
    b.finished_scores = _take(merged_scores, best)
    b.finished_lengths = _take(torch.cat([b.finished_lengths, torch.full_like(done, new_length, dtype=torch.long)],
                                         dim=1), best)
    b.is_finished = _take(torch.cat([b.is_finished, eligible], dim=1), best)


def _update_heuristic(b: _Beams, generated: int, prompt_length: int, s: Settings) -> None:
    """transformers' early-stop heuristic: can the best live beam still beat the worst finished one?"""
    best_length = generated
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        best_length = s.max_length - prompt_length
    best_possible = b.running_scores[:, :1] / (best_length**s.length_penalty)
    worst_finished = torch.where(b.is_finished, b.finished_scores.min(dim=1, keepdim=True).values, NEG_LARGE)
    b.may_improve &= (best_possible > worst_finished).any(dim=-1, keepdim=True)


def _beam_search(model: Model, ids: Tensor, mask: Tensor, s: Settings, processors: list[LogitsProcessor],
                 generator: torch.Generator | None) -> Tensor:
    num_beams, prompt_length = s.num_beams, ids.shape[1]
    batch = ids.shape[0] // num_beams
    # what follows a finished hypothesis: transformers' `pad_token_id or eos_token_id[0]`, where pad id 0 (as in
    # LLaMA-style vocabularies) counts as unset, so the ids match it
    fill = s.pad_token_id or (s.eos_token_ids[0] if s.eos_token_ids else 0)
    eos = torch.tensor(s.eos_token_ids, dtype=ids.dtype, device=ids.device)
    k = max(2, 1 + len(s.eos_token_ids)) * num_beams  # enough candidates that num_beams survive EOS
    b = _new_beams(ids, batch, num_beams, s.max_length, fill)
    cache = model.new_cache(ids.shape[0], max_length=s.max_length, kind=s.cache_implementation)
    logits = _forward_last(model, ids, mask, cache)
    length = prompt_length
    while True:
        log_probs = apply_processors(processors, b.running[:, :, :length].reshape(-1, length),
                                     logits.log_softmax(dim=-1))
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, num_beams, vocab) + b.running_scores[:, :, None]).view(batch, -1)
        cand_scores, flat_index = _top_candidates(totals, k, s, generator)
        parent, token = flat_index // vocab, flat_index % vocab
        cand = _take(b.running, parent)
        cand[:, :, length] = token
        done = torch.isin(token, eos) | (length + 1 >= s.max_length)
        alive_scores = cand_scores + done.float() * NEG_LARGE
        keep = torch.topk(alive_scores, num_beams).indices
        _keep_finished(b, cand, cand_scores, done, length + 1 - prompt_length, num_beams, s)
        b.running, b.running_scores = _take(cand, keep), _take(alive_scores, keep)
        offsets = torch.arange(batch, device=ids.device)[:, None] * num_beams
        cache.reorder((_take(parent, keep) + offsets).view(-1))
        length += 1
        _update_heuristic(b, length - prompt_length, prompt_length, s)
        all_full = bool(b.is_finished.all()) and s.early_stopping is True
        if not bool(b.may_improve.any()) or all_full or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = _forward_last(model, b.running[:, :, length - 1].reshape(-1, 1), mask, cache)
    returned = s.num_return_sequences
    sequences = b.finished[:, :returned].reshape(batch * returned, -1)
    return sequences[:, :prompt_length + int(b.finished_lengths[:, :returned].max())]


# -- entry point ----------------------------------------------------------------------------------
def config_for(model: Model, generation_config: Any = None) -> GenerationConfig:
    """The model's own config (``model.generation_config``: its checkpoint's generation_config.json, else
    the defaults) with the explicit settings of ``generation_config`` laid over it, as transformers 5 does."""
    own = getattr(model, "generation_config", None)
    own = own if isinstance(own, GenerationConfig) else GenerationConfig()
    if generation_config is None:
        return own
    if not isinstance(generation_config, GenerationConfig):
        raise InputError(f"generation_config: expected an optkit.GenerationConfig, got "
                         f"{type(generation_config).__name__}; build one with GenerationConfig(**settings) or "
                         "GenerationConfig.from_file('generation_config.json')")
    return generation_config.over(own)


def _settings(model: Model, input_ids: Any, attention_mask: Any, cfg: GenerationConfig, streamer: Any,
              generator: Any) -> Settings:
    """Check what depends on the model and the inputs (one InputError listing every problem) and
    resolve lengths and special ids."""
    tokens, decoder = model.spec.tokens, model.spec.decoder
    _raise(_ids_problems(input_ids, decoder.vocab_size))
    eos = _as_id_tuple(tokens.eos_token_id if cfg.eos_token_id is None else cfg.eos_token_id)
    pad = tokens.pad_token_id if cfg.pad_token_id is None else cfg.pad_token_id
    if pad is None and eos:
        pad = eos[0]  # as transformers: finished rows need some filler
    prompt_length = input_ids.shape[1]
    problems = _mask_problems(attention_mask, input_ids)
    problems += _length_problems(prompt_length, cfg.max_new_tokens, cfg.max_length, decoder.max_positions)
    problems += _call_problems(cfg, input_ids.shape[0], streamer, generator, model.device)
    problems += _token_problems(eos, pad, decoder.vocab_size)
    if cfg.num_beams > 1 and cfg.return_dict_in_generate and (cfg.output_scores or cfg.output_logits):
        problems.append("output_scores / output_logits: not recorded by beam search in optkit; drop them "
                        "(return_dict_in_generate=True alone returns .sequences) or use num_beams=1")
    if model.device.type == "meta":
        problems.append("the model is on the meta device (shapes without weights), so it cannot generate; load it "
                        "with device='cpu' or 'cuda' (optkit.from_pretrained(..., device=...))")
    _raise(problems)
    total = _total_length(prompt_length, cfg.max_new_tokens, cfg.max_length, decoder.max_positions)
    if cfg.num_beams > 1:
        _raise(_length_penalty_problems(cfg.length_penalty, total - prompt_length))
    return Settings(max_length=total, min_new_tokens=cfg.min_new_tokens, do_sample=cfg.do_sample,
                    temperature=1.0 if cfg.temperature is None else cfg.temperature,
                    top_k=DEFAULT_TOP_K if cfg.top_k is None else cfg.top_k, top_p=cfg.top_p,
                    repetition_penalty=cfg.repetition_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                    num_beams=cfg.num_beams, num_return_sequences=cfg.num_return_sequences,
                    length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping, eos_token_ids=eos,
                    pad_token_id=pad, cache_implementation=cfg.cache_implementation, compile=bool(cfg.compile),
                    output_scores=cfg.return_dict_in_generate and cfg.output_scores,
                    output_logits=cfg.return_dict_in_generate and cfg.output_logits,
                    return_dict=cfg.return_dict_in_generate)


def _use_compile(model: Model, cfg: GenerationConfig, s: Settings, input_ids: Tensor) -> bool:
    """``compile=None`` (the default): the measured policy of ``optkit.inference.policy`` decides."""
    if cfg.compile is not None:
        return cfg.compile
    if cfg.decode_graph is False or model.device.type == "meta":
        return False
    from optkit.inference.policy import choose_for

    rows = input_ids.shape[0] * s.num_return_sequences
    choice = choose_for(model, rows, s.max_length - input_ids.shape[1], s.max_length,
                        cache_kind=cfg.cache_implementation, num_beams=s.num_beams)
    return choice.step == "compiled"


def _use_decode_graph(model: Model, wanted: bool | None, s: Settings, cache_kind: str | None,
                      compile: bool = False) -> bool:
    if compile and wanted is False:
        raise InputError("compile=True compiles the decode step, which decode_graph=False turns off; "
                         "drop one of the two")
    if wanted is False or (wanted is None and model.device.type != "cuda" and not compile):
        return False
    why_not = "beam search reorders the cache between steps" if s.num_beams > 1 else None
    why_not = why_not or unsupported_reason(model, cache_kind)
    if why_not and (wanted or compile):
        asked = "compile=True" if compile else "decode_graph=True"
        fallback = "pass compile=False" if compile else "pass decode_graph=None"
        raise InputError(f"{asked}: {why_not}; {fallback} to fall back to the plain loop")
    return why_not is None


def _default_mask(ids: Tensor, s: Settings) -> Tensor:
    """transformers' inference: mask pad tokens when the prompt has some and pad is not an EOS id.

    Unlike transformers, a prompt whose pad tokens are not all on the left is refused: masking them
    would not give the tokens the rows get alone (and they may be real tokens)."""
    pad = s.pad_token_id
    if pad is None or pad in s.eos_token_ids or not bool((ids == pad).any()):
        return torch.ones_like(ids)
    mask = ids != pad
    row = _not_left_padded_row(mask)
    if row is not None:
        raise InputError(f"input_ids: row {row} has pad_token_id={pad} after its first token or only pad tokens "
                         f"({_short_row(ids[row])}); without attention_mask pad tokens are masked, which only works "
                         "as left padding: pass attention_mask (all 1 if they are real tokens) or pad on the left")
    return mask.long()


def _stop_string_problems(stop_strings: Any, tokenizer: Any) -> list[str]:
    if stop_strings is None:
        return []
    texts = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) and t for t in texts):
        return [f"stop_strings={_short_value(stop_strings)}: expected a non-empty string or a list of them"]
    if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
        return ["stop_strings: matching them needs the model's tokenizer; pass tokenizer=<optkit Tokenizer> "
                "as well (transformers asks for it too)"]
    return []


def _short_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _warn_ignored(cfg: GenerationConfig, settings: dict[str, Any]) -> None:
    """As transformers: a sampling-only keyword passed to a greedy call is a warning, not an error."""
    ignored = ignored_sampling_settings(cfg, settings)
    if ignored:
        warnings.warn(f"generate(): {', '.join(ignored)}: only used when sampling, and do_sample is False, so greedy "
                      "decoding ignores them; pass do_sample=True or drop them", UserWarning, stacklevel=6)


def _prepare(model: Model, input_ids: Any, attention_mask: Any, generation_config: Any, generator: Any,
             streamer: Any, settings: dict[str, Any], stop_strings: Any = None,
             tokenizer: Any = None, stopping_criteria: Any = ()) -> tuple[Settings, Tensor, Tensor]:
    """Every check, then the resolved settings and the ids and mask on the model's device."""
    cfg = resolve(config_for(model, generation_config), settings, "generate()")
    problems = _stop_string_problems(stop_strings, tokenizer) + _stop_criteria_problems(stopping_criteria)
    if stop_strings is not None and cfg.num_beams > 1:
        problems.append("stop_strings: not supported with beam search in optkit; use num_beams=1")
    elif not problems and len(stopping_criteria) and cfg.num_beams > 1:
        problems.append("stopping_criteria: not supported with beam search in optkit; use num_beams=1")
    _raise(problems)
    _warn_ignored(cfg, settings)
    s = _settings(model, input_ids, attention_mask, cfg, streamer, generator)
    s = dataclasses.replace(s, compile=_use_compile(model, cfg, s, input_ids))
    s = dataclasses.replace(s, decode_graph=_use_decode_graph(model, cfg.decode_graph, s, cfg.cache_implementation,
                                                              s.compile))
    ids = input_ids.to(device=model.device, dtype=torch.long)
    mask = _default_mask(ids, s) if attention_mask is None else attention_mask.to(device=model.device,
                                                                                   dtype=torch.long)
    return s, ids, mask


def check(model: Model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
          generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None,
          streamer: Streamer | None = None, stop_strings: str | Sequence[str] | None = None, tokenizer: Any = None,
          stopping_criteria: Sequence[StoppingCriterion] = (), **settings: Any) -> None:
    """Raise the InputError ``generate`` would raise for these arguments, without running the model."""
    _prepare(model, input_ids, attention_mask, generation_config, generator, streamer, settings, stop_strings,
             tokenizer, stopping_criteria)


@torch.no_grad()
def generate(model: Model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             generation_config: GenerationConfig | None = None, generator: torch.Generator | None = None,
             streamer: Streamer | None = None, stop_strings: str | Sequence[str] | None = None,
             tokenizer: Any = None, stopping_criteria: Sequence[StoppingCriterion] = (),
             **settings: Any) -> Tensor | GenerateOutput:
    """Prompt + generated ids, (batch * num_return_sequences, length), like transformers' ``generate``.

    Settings come from ``generation_config`` (an :class:`optkit.GenerationConfig`; default: the
    model's ``generation_config`` if it has one, else the defaults), each keyword in ``settings``
    (a GenerationConfig field: ``max_new_tokens=20``, ``do_sample=True`` ...) replacing the config's
    value, as in transformers. The config documents each setting. Every bad argument is one
    ``InputError`` naming it, raised before any compute.

    Left-pad batches and pass their ``attention_mask`` (without one, pad tokens in the prompt are
    masked as transformers does). Sampling draws from ``generator`` (torch's global RNG when None).
    ``streamer`` receives the prompt ids, then each new token, then ``end()``. Dropout follows the
    model's mode: call ``model.eval()`` first (``from_pretrained`` already does).

    As in transformers: ``stop_strings`` (with ``tokenizer=``) ends a row once its text ends in one of
    them (the string is kept), and each callable in ``stopping_criteria`` ends the rows it returns True
    for; ``return_dict_in_generate=True`` returns a :class:`GenerateOutput` with
    ``.sequences`` and, when asked, ``.scores`` (``output_scores``: per step, the processed scores) and
    ``.logits`` (``output_logits``: per step, the raw logits), each a tuple of (rows, vocab) float32 tensors.

    Per-call state stays in the call: ``generate`` never changes the model, and several threads may
    generate on one model at once. If it raises, a streamer with a ``fail(error)`` method (optkit's
    ``TextIteratorStreamer``) gets the error, so a consumer in another thread sees it instead of waiting forever.
    """
    try:
        return _generate(model, input_ids, attention_mask, generation_config, generator, streamer, stop_strings,
                         tokenizer, stopping_criteria, settings)
    except BaseException as error:
        notify_failure(streamer, error)
        raise


def _generate(model: Model, input_ids: Any, attention_mask: Any, generation_config: Any, generator: Any,
              streamer: Any, stop_strings: Any, tokenizer: Any, stopping_criteria: Any,
              settings: dict[str, Any]) -> Tensor | GenerateOutput:
    s, ids, mask = _prepare(model, input_ids, attention_mask, generation_config, generator, streamer, settings,
                            stop_strings, tokenizer, stopping_criteria)
    copies = s.num_beams if s.num_beams > 1 else s.num_return_sequences
    ids, mask = ids.repeat_interleave(copies, dim=0), mask.repeat_interleave(copies, dim=0)
    processors = build_processors(s, ids.shape[1], prompt_start=(mask != 0).int().argmax(dim=1))
    stops = list(stopping_criteria)
    if stop_strings is not None:
        stops.append(StopStrings([stop_strings] if isinstance(stop_strings, str) else stop_strings, tokenizer, ids))
    trace = _Trace() if s.output_scores or s.output_logits else None
    if streamer is not None:
        streamer.put(ids.cpu())
    if s.num_beams > 1:
        output = _beam_search(model, ids, mask, s, processors, generator)
    else:
        output = _greedy_or_sample(model, ids, mask, s, processors, generator, streamer, stops, trace)
    if streamer is not None:
        streamer.end()
    if not s.return_dict:
        return output
    return GenerateOutput(sequences=output, scores=tuple(trace.scores) if s.output_scores else None,
                          logits=tuple(trace.logits) if s.output_logits else None)
