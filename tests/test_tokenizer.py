"""optkit.tokenizer against transformers' GPT2Tokenizer/GPT2TokenizerFast and an independent BPE.

In transformers 5.x ``GPT2Tokenizer`` *is* ``GPT2TokenizerFast`` (one class on the `tokenizers`
backend; the pure-Python "slow" GPT-2 tokenizer is gone), so both names are checked but they cannot
disagree. ``ReferenceBPE`` below is a from-scratch byte-level BPE in plain Python; it plays the part
of the slow tokenizer as an oracle that shares no code with the `tokenizers` library.
"""

from __future__ import annotations

import json
import math
import shutil
import unicodedata
from pathlib import Path

import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import build_tiny_bpe
from transformers import GPT2Tokenizer, GPT2TokenizerFast

import optkit.tokenizer as tokenizer_module
from optkit.tokenizer import BatchEncoding, Tokenizer, TokenizerNotFoundError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLE_TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "Hello world",
    " Hello world",
    "  Hello   world  ",
    "Hello\nworld\n",
    "\tTabbed\ttext\t",
    "the quick brown fox jumps over the lazy dog.",
    "It's, we're, they've, I'm, you'll, he'd: contractions!",
    "IT'S LOUD'S",
    "Numbers 123 4567 3.14159 1,000,000",
    "café naïve Straße über déjà façade",
    "e\u0301 (combining acute) vs é",
    "日本語のテキスト and 中文字符",
    "한국어 русский ελληνικά עברית العربية हिन्दी",
    "😀 emoji 🚀🚀 👍🏽 🇫🇷 👨‍👩‍👧",
    "mixed😀text日本語with🚀no spaces",
    "</s>",
    "a</s>b",
    "x </s> y",
    "</s></s>",
    "<s>start",
    "<pad> padded <pad>",
    "<unk> unknown",
    "<s></s><pad><unk>",
    "text ending with eos</s>",
    "</s>text starting with eos",
    "<</s>>",
    "\ufffd replacement char",
    "null\x00byte and \x7f delete",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "“quoted” — dash … ellipsis ½ €5",
    "a" * 200,
    "🚀" * 30,
    "line one\r\nline two\rline three",
    "trailing space ",
    "Ġ and Ċ are byte-level symbols",
]


# ---------------------------------------------------------------------------- an independent oracle


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable bytes stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for offset, b in enumerate(shifted):
        table[b] = chr(256 + offset)
    return table


