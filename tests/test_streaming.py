"""optkit.streaming: streamed text, joined, is exactly the final decode, and never ends mid-character."""

from __future__ import annotations

import io
import queue
import threading
import time
from contextlib import redirect_stdout

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import build_tiny_bpe
from tokenizers.pre_tokenizers import ByteLevel

from optkit.streaming import StreamTimeoutError, TextIteratorStreamer, TextStreamer
from optkit.tokenizer import Tokenizer

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPLACEMENT = "\ufffd"
_BYTES_AS_SYMBOLS = ByteLevel(add_prefix_space=False, use_regex=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained(build_tiny_bpe(tmp_path_factory.mktemp("tiny_bpe")))


def one_token_per_byte(tok: Tokenizer, text: str) -> list[int]:
    """Ids of the single-byte tokens spelling ``text``: splits every multi-byte character."""
    symbols = "".join(s for s, _ in _BYTES_AS_SYMBOLS.pre_tokenize_str(text))
    ids = tok.convert_tokens_to_ids(list(symbols))
    assert None not in ids
    return ids


class Recorder:
    """An ``on_text`` sink that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, text: str, final: bool) -> None:
        self.calls.append((text, final))

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.calls)


def stream(tok: Tokenizer, prompt: list[int], steps: list[list[int]], **options) -> Recorder:
    """Drive a TextStreamer the way generation does: prompt as (1, n), then one chunk per step."""
    recorder = Recorder()
    streamer = TextStreamer(tok, on_text=recorder, **options)
    streamer.put(torch.tensor([prompt], dtype=torch.long))
    for step in steps:
        streamer.put(torch.tensor(step, dtype=torch.long))
    streamer.end()
    return recorder


def assert_clean(recorder: Recorder) -> None:
    """One final call, last; no earlier chunk is empty or ends in the middle of a character."""
    assert [final for _, final in recorder.calls] == [False] * (len(recorder.calls) - 1) + [True]
    for text, _ in recorder.calls[:-1]:
        assert text and not text.endswith(REPLACEMENT)


def as_steps(ids: list[int], cuts: list[int]) -> list[list[int]]:
    """Split ``ids`` into consecutive steps of the given sizes (1 token per step once cuts run out)."""
    steps, start = [], 0
    for size in cuts:
        if start >= len(ids):
            break
        steps.append(ids[start : start + size])
        start += size
    steps.extend([i] for i in ids[start:])
    return steps


# ---------------------------------------------------------------------------- examples


def test_emoji_split_over_byte_tokens_is_emitted_whole(tok: Tokenizer) -> None:
    ids = one_token_per_byte(tok, "Hi 😀 日本!")
    recorder = stream(tok, prompt=[2], steps=[[i] for i in ids], skip_prompt=True)
    assert_clean(recorder)
    assert recorder.text == "Hi 😀 日本!"
    assert "😀" in [text for text, _ in recorder.calls]  # held back, then emitted in one piece


def test_prompt_is_streamed_unless_skipped(tok: Tokenizer) -> None:
    prompt, new = tok.encode("Hello"), tok.encode(" world", add_special_tokens=False)
    shown = stream(tok, prompt, [[i] for i in new])
    assert shown.text == tok.decode(prompt + new) == "</s>Hello world"
    skipped = stream(tok, prompt, [[i] for i in new], skip_prompt=True)
    assert skipped.text == " world"
    skipped_special = stream(tok, prompt, [[i] for i in new], skip_special_tokens=True)
    assert skipped_special.text == "Hello world"


def test_incomplete_character_at_end_is_flushed_like_decode(tok: Tokenizer) -> None:
    ids = one_token_per_byte(tok, "ok 😀")[:-1]  # drop the emoji's last byte
    recorder = stream(tok, [], [[i] for i in ids])
    assert recorder.text == tok.decode(ids) == "ok " + REPLACEMENT
    assert recorder.calls[-1] == (REPLACEMENT, True)


def test_end_always_reports_final(tok: Tokenizer) -> None:
    recorder = stream(tok, [], [])
    assert recorder.calls == [("", True)]


def test_streamer_is_reusable_after_end(tok: Tokenizer) -> None:
    recorder = Recorder()
    streamer = TextStreamer(tok, skip_prompt=True, on_text=recorder)
    for word in ("one", "two"):
        streamer.put(tok.encode("prompt"))
        streamer.put(tok.encode(" " + word, add_special_tokens=False))
        streamer.end()
    assert recorder.text == " one two"


def test_accepts_lists_ints_and_batch_of_one(tok: Tokenizer) -> None:
    ids = tok.encode(" a b c", add_special_tokens=False)
    recorder = Recorder()
    streamer = TextStreamer(tok, on_text=recorder)
    streamer.put([ids[:1]])
    streamer.put(ids[1])
    streamer.put(torch.tensor(ids[2:]).unsqueeze(0))
    streamer.end()
    assert recorder.text == " a b c"


def test_batch_over_one_is_refused(tok: Tokenizer) -> None:
    streamer = TextStreamer(tok, on_text=Recorder())
    with pytest.raises(ValueError, match="batch size 1"):
        streamer.put(torch.tensor([[2, 5], [2, 6]]))
    with pytest.raises(ValueError, match="batch size 1"):
        streamer.put([[2], [3]])


def test_default_sink_prints(tok: Tokenizer) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        streamer = TextStreamer(tok, skip_prompt=True)
        streamer.put(tok.encode("x"))
        for i in one_token_per_byte(tok, " 😀 yes"):
            streamer.put([i])
        streamer.end()
    assert out.getvalue() == " 😀 yes\n"


# ---------------------------------------------------------------------------- properties


@SETTINGS
@given(
    prompt=st.lists(st.integers(0, 662), max_size=6),
    new=st.lists(st.integers(0, 662), max_size=40),
    cuts=st.lists(st.integers(1, 4), max_size=10),
    skip_prompt=st.booleans(),
    skip_special=st.booleans(),
)
def test_random_ids_stream_equals_decode(tok, prompt, new, cuts, skip_prompt: bool, skip_special: bool) -> None:
    recorder = stream(tok, prompt, as_steps(new, cuts), skip_prompt=skip_prompt, skip_special_tokens=skip_special)
    streamed = new if skip_prompt else prompt + new
    assert recorder.text == tok.decode(streamed, skip_special_tokens=skip_special)
    assert_clean(recorder)


_MULTIBYTE = st.sampled_from(
    ["😀", "🚀", "👍🏽", "🇫🇷", "日本語", "中", "한", "é", "e\u0301", "€", "\n", " ", "</s>", "a"]
)


def split_to_bytes(tok: Tokenizer, token_id: int) -> list[int]:
    """The single-byte tokens spelling one token (each byte-level symbol is itself in the vocab)."""
    return tok.convert_tokens_to_ids(list(tok.convert_ids_to_tokens(token_id)))


@SETTINGS
@given(
    text=st.lists(st.one_of(st.text(max_size=6), _MULTIBYTE), max_size=10).map("".join),
    split=st.lists(st.booleans(), max_size=60),
    skip_special=st.booleans(),
)
def test_text_split_mid_character_streams_back_exactly(tok, text: str, split: list[bool], skip_special: bool) -> None:
    """Mix whole BPE tokens with their single-byte spellings, so characters are cut at many byte offsets."""
    ids: list[int] = []
    for n, token_id in enumerate(tok.encode(text, add_special_tokens=False)):
        ids += split_to_bytes(tok, token_id) if n < len(split) and split[n] else [token_id]
    recorder = stream(tok, [2], [[i] for i in ids], skip_prompt=True, skip_special_tokens=skip_special)
    assert recorder.text == tok.decode(ids, skip_special_tokens=skip_special)
    if not skip_special:
        assert recorder.text == text
    assert_clean(recorder)


# ---------------------------------------------------------------------------- iterator streamer


def test_iterator_streamer_across_threads(tok: Tokenizer) -> None:
    text = "Threads 😀 and 日本語 text\nnew line"
    ids = one_token_per_byte(tok, text)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=5.0)

    def generate() -> None:
        streamer.put(torch.tensor([[2, 5, 6]]))
        for i in ids:
            streamer.put(torch.tensor([i]))
            time.sleep(0.0005)
        streamer.end()

    worker = threading.Thread(target=generate)
    worker.start()
    chunks = list(streamer)
    worker.join()
    assert "".join(chunks) == text
    assert all(chunk and not chunk.endswith(REPLACEMENT) for chunk in chunks)


def test_iterator_streamer_times_out(tok: Tokenizer) -> None:
    streamer = TextIteratorStreamer(tok, timeout=0.05)
    with pytest.raises(StreamTimeoutError, match="0.05"):
        next(streamer)
    with pytest.raises(queue.Empty):  # what transformers' streamer raises, for callers that catch that
        next(streamer)


def test_iterator_streamer_refuses_batches(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="batch size 1"):
        TextIteratorStreamer(tok).put(torch.zeros(3, 2, dtype=torch.long))
