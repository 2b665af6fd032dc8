"""OPT's tokenizer (GPT-2 byte-level BPE) on the `tokenizers` library, without transformers.

Token ids match transformers' ``GPT2Tokenizer`` on the same files: same BPE model, same byte-level
pre-tokenizer/decoder, the same special tokens matched literally in the text (``"a</s>b"`` encodes
``</s>`` as its id), and OPT's ``</s>`` prepended as BOS.

Decoding never "cleans up tokenization spaces": transformers 5.x defaults
``clean_up_tokenization_spaces`` to False and ignores True for BPE tokenizers, so the decoded text is
exactly the bytes of the tokens (invalid UTF-8 becomes U+FFFD, like ``errors="replace"``).
"""

from __future__ import annotations

import json
import numbers
import os
import re
import reprlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from optkit.errors import InputError, OptkitError, shorten

__all__ = ["BatchEncoding", "SpecialTokens", "Tokenizer", "TokenizerNotFoundError", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
_OPT_DEFAULTS = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
_NO_MAX_LENGTH = int(1e20)  # transformers stores "no limit" as ~1e30 in tokenizer_config.json


class TokenizerNotFoundError(OptkitError, OSError):
    """No usable tokenizer files at a path or Hub id (raised once, with what was looked for)."""


class BatchEncoding(dict):
    """``{"input_ids", "attention_mask"}`` mapping with attribute access, like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def input_ids(self) -> Any:
        return self["input_ids"]

    @property
    def attention_mask(self) -> Any:
        return self["attention_mask"]

    def to(self, device: Any) -> BatchEncoding:
        """Move tensor values to ``device`` (lists are left as they are)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


@dataclass(frozen=True)
class SpecialTokens:
    """Which token plays each role (None: the tokenizer has no such token)."""

    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None


class Tokenizer:
    """OPT tokenizer: GPT-2 byte-level BPE that prepends ``</s>`` as BOS; pads on the left by default."""

    padding_side: str = "left"
    truncation_side: str = "right"

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: SpecialTokens,
        *,
        add_bos: bool = True,
        add_prefix_space: bool = False,
        model_max_length: int | None = None,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.special_tokens = special_tokens
        self.add_bos = add_bos
        self.add_prefix_space = add_prefix_space
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike[str],
        *,
        add_bos: bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> Tokenizer:
        """Load from a local directory, or from the Hub cache / a download when it is not a directory.

        ``add_bos=None`` follows the files: ``tokenizer.json``'s post-processor when there is one, else
        ``add_bos_token`` in tokenizer_config.json, else True (OPT prepends ``</s>``).
        """
        directory = _resolve_directory(path_or_hub_id, revision=revision, cache_dir=cache_dir)
        return cls.from_directory(directory, add_bos=add_bos, name_or_path=str(path_or_hub_id))

    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike[str], *, add_bos: bool | None = None, name_or_path: str = ""
    ) -> Tokenizer:
        """Build from tokenizer.json, or from vocab.json + merges.txt, plus the optional json configs."""
        directory = Path(directory)
        _require_tokenizer_files(directory, str(directory))
        config = _read_config(directory)
        add_prefix_space = bool(config.get("add_prefix_space", False))
        if (directory / "tokenizer.json").is_file():
            backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
        else:
            backend = _bpe_backend(directory, add_prefix_space)
        special = _register_special_tokens(backend, config)
        if add_bos is None:
            add_bos = _default_add_bos(backend, config, special, directory)
        return cls(
            backend,
            special,
            add_bos=add_bos,
            add_prefix_space=add_prefix_space,
            model_max_length=_model_max_length(config),
            name_or_path=name_or_path or str(directory),
        )

    # ------------------------------------------------------------------ special tokens and vocab

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.bos_token

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.eos_token

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.unk_token

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.pad_token

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        """As in transformers, e.g. ``tok.pad_token = tok.eos_token``; the token must be in the vocabulary."""
        if token is not None and (not isinstance(token, str) or self.backend.token_to_id(token) is None):
            raise InputError(f"pad_token={_short(token)}: not a token of this vocabulary; use one it has "
                             f"(e.g. tok.pad_token = tok.eos_token, {self.eos_token!r})")
        self.special_tokens = dataclasses.replace(self.special_tokens, pad_token=token)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id(self.pad_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids that ``skip_special_tokens=True`` drops (the backend's special added tokens)."""
        return sorted(i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special)

    @property
    def vocab_size(self) -> int:
        """Size of the base BPE vocabulary (without added tokens), as in transformers."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        """Byte-level token strings (e.g. ``"Ġworld"``) for one id or a sequence of ids."""
        if isinstance(ids, int):
            return self._id_to_token(ids, 0)
        ids = _as_id_list(ids, "convert_ids_to_tokens()")
        return [self._id_to_token(i, position) for position, i in enumerate(ids)]

    def _id_to_token(self, token_id: int, position: int) -> str | None:
        """None for an id past the vocabulary, as transformers; a negative id is no token id at all."""
        if token_id < 0:
            raise InputError(f"convert_ids_to_tokens(): token id {token_id} at position {position} is negative; "
                             f"token ids are 0..{len(self) - 1}")
        return self.backend.id_to_token(token_id) if token_id < len(self) else None

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """The id of each token string; a string that is no token maps to the unknown token's id (None when
        the tokenizer has no unknown token), as in transformers."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens, None)
        if isinstance(tokens, (bytes, Mapping)) or not isinstance(tokens, Iterable):
            raise InputError(f"convert_tokens_to_ids(): expected a token string or a list of them, got "
                             f"{_describe(tokens)}")
        return [self._token_to_id(token, position) for position, token in enumerate(tokens)]

    def _token_to_id(self, token: Any, position: int | None) -> int | None:
        if not isinstance(token, str):
            where = "" if position is None else f" at position {position}"
            raise InputError(f"convert_tokens_to_ids(): tokens are strings; got {_describe(token)}{where}")
        found = self.backend.token_to_id(token)
        return self.unk_token_id if found is None else found

    # ------------------------------------------------------------------ encoding

    def _prefix_ids(self, add_special_tokens: bool) -> list[int]:
        """The ids prepended to every text: OPT's BOS (``</s>``) unless disabled."""
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            return [self.bos_token_id]
        return []

    def _encode_texts(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        prefix = self._prefix_ids(add_special_tokens)
        return [prefix + enc.ids for enc in encode(texts, add_special_tokens=False)]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """Token strings of one text (byte-level, e.g. ``"Ġworld"``), as transformers' ``tokenize``."""
        return [self.backend.id_to_token(i) for i in self.encode(text, add_special_tokens=add_special_tokens)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text (BOS first unless ``add_special_tokens=False``)."""
        if not isinstance(text, str):
            raise InputError(f"encode(text): expected a str, got {_describe(text)}; use tokenizer(texts) for a batch")
        _check_text(text, "text")
        _check_flag("add_special_tokens", add_special_tokens)
        return self._encode_texts([text], add_special_tokens)[0]

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """Encode a text or a batch like transformers: ``padding`` False/True/"longest"/"max_length".

        As in transformers, ``truncation=None`` with a ``max_length`` and no padding truncates;
        truncation keeps the BOS and cuts from ``truncation_side`` (right). ``text_pair`` (one text per text)
        encodes each pair as OPT does: ``</s> A </s> B``. ``return_tensors``: None, "pt" or "np".
        """
        texts, is_batch = _checked_texts(text)
        _check_flag("add_special_tokens", add_special_tokens)
        pad_mode = _padding_mode(padding, max_length)
        pairs = self._checked_pairs(text_pair, len(texts), is_batch, truncation, max_length, pad_mode)
        if is_batch and not texts and (pad_mode != "do_not_pad" or return_tensors is not None):
            raise InputError("text: empty batch ([]); padding and tensors need at least one text")
        if _should_truncate(truncation, max_length, pad_mode):
            limit = max_length if max_length is not None else self.model_max_length
        else:
            limit = None
        rows = [self._truncate(ids, limit, add_special_tokens) for ids in self._encode_texts(texts, add_special_tokens)]
        if pairs is not None:
            rows = [first + second for first, second in zip(rows, self._encode_texts(pairs, add_special_tokens))]
        masks = [[1] * len(ids) for ids in rows]
        if pad_mode != "do_not_pad":
            target = max_length if pad_mode == "max_length" else max((len(r) for r in rows), default=0)
            rows, masks = self._pad(rows, masks, target, padding_side or self.padding_side)
        encoding = {"input_ids": rows}
        if return_attention_mask:
            encoding["attention_mask"] = masks
        return _finish(encoding, is_batch, return_tensors)

    @staticmethod
    def _checked_pairs(text_pair: Any, count: int, is_batch: bool, truncation: Any, max_length: int | None,
                       pad_mode: str) -> list[str] | None:
        """The second texts, one per first text; truncating pairs is refused (transformers has several
        strategies for it; optkit has none yet)."""
        if text_pair is None:
            return None
        pairs, pair_is_batch = _checked_texts(text_pair)
        if pair_is_batch != is_batch or len(pairs) != count:
            raise InputError(f"text_pair: pass one second text per text ({count} text(s), got "
                             f"{len(pairs) if pair_is_batch else 'a single str'}); a str pairs with a str")
        if _should_truncate(truncation, max_length, pad_mode):
            raise InputError("truncation of text pairs is not supported; truncate the texts first, or pass "
                             "truncation=False")
        return pairs

    def _truncate(self, ids: list[int], limit: int | None, add_special_tokens: bool) -> list[int]:
        """Cut the text ids (never the BOS) so the whole row fits in ``limit``."""
        if limit is None or len(ids) <= limit:
            return ids
        n_prefix = len(self._prefix_ids(add_special_tokens))
        if limit < n_prefix:
            raise InputError(f"max_length={limit} leaves no room for the {n_prefix} special token(s)")
        prefix, body = ids[:n_prefix], ids[n_prefix:]
        keep = limit - n_prefix
        body = body[:keep] if self.truncation_side == "right" else body[len(body) - keep :]
        return prefix + body

    def _pad(
        self, rows: list[list[int]], masks: list[list[int]], target: int, side: str
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Pad every row to at least ``target`` with the pad id (mask 0) on ``side``."""
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {_short(side)}")
        if self.pad_token_id is None:
            raise InputError("this tokenizer has no pad token, so it cannot pad; pass padding=False")
        padded_rows, padded_masks = [], []
        for ids, mask in zip(rows, masks):
            n = max(0, target - len(ids))
            fill, zeros = [self.pad_token_id] * n, [0] * n
            padded_rows.append(fill + ids if side == "left" else ids + fill)
            padded_masks.append(zeros + mask if side == "left" else mask + zeros)
        return padded_rows, padded_masks

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        ids: int | Sequence[int] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of one sequence (list, int or 1-D tensor).

        ``clean_up_tokenization_spaces`` is accepted for call compatibility and ignored, as
        transformers 5.x ignores it for BPE tokenizers (the clean-up would corrupt the text).
        """
        return self.backend.decode(self._checked_ids(ids, "decode()"), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self,
        sequences: Sequence[Sequence[int]] | Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """Texts of a batch (list of lists or 2-D tensor)."""
        rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
            raise InputError(f"batch_decode(): expected a batch of id sequences (list of lists or 2-D tensor), "
                             f"got {_describe(sequences)}")
        rows = list(rows)
        if rows and all(_is_id(row) for row in rows):  # one sequence: transformers 5 decodes it as one text
            warnings.warn("batch_decode() got one sequence of ids (not a batch); it is decoded as one text, as "
                          "transformers does; use decode() for a single sequence", UserWarning, stacklevel=2)
            rows = [rows]
        checked = [self._checked_ids(row, f"batch_decode() row {i}") for i, row in enumerate(rows)]
        return self.backend.decode_batch(checked, skip_special_tokens=skip_special_tokens)

    def _checked_ids(self, ids: Any, where: str) -> list[int]:
        """A flat list of ids inside the vocabulary, or an InputError saying which id is wrong and why."""
        ids = _as_id_list(ids, where)
        if ids and not 0 <= min(ids) <= max(ids) < len(self):
            bad = next(i for i in ids if not 0 <= i < len(self))
            raise InputError(f"{where}: token id {bad} at position {ids.index(bad)} is outside the vocabulary "
                             f"(0..{len(self) - 1}); were the ids made by another tokenizer?")
        return ids

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, directory: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write vocab.json, merges.txt, tokenizer.json and OPT-style json configs (loadable by transformers)."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise InputError(f"save_pretrained(): {shorten(str(directory))!r} is a file; pass a directory to hold "
                             "the tokenizer files")
        directory.mkdir(parents=True, exist_ok=True)
        written = [Path(p) for p in self.backend.model.save(str(directory))]
        written.append(self._save_backend_json(directory / "tokenizer.json"))
        special = {role: _added_token_entry(self.backend, tok) for role, tok in self._special_items()}
        written.append(_write_json(directory / "special_tokens_map.json", special))
        written.append(_write_json(directory / "tokenizer_config.json", self._config_dict()))
        return tuple(written)

    def _special_items(self) -> list[tuple[str, str]]:
        """(role, token) for the roles this tokenizer has."""
        pairs = [(role, getattr(self.special_tokens, role)) for role in _SPECIAL_ROLES]
        return [(role, token) for role, token in pairs if token is not None]

    def _save_backend_json(self, path: Path) -> Path:
        """tokenizer.json whose post-processor adds the BOS exactly when this tokenizer does."""
        backend = BackendTokenizer.from_str(self.backend.to_str())
        backend.post_processor = _bos_template(self.bos_token if self.add_bos else None, self.bos_token_id)
        backend.save(str(path))
        return path

    def _config_dict(self) -> dict[str, Any]:
        """transformers' current layout: special tokens as strings, their options in added_tokens_decoder."""
        added = {
            str(i): {**_token_entry(tok), "special": tok.special}
            for i, tok in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config: dict[str, Any] = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_bos_token": self.add_bos,
            "add_prefix_space": self.add_prefix_space,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": added,
            **dict(self._special_items()),
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        return config

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"add_bos={self.add_bos}, padding_side={self.padding_side!r})"
        )


# ---------------------------------------------------------------------- locating files


def _has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )


def _looked_for() -> str:
    return "tokenizer.json, or vocab.json + merges.txt (optional special_tokens_map.json, tokenizer_config.json)"


def _require_tokenizer_files(directory: Path, label: str) -> None:
    """Fail with the files that *are* there when the tokenizer files are not."""
    if _has_tokenizer_files(directory):
        return
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise TokenizerNotFoundError(
        f"No tokenizer files in {label!r}: looked for {_looked_for()}; found {found or 'nothing'}."
    )


def _resolve_directory(
    path_or_hub_id: str | os.PathLike[str], *, revision: str | None, cache_dir: str | os.PathLike[str] | None
) -> Path:
    """A local directory as is; ``"optkit-default"``, the bundled model's; otherwise the Hub snapshot (cache
    first, then a download)."""
    from optkit.bundled import bundled_directory

    if not isinstance(path_or_hub_id, (str, os.PathLike)) or not str(path_or_hub_id):
        raise InputError(f"tokenizer: expected a directory or a Hugging Face Hub id, got {_describe(path_or_hub_id)}")
    bundled = bundled_directory(path_or_hub_id)
    if bundled is not None:
        return bundled
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise TokenizerNotFoundError(f"{str(path)!r} is a file; pass the directory holding {_looked_for()}.")
    if _is_local_path(str(path_or_hub_id)):
        raise TokenizerNotFoundError(f"{shorten(str(path_or_hub_id))!r} is not a local directory (nothing is there); "
                                     f"pass the directory holding {_looked_for()}, or a Hugging Face Hub id "
                                     "(name or namespace/name).")
    problems: list[str] = []
    for local_only in (True, False):
        where = "local Hub cache" if local_only else "Hub download"
        try:
            directory = _snapshot_download(str(path_or_hub_id), local_only, revision, cache_dir)
        except Exception as exc:  # the Hub client raises many unrelated types (HTTP, validation, OS)
            problems.append(f"{where}: {type(exc).__name__}: {_one_line(str(exc))}")
            continue
        if _has_tokenizer_files(directory):
            return directory
        problems.append(f"{where}: snapshot {str(directory)!r} has none of the tokenizer files")
    raise TokenizerNotFoundError(
        f"Tokenizer not found: {str(path_or_hub_id)!r} is not a local directory, and as a Hugging Face Hub "
        f"repo id it failed ({'; '.join(problems)}). Looked for {_looked_for()}."
    )


def _is_local_path(text: str) -> bool:
    """A name no Hub id can be: absolute, or starting with ~, ./ or ../ (a Hub id is name or namespace/name)."""
    return os.path.isabs(text) or text.startswith(("~", "./", "../", ".\\", "..\\"))


def _one_line(message: str, limit: int = 300) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _snapshot_download(
    repo_id: str, local_only: bool, revision: str | None, cache_dir: str | os.PathLike[str] | None
) -> Path:
    """Only the tokenizer files of a Hub repo (imported lazily: loading from disk needs no Hub client)."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=list(TOKENIZER_FILES),
            local_files_only=local_only,
        )
    )


# ---------------------------------------------------------------------- building the backend


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def _read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json overlaid with special_tokens_map.json (which wins, as in transformers)."""
    config = _read_json(directory / "tokenizer_config.json")
    config.update({k: v for k, v in _read_json(directory / "special_tokens_map.json").items() if v is not None})
    return config


def _bpe_backend(directory: Path, add_prefix_space: bool) -> BackendTokenizer:
    """The GPT-2 byte-level BPE pipeline transformers builds from vocab.json + merges.txt."""
    vocab, merges = models.BPE.read_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
    model = models.BPE(
        vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    )
    backend = BackendTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def _added_token(entry: str | dict[str, Any], special: bool) -> AddedToken:
    """An AddedToken from a json entry (plain string or AddedToken dict)."""
    if isinstance(entry, str):
        return AddedToken(entry, special=special, normalized=False)
    fields = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in entry}
    return AddedToken(entry["content"], special=bool(entry.get("special", special)), **fields)


def _token_content(entry: str | dict[str, Any] | None) -> str | None:
    return entry.get("content") if isinstance(entry, dict) else entry


def _register_special_tokens(backend: BackendTokenizer, config: dict[str, Any]) -> SpecialTokens:
    """Add the configured special tokens so they are matched in text and skippable when decoding.

    Options (lstrip, rstrip, ...) come from ``added_tokens_decoder`` when it lists the token.
    """
    tokens: dict[str, AddedToken] = {}
    for entry in (config.get("added_tokens_decoder") or {}).values():
        token = _added_token(entry, special=bool(entry.get("special", False)))
        tokens[token.content] = token
    roles = {role: config[role] if role in config else _default_special(backend, role) for role in _SPECIAL_ROLES}
    for entry in [*_extra_special_tokens(config), *roles.values()]:
        if entry is not None and _token_content(entry) not in tokens:
            token = _added_token(entry, special=True)
            tokens[token.content] = token
    backend.add_special_tokens([t for t in tokens.values() if t.special])
    backend.add_tokens([t for t in tokens.values() if not t.special])
    return SpecialTokens(**{role: _token_content(entry) for role, entry in roles.items()})


def _extra_special_tokens(config: dict[str, Any]) -> list[str | dict[str, Any]]:
    """``additional_special_tokens`` (transformers 4.x) / ``extra_special_tokens`` (5.x) as a list."""
    extra = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        extra.extend(value.values() if isinstance(value, dict) else value)
    return extra


def _default_special(backend: BackendTokenizer, role: str) -> str | None:
    """OPT's token for a role the configs leave out, if the vocabulary has it."""
    token = _OPT_DEFAULTS[role]
    return token if backend.token_to_id(token) is not None else None


def _default_add_bos(
    backend: BackendTokenizer, config: dict[str, Any], special: SpecialTokens, directory: Path
) -> bool:
    """Whether the files ask for a BOS: tokenizer.json's post-processor, else the config, else OPT's yes."""
    if (directory / "tokenizer.json").is_file() and backend.post_processor is not None:
        bos_id = backend.token_to_id(special.bos_token) if special.bos_token else None
        return bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return bool(config.get("add_bos_token", True))


def _model_max_length(config: dict[str, Any]) -> int | None:
    value = config.get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value < _NO_MAX_LENGTH else None


def _bos_template(bos_token: str | None, bos_id: int | None) -> processors.PostProcessor:
    """Post-processor for tokenizer.json: ``</s> $A`` when a BOS is added, plain ``$A`` otherwise."""
    if bos_token is None or bos_id is None:
        return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return processors.TemplateProcessing(
        single=f"{bos_token}:0 $A:0",
        pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
        special_tokens=[(bos_token, bos_id)],
    )


def _token_entry(token: AddedToken) -> dict[str, Any]:
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
    }