class ReferenceBPE:
    """Plain-Python byte-level BPE: split on special tokens, GPT-2 regex, merge by rank, bytes to text."""

    WORD = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, directory: Path, special_tokens: tuple[str, ...] = ("</s>", "<pad>", "<unk>")) -> None:
        self.vocab: dict[str, int] = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
        pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.ranks = {pair: rank for rank, pair in enumerate(pairs)}
        self.byte_to_char = _byte_to_char()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        self.special = set(special_tokens)
        self.special_ids = {self.vocab[t] for t in special_tokens}
        alternatives = "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
        self.special_split = regex.compile(f"({alternatives})")

    def _merge(self, symbols: list[str]) -> list[str]:
        while len(symbols) > 1:
            rank, best = min((self.ranks.get(p, math.inf), p) for p in zip(symbols, symbols[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.special_split.split(text):
            if piece in self.special:
                ids.append(self.vocab[piece])
                continue
            for word in self.WORD.findall(piece):
                symbols = [self.byte_to_char[b] for b in word.encode("utf-8")]
                ids.extend(self.vocab[s] for s in self._merge(symbols))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        data = bytes(self.char_to_byte[c] for i in kept for c in self.id_to_token[i])
        return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bpe(tmp_path_factory.mktemp("tiny_bpe"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf_slow(tok_dir: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def hf_fast(tok_dir: Path) -> GPT2TokenizerFast:
    return GPT2TokenizerFast.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def reference(tok_dir: Path) -> ReferenceBPE:
    return ReferenceBPE(tok_dir)


def _assert_same_ids(text: str, tok: Tokenizer, hf_slow, hf_fast, reference: ReferenceBPE | None) -> None:
    for add_special in (True, False):
        ours = tok.encode(text, add_special_tokens=add_special)
        assert tok(text, add_special_tokens=add_special).input_ids == ours
        assert hf_slow(text, add_special_tokens=add_special)["input_ids"] == ours, (text, add_special)
        assert hf_fast(text, add_special_tokens=add_special)["input_ids"] == ours, (text, add_special)
        if reference is not None:
            assert ([2] if add_special else []) + reference.encode(text) == ours, (text, add_special)


# ---------------------------------------------------------------------------- special tokens, vocab


def test_special_tokens_follow_opt(tok: Tokenizer, hf_slow) -> None:
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("</s>", "</s>", "<pad>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 2, 1, 3)
    assert (tok.bos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        hf_slow.bos_token_id,
        hf_slow.pad_token_id,
        hf_slow.unk_token_id,
    )
    assert tok.vocab_size == hf_slow.vocab_size
    assert len(tok) == len(hf_slow)
    assert tok.get_vocab() == hf_slow.get_vocab()
    assert tok.padding_side == "left"
    assert tok.encode("hi")[0] == 2


def test_five_x_has_one_gpt2_class() -> None:
    """Documents why the 'slow' oracle is ReferenceBPE: both transformers names are the same class."""
    assert GPT2Tokenizer is GPT2TokenizerFast


def test_convert_ids_to_tokens(tok: Tokenizer, hf_slow) -> None:
    ids = tok.encode(" Hello 😀 </s>")
    assert tok.convert_ids_to_tokens(ids) == hf_slow.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids[1]) == hf_slow.convert_ids_to_tokens(ids[1])
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids)) == ids
    assert tok.convert_ids_to_tokens(torch.tensor(ids)) == hf_slow.convert_ids_to_tokens(ids)


# ---------------------------------------------------------------------------- encoding parity


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_encode_matches_transformers_and_reference(text: str, tok, hf_slow, hf_fast, reference) -> None:
    _assert_same_ids(text, tok, hf_slow, hf_fast, reference)


def test_special_tokens_written_in_text_are_matched(tok: Tokenizer) -> None:
    """As in transformers: declared special tokens in the text become their ids; ``<s>`` is not declared."""
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    assert tok.encode("a</s>b", add_special_tokens=False) == [a, 2, b]
    assert 1 in tok.encode("<pad>") and 3 in tok.encode("<unk>")
    assert 0 not in tok.encode("<s>", add_special_tokens=False)


_FRAGMENTS = st.sampled_from(
    ["</s>", "<pad>", "<unk>", "<s>", " ", "  ", "\n", "\t", "'s", "😀", "日本", "é", "\u0301"]
)


@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=12), _FRAGMENTS), max_size=8).map("".join))
def test_encode_matches_transformers_on_random_text(tok, hf_slow, hf_fast, text: str) -> None:
    _assert_same_ids(text, tok, hf_slow, hf_fast, reference=None)


# The `regex` module knows newer Unicode than the `tokenizers` regex engine, so the reference only
# sees characters assigned in this Python's Unicode database (where the two engines were checked to agree).
_ASSIGNED = st.characters(exclude_categories=["Cn", "Cs"])


@SETTINGS
@given(st.lists(st.one_of(st.text(_ASSIGNED, max_size=12), _FRAGMENTS), max_size=8).map("".join))
def test_encode_matches_reference_bpe_on_random_text(tok, reference, text: str) -> None:
    assert all(unicodedata.category(c) != "Cn" for c in text)
    assert tok.encode(text, add_special_tokens=False) == reference.encode(text)


# ---------------------------------------------------------------------------- decoding parity


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_decode_round_trips_and_matches(text: str, tok, hf_slow, reference) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == "</s>" + text
    for skip in (False, True):
        expected = hf_slow.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert tok.decode(ids, skip_special_tokens=skip) == expected
        assert reference.decode(ids, skip_special_tokens=skip) == expected
        assert hf_slow.decode(ids, skip_special_tokens=skip) == expected  # 5.x default: no clean-up


def test_decode_never_cleans_up_spaces(tok: Tokenizer, hf_slow) -> None:
    text = "Hello , world . Is n't it ? I 'm sure ! They 're here ."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, clean_up_tokenization_spaces=True) == text
    assert hf_slow.decode(ids, clean_up_tokenization_spaces=True) == text  # ignored for BPE in transformers 5.x


