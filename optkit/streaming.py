"""Stream generated text as it is produced, without ever emitting half a character.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character (an emoji is often
split over several tokens); decoding such a prefix yields a trailing U+FFFD that later tokens turn into
the real character. The streamers hold back a trailing run of U+FFFD until more tokens arrive (or
``end()``), so everything they emit, joined, equals ``tokenizer.decode(all_streamed_ids)`` exactly.

That guarantee rests on the decoder being a byte-level concatenation, as OPT's GPT-2 BPE decoder is:
once the decoded text ends on a complete character, what follows decodes independently.
"""

from __future__ import annotations

import numbers
import queue
import reprlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from optkit.errors import InputError, OptkitError

__all__ = ["StreamTimeoutError", "TextIteratorStreamer", "TextStreamer"]

_REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class StreamTimeoutError(OptkitError, TimeoutError, queue.Empty):
    """No text arrived in time (also a ``queue.Empty``, which transformers' streamer raises)."""


def _print_text(text: str, final: bool) -> None:
    """Default sink: write to stdout as text arrives, newline at the end."""
    print(text, end="\n" if final else "", flush=True)


def _token_list(value: Any) -> list[int]:
    """Ids from an int, a list, a (1, n) nested list, or a 0/1/2-D tensor; batches over 1 are refused."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int):
        return [value]
    value = list(value)
    if value and isinstance(value[0], (list, tuple)):
        if len(value) != 1:
            raise InputError(f"text streamers support batch size 1 only, got a batch of {len(value)}")
        value = list(value[0])
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        raise InputError(f"streamer.put: token ids must be integers, got {reprlib.repr(value)}")
    return [int(v) for v in value]


def notify_failure(streamer: Any, error: BaseException) -> None:
    """Tell ``streamer`` that generation raised ``error``, when it can take the news (a ``fail`` method): a
    consumer iterating in another thread then gets the error instead of waiting for text that never comes."""
    fail = getattr(streamer, "fail", None)
    if callable(fail):
        fail(error)


def _stable_length(text: str) -> int:
    """Length of the part of ``text`` later tokens cannot change: all but a trailing U+FFFD run."""
    return len(text.rstrip(_REPLACEMENT_CHAR))


class TextStreamer:
    """Decode tokens as they are generated and hand complete text to ``on_text(text, final)``.

    Generation calls ``put(prompt_ids)`` once, then ``put(new_ids)`` per step, then ``end()``.
    ``on_text`` defaults to printing on stdout; ``end()`` always calls it once with ``final=True``
    (possibly with ``""``) so a consumer knows the stream is over.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        *,
        skip_prompt: bool = False,
        skip_special_tokens: bool = False,
        on_text: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.on_text = on_text or _print_text
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []  # ids since the last point where all decoded text was emitted
        self._emitted = 0  # characters of decode(self._ids) already handed out
        self._awaiting_prompt = True

    def _decode(self) -> str:
        """The text of the held ids; ids the tokenizer has no token for (OPT's embedding has a few more rows
        than its vocabulary) have no text and are left out, as transformers' tokenizers do."""
        size = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        ids = self._ids if size is None else [i for i in self._ids if i < size]
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token_ids: Any) -> None:
        """Add the prompt (first call) or newly generated ids, and emit whatever text is now complete."""
        ids = _token_list(token_ids)
        is_prompt, self._awaiting_prompt = self._awaiting_prompt, False
        if is_prompt and self.skip_prompt:
            return
        self._ids.extend(ids)
        text = self._decode()
        stable = _stable_length(text)
        if stable > self._emitted:
            self.on_text(text[self._emitted : stable], False)
            self._emitted = stable
        if self._emitted == len(text):  # nothing held back: later ids decode on their own
            self._ids, self._emitted = [], 0

    def end(self) -> None:
        """Flush what was held back (a genuinely incomplete character stays U+FFFD, as in decode)."""
        text = self._decode()
        self.on_text(text[self._emitted :], True)
        self._reset()


_END_OF_STREAM = object()


class _Failure:
    """Queued by ``fail``: the consumer's next ``next()`` raises ``error``."""

    def __init__(self, error: BaseException):
        self.error = error


class TextIteratorStreamer(TextStreamer):
    """A streamer to iterate over from another thread: ``for chunk in streamer: ...``.

    Generation runs in a worker thread and calls ``put``/``end``; the consumer iterates. Each
    ``next()`` waits at most ``timeout`` seconds (None: forever) and raises ``StreamTimeoutError``.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        *,
        skip_prompt: bool = False,
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> None:
        super().__init__(
            tokenizer, skip_prompt=skip_prompt, skip_special_tokens=skip_special_tokens, on_text=self._enqueue
        )
        self.timeout = timeout
        self._queue: queue.Queue[Any] = queue.Queue()
        self._failed: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        """Generation raised ``error`` (``generate`` and the pipeline call this): after the text already streamed,
        the consumer's ``next()`` raises it, which ends that stream (instead of waiting forever for text that never
        comes); a later generation streams anew."""
        if error is self._failed:  # generate and the pipeline around it both report the same error
            return
        self._failed = error
        self._reset()
        self._queue.put(_Failure(error))

    def _enqueue(self, text: str, final: bool) -> None:
        if text:
            self._queue.put(text)
        if final:
            self._queue.put(_END_OF_STREAM)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            item = self._queue.get(timeout=self.timeout)
        except queue.Empty:
            raise StreamTimeoutError(f"no streamed text arrived within {self.timeout} s") from None
        if item is _END_OF_STREAM:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item