def _added_token_entry(backend: BackendTokenizer, content: str) -> dict[str, Any] | str:
    """The json entry of a special token, with the options it was registered with."""
    for token in backend.get_added_tokens_decoder().values():
        if token.content == content:
            return _token_entry(token)
    return content


# ---------------------------------------------------------------------- small helpers


_SURROGATE = re.compile("[\ud800-\udfff]")
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother = 60, 60


def _short(value: Any) -> str:
    return _REPR.repr(value)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {_short(value)}"


def _is_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_id_list(ids: Any, where: str = "decode()") -> list[int]:
    """A flat ``list[int]`` from an int, a sequence, or a 0-/1-D tensor or array; anything else is refused."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if _is_id(ids):
        return [int(ids)]
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise InputError(f"{where}: expected token ids (a list of int or a 1-D integer tensor), got {_describe(ids)}")
    ids = list(ids)
    for position, value in enumerate(ids):
        if isinstance(value, (list, tuple)):
            raise InputError(f"{where}: takes one sequence of ids, got a nested sequence; "
                             "use batch_decode() for a batch")
        if not _is_id(value):
            raise InputError(f"{where}: token ids must be integers; got {_describe(value)} at position {position}")
    return [int(i) for i in ids]


def _checked_texts(text: Any) -> tuple[list[str], bool]:
    """(texts, is_batch) from a str or a sequence of str; the first bad one is an InputError naming it."""
    if isinstance(text, str):
        _check_text(text, "text")
        return [text], False
    if isinstance(text, (bytes, bytearray)):
        raise InputError(f"text: got {type(text).__name__}; decode it first, e.g. text.decode('utf-8')")
    if not isinstance(text, Sequence):
        raise InputError(f"text: expected a str or a list of str, got {_describe(text)}")
    texts = list(text)
    for i, item in enumerate(texts):
        if not isinstance(item, str):
            raise InputError(f"text[{i}]: expected a str, got {_describe(item)}")
        _check_text(item, f"text[{i}]")
    return texts, True


def _check_text(text: str, name: str) -> None:
    """Refuse lone surrogates: they are not Unicode text, and the backend cannot encode them."""
    found = _SURROGATE.search(text)
    if found:
        raise InputError(f"{name}: lone surrogate U+{ord(found.group()):04X} at character {found.start()} is not "
                         "valid Unicode (text decoded with errors='surrogateescape'?); repair it, e.g. "
                         "text.encode('utf-8', 'replace').decode('utf-8')")


def _check_flag(name: str, value: Any) -> None:
    """A switch must be a bool: ``add_special_tokens="no"`` would otherwise read as True."""
    if not isinstance(value, bool):
        raise InputError(f"{name}={_short(value)}: must be True or False")


def _padding_mode(padding: bool | str, max_length: int | None) -> str:
    """Normalise transformers' padding argument to do_not_pad / longest / max_length."""
    modes = {False: "do_not_pad", True: "longest", **{name: name for name in ("do_not_pad", "longest", "max_length")}}
    if not isinstance(padding, (bool, str)) or padding not in modes:
        raise InputError(f"padding must be False, True, 'longest' or 'max_length', got {_short(padding)}")
    if max_length is not None and (not _is_id(max_length) or max_length < 1):
        raise InputError(f"max_length={_short(max_length)}: must be a positive integer or None")
    mode = modes[padding]
    if mode == "max_length" and max_length is None:
        raise InputError("padding='max_length' needs max_length")
    return mode