@SETTINGS
@given(ids=st.lists(st.integers(min_value=0, max_value=662), max_size=40), skip=st.booleans())
def test_decode_random_ids_matches(tok, hf_slow, reference, ids: list[int], skip: bool) -> None:
    expected = hf_slow.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert tok.decode(ids, skip_special_tokens=skip) == expected
    assert reference.decode(ids, skip_special_tokens=skip) == expected


def test_decode_accepts_tensors_and_ints(tok: Tokenizer) -> None:
    ids = tok.encode("Hello 😀")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.decode(torch.tensor(ids[1])) == tok.decode([ids[1]]) == tok.decode(ids[1])
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(torch.tensor([ids, ids]))


def test_batch_decode_skips_padding(tok: Tokenizer, hf_slow) -> None:
    texts = ["hi", "Hello there 😀", "日本語"]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert tok.batch_decode(batch.input_ids, skip_special_tokens=True) == texts
    assert tok.batch_decode(batch.input_ids) == hf_slow.batch_decode(batch.input_ids.tolist())
    assert tok.batch_decode(batch.input_ids.tolist(), skip_special_tokens=True) == texts


# ---------------------------------------------------------------------------- batching, padding, tensors


def test_left_padding_by_default(tok: Tokenizer, hf_slow) -> None:
    texts = ["hi", "Hello there, world", ""]
    ours = tok(texts, padding=True)
    theirs = hf_slow(texts, padding=True, padding_side="left")
    assert isinstance(ours, BatchEncoding)
    assert ours.input_ids == theirs["input_ids"]
    assert ours.attention_mask == theirs["attention_mask"]
    assert ours["input_ids"][0][0] == tok.pad_token_id and ours.attention_mask[0][0] == 0
    assert all(row[-1] == 1 for row in ours.attention_mask)


