"""Build tiny OPT-style byte-level BPE tokenizer files for tests (no Hub access needed).

The files mimic what OPT checkpoints ship: ``vocab.json`` + ``merges.txt`` with
``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, plus a ``special_tokens_map.json`` and a
``tokenizer_config.json`` that make ``</s>`` both BOS and EOS and ask for a BOS on every prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
VOCAB_SIZE = 800

_WORDS = (
    "the quick brown fox jumps over lazy dog and then some model tokens are "
    "learned from text while people write code in python every day it is "
    "good to test things carefully because bugs hide in corners of unicode "
    "Hello World OPT language generation streaming decode encode prompt"
).split()
_UNICODE_WORDS = [
    "café", "naïve", "Straße", "über", "déjà", "façade", "señor", "Ωmega", "πρόσωπο",
    "日本語", "中文字符", "한국어", "русский", "ελληνικά",
    "עברית", "العربية", "हिन्दी",
    "😀", "🚀🚀", "👍🏽", "🇫🇷", "e\u0301", "—", "…", "“quoted”", "½", "€5", "\u00a0",
]


def _training_lines(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic mix of English, accented, CJK and emoji text, with odd spacing."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS if rng.random() < 0.8 else _UNICODE_WORDS) for _ in range(rng.randint(3, 14))]
        sep = rng.choice([" ", " ", " ", "  ", "\t", "\n"])
        lead = rng.choice(["", "", " ", "\n"])
        tail = rng.choice([".", "!", "?", ",", "", "'s", " 123", "\n"])
        lines.append(lead + sep.join(words) + tail)
    return lines


def _special_token_entry(content: str) -> dict:
    """The AddedToken dict OPT's json files use for a special token."""
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")


def train_tiny_bpe(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE (all 256 byte symbols present, so nothing is unknown)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_lines(), trainer=trainer)
    return tok


def build_tiny_bpe(directory: str | Path, *, with_config: bool = True) -> Path:
    """Write vocab.json + merges.txt (+ OPT-like special_tokens_map/tokenizer_config) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train_tiny_bpe().model.save(str(directory))
    if with_config:
        special = {
            "bos_token": _special_token_entry("</s>"),
            "eos_token": _special_token_entry("</s>"),
            "unk_token": _special_token_entry("<unk>"),
            "pad_token": _special_token_entry("<pad>"),
        }
        _write_json(directory / "special_tokens_map.json", special)
        config = {
            "add_bos_token": True,
            "add_prefix_space": False,
            "errors": "replace",
            "tokenizer_class": "GPT2Tokenizer",
            **special,
        }
        _write_json(directory / "tokenizer_config.json", config)
    return directory