TRUNCATION_STRATEGIES = ("longest_first", "only_first", "do_not_truncate")  # transformers' names, one text each


def _should_truncate(truncation: bool | str | None, max_length: int | None, pad_mode: str) -> bool:
    if not isinstance(truncation, (bool, str, type(None))) or (
            isinstance(truncation, str) and truncation not in TRUNCATION_STRATEGIES):
        second = " (it cuts a text_pair, which optkit does not truncate)" if truncation == "only_second" else ""
        raise InputError(f"truncation={_short(truncation)}: must be True, False, None or one of "
                         f"{', '.join(map(repr, TRUNCATION_STRATEGIES))}{second}")
    if truncation is None:
        return max_length is not None and pad_mode == "do_not_pad"
    if truncation in ("do_not_truncate",):
        return False
    return bool(truncation)


def _finish(encoding: dict[str, list[list[int]]], is_batch: bool, return_tensors: str | None) -> BatchEncoding:
    """Lists (flat for a single text), LongTensors or int64 numpy arrays of shape (batch, length)."""
    if return_tensors is None:
        return BatchEncoding({k: v if is_batch else v[0] for k, v in encoding.items()})
    if return_tensors not in ("pt", "np"):
        raise InputError(f"return_tensors must be None, 'pt' or 'np', got {_short(return_tensors)}")
    lengths = {len(row) for row in encoding["input_ids"]}
    if len(lengths) > 1:
        raise InputError(
            f"cannot make a tensor from sequences of different lengths {sorted(lengths)}; pass padding=True"
        )
    if return_tensors == "np":
        import numpy

        return BatchEncoding({k: numpy.array(v, dtype=numpy.int64).reshape(len(v), -1) for k, v in encoding.items()})
    import torch

    return BatchEncoding({k: torch.tensor(v, dtype=torch.long).reshape(len(v), -1) for k, v in encoding.items()})