@pytest.mark.parametrize("padding", [True, "longest", "max_length"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("add_special", [True, False])
def test_padding_matches_transformers(tok, hf_slow, padding, side: str, add_special: bool) -> None:
    texts = ["a", "the quick brown fox", "😀 日本語 </s> x"]
    kwargs = {"padding": padding, "add_special_tokens": add_special, "padding_side": side}
    if padding == "max_length":
        kwargs["max_length"] = 24
    ours, theirs = tok(texts, **kwargs), hf_slow(texts, **kwargs)
    assert dict(ours) == {k: theirs[k] for k in ("input_ids", "attention_mask")}


def test_padding_side_attribute(tok_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(tok_dir)
    tok.padding_side = "right"
    out = tok(["a", "the quick brown fox"], padding=True)
    assert out.input_ids[0][-1] == tok.pad_token_id and out.attention_mask[0][-1] == 0
    assert Tokenizer.padding_side == "left"


@pytest.mark.parametrize("max_length", [1, 2, 3, 5, 100])
def test_truncation_matches_transformers(tok, hf_slow, max_length: int) -> None:
    texts = ["the quick brown fox jumps over", "hi"]
    for kwargs in ({"truncation": True}, {}):
        ours = tok(texts, max_length=max_length, **kwargs)
        assert ours.input_ids == hf_slow(texts, max_length=max_length, **kwargs)["input_ids"]
    assert tok(texts, max_length=3, truncation=False).input_ids == tok(texts).input_ids


def test_return_tensors(tok: Tokenizer, hf_slow) -> None:
    single = tok("Hello world", return_tensors="pt")
    assert single.input_ids.dtype == torch.long and single.input_ids.shape == (1, len(tok.encode("Hello world")))
    assert torch.equal(single.input_ids, hf_slow("Hello world", return_tensors="pt")["input_ids"])
    batch = tok(["a", "Hello world"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, len(tok.encode("Hello world")))
    assert batch.attention_mask.dtype == torch.long
    assert batch.to("cpu").input_ids.device.type == "cpu"
    assert tok("Hello").input_ids == tok.encode("Hello")  # a single text gives a flat list


def test_ragged_tensors_are_refused(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "Hello world"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        tok("a", return_tensors="tf")
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], padding="max_length")


# ---------------------------------------------------------------------------- save / load


def test_save_pretrained_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    written = tok.save_pretrained(tmp_path)
    names = {p.name for p in written}
    assert names == {"vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"}
    reloaded = Tokenizer.from_pretrained(tmp_path)
    hf = GPT2Tokenizer.from_pretrained(str(tmp_path))
    for text in SAMPLE_TEXTS:
        assert reloaded.encode(text) == tok.encode(text) == hf(text)["input_ids"]
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == ("</s>", "</s>", "<pad>", "<unk>")
    ids = tok.encode("x </s> 😀")
    assert hf.decode(ids, skip_special_tokens=True) == reloaded.decode(ids, skip_special_tokens=True)


def test_save_without_bos_round_trip(tok_dir: Path, tmp_path: Path) -> None:
    no_bos = Tokenizer.from_pretrained(tok_dir, add_bos=False)
    assert no_bos.encode("hi") == no_bos.encode("hi", add_special_tokens=False)
    no_bos.save_pretrained(tmp_path)
    assert Tokenizer.from_pretrained(tmp_path).add_bos is False
    assert GPT2Tokenizer.from_pretrained(str(tmp_path))("hi")["input_ids"] == no_bos.encode("hi")


def test_loads_tokenizer_json_alone(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "full")
    (tmp_path / "json_only").mkdir()
    shutil.copy(tmp_path / "full" / "tokenizer.json", tmp_path / "json_only")
    alone = Tokenizer.from_pretrained(tmp_path / "json_only")
    hf = GPT2Tokenizer.from_pretrained(str(tmp_path / "json_only"))
    for text in ["a</s>b", " Hello 😀", ""]:
        assert alone.encode(text) == tok.encode(text) == hf(text)["input_ids"]


def test_vocab_and_merges_alone_get_opt_defaults(tok_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / name, tmp_path)
    bare = Tokenizer.from_pretrained(tmp_path)
    assert (bare.bos_token_id, bare.eos_token_id, bare.pad_token_id, bare.unk_token_id) == (2, 2, 1, 3)
    assert bare.encode("a</s>b") == Tokenizer.from_pretrained(tok_dir).encode("a</s>b")


# ---------------------------------------------------------------------------- not found


def test_missing_files_in_directory_are_listed(tok_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tok_dir / "vocab.json", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerNotFoundError) as info:
        Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "merges.txt" in message and "tokenizer.json" in message
    assert "['config.json', 'vocab.json']" in message
    assert isinstance(info.value, OSError)


def test_unknown_path_names_the_path_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(TokenizerNotFoundError) as info:
        Tokenizer.from_pretrained(missing)
    message = str(info.value)
    assert str(missing) in message and "vocab.json + merges.txt" in message and "not a local directory" in message


def test_file_instead_of_directory(tok_dir: Path) -> None:
    with pytest.raises(TokenizerNotFoundError, match="is a file"):
        Tokenizer.from_pretrained(tok_dir / "vocab.json")


def test_hub_id_tries_cache_then_download(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []

    def offline(repo_id: str, local_only: bool, revision, cache_dir) -> Path:
        calls.append(local_only)
        raise OSError(f"cannot reach the Hub for {repo_id}")

    monkeypatch.setattr(tokenizer_module, "_snapshot_download", offline)
    with pytest.raises(TokenizerNotFoundError) as info:
        Tokenizer.from_pretrained("someone/opt-missing")
    assert calls == [True, False]
    message = str(info.value)
    assert "'someone/opt-missing'" in message and "local Hub cache" in message and "Hub download" in message
    assert "vocab.json + merges.txt" in message


def test_hub_id_uses_cache_then_download(tok_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_snapshot = tmp_path / "partial"
    empty_snapshot.mkdir()

    def snapshot(repo_id: str, local_only: bool, revision, cache_dir) -> Path:
        return empty_snapshot if local_only else tok_dir  # the cache lacks the files; the download has them

    monkeypatch.setattr(tokenizer_module, "_snapshot_download", snapshot)
    loaded = Tokenizer.from_pretrained("someone/opt-tiny")
    assert loaded.encode("a</s>b") == Tokenizer.from_pretrained(tok_dir).encode("a</s>b")
    assert loaded.name_or_path == "someone/opt-tiny"
