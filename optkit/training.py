"""A small, real training loop for optkit models: causal LM on a text corpus.

Why it exists: the bundled default model (``examples/train_tiny.py``) is trained with it, and
tests need trained weights without the Hub. It is deliberately plain: AdamW, linear warmup then
cosine decay, fixed-length windows sampled from a once-tokenized corpus, periodic held-out
perplexity, and checkpoints that a rerun resumes from.

Determinism: every step reseeds the global RNG (dropout, layerdrop) and draws its batch from its
own generator, both from ``(seed, step)``. So a run is a pure function of its settings and the
last checkpoint: the same seed gives bitwise the same loss curve on CPU, and a resumed run ends
with the same weights as an uninterrupted one.

Checkpoints: ``out_dir`` holds ``config.json`` + ``model.safetensors`` (``save_pretrained``, so
transformers and ``optkit.from_pretrained`` load it; a model built from plugin components that transformers
lacks gets optkit's own format, which ``from_pretrained`` loads) and ``trainer_state.pt`` (optimizer,
scheduler, step, history; only tensors and plain numbers, so ``torch.load(weights_only=True)``
reads it). Weights and state are one ``save_pretrained`` (``extra_files``): written whole, then
swapped in with ``config.json`` last, so an interruption never leaves weights and state that disagree.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from optkit.checkpoint_files import CONFIG_NAME, interrupted_hint
from optkit.errors import CheckpointError, InputError, brief_repr

TRAINER_STATE = "trainer_state.pt"
STAGING = ".staging"
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, as in OPT's GPT-2 tokenizer
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json")

Corpus = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


# ---------------------------------------------------------------------------------- settings/result
@dataclass(frozen=True)
class TrainConfig:
    """Every setting that shapes the loss curve (stored in the checkpoint to spot changed reruns)."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_fraction: float = 0.02
    eval_windows: int = 64  # held-out windows of seq_len tokens scored per evaluation
    save_every: int = 0  # 0: at every evaluation
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "fp32"  # "bf16": autocast the forward (fp32 master weights and optimizer state)

    def __post_init__(self) -> None:
        """Every bad setting at once, as an InputError (a ValueError) naming each: never a NaN run or a
        fractional step count that ``range`` would round."""
        problems = [f"{name} must be a positive integer, got {brief_repr(getattr(self, name))}"
                    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows")
                    if not _is_int(getattr(self, name)) or getattr(self, name) <= 0]
        problems += [f"{name} must be an integer >= 0, got {brief_repr(getattr(self, name))}"
                     for name in ("warmup_steps", "save_every")
                     if not _is_int(getattr(self, name)) or getattr(self, name) < 0]
        if not _is_real(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            problems.append(f"lr must be a finite number > 0, got {brief_repr(self.lr)}")
        if not _is_real(self.eval_fraction) or not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"eval_fraction must be in [0, 1), got {brief_repr(self.eval_fraction)}")
        problems += [f"{name} must be a number >= 0, got {brief_repr(getattr(self, name))}"
                     for name in ("weight_decay", "grad_clip", "min_lr_ratio")  # grad_clip inf or 0: no clipping
                     if not _is_real(getattr(self, name)) or not getattr(self, name) >= 0]
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in betas):
            problems.append(f"betas must be two numbers in [0, 1) (AdamW's), got {brief_repr(betas)}")
        if problems:
            raise InputError("bad training settings: " + "; ".join(problems))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class TrainResult:
    """What a run produced; ``losses`` and ``evals`` cover the whole run, resumed parts included."""

    model: nn.Module
    out_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out perplexity)
    tokens_seen: int = 0
    wall_time_s: float = 0.0  # this invocation only
    num_parameters: int = 0
    resumed_from: int = 0

    @property
    def final_perplexity(self) -> float | None:
        return self.evals[-1][1] if self.evals else None


# ---------------------------------------------------------------------------------- corpus
def read_documents(corpus: Corpus) -> list[str]:
    """Documents from files, directories (every file below, sorted) or literal text.

    A path that exists is read as UTF-8; any other string is text, split into documents at
    blank-line runs so a literal text can still be split by document.
    """
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    documents: list[str] = []
    for item in items:
        path = Path(item)
        if isinstance(item, os.PathLike) or _is_existing_path(str(item)):
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            documents.extend(_read_text(p) for p in files)
        else:
            documents.extend(block for block in str(item).split("\n\n") if block.strip())
    return [doc for doc in documents if doc.strip()]


def _read_text(path: Path) -> str:
    """A file's text; binary files (a NUL byte) count as empty, so a directory can hold caches."""
    data = path.read_bytes()
    return "" if b"\0" in data else data.decode("utf-8", errors="replace")


def _is_existing_path(text: str) -> bool:
    """Whether ``text`` names a file or directory; never the empty string, which ``Path`` reads as the cwd."""
    return 0 < len(text.strip()) and len(text) < 4096 and "\n" not in text and Path(text).exists()


def split_documents(documents: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) by whole documents, chosen by a seeded shuffle; order is kept within each."""
    if eval_fraction <= 0 or len(documents) < 2:
        return list(documents), []
    n_eval = min(len(documents) - 1, max(1, round(len(documents) * eval_fraction)))
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([d for i, d in enumerate(documents) if i not in held], [d for i, d in enumerate(documents) if i in held])


# ---------------------------------------------------------------------------------- tokenizer
def train_bpe(documents: Sequence[str], vocab_size: int) -> Any:
    """A GPT-2 style byte-level BPE (``tokenizers``) with OPT's special tokens at ids 0..3.

    All 256 byte symbols are in the vocabulary, so no text is ever unknown.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def save_opt_tokenizer(tokenizer: Any, directory: str | os.PathLike[str], *,
                       model_max_length: int | None = None) -> Path:
    """Write the files OPT checkpoints ship (vocab.json, merges.txt and the two json configs).

    ``</s>`` is BOS and EOS and ``add_bos_token`` is on, so transformers' GPT2Tokenizer (and
    optkit's Tokenizer) prepend ``</s>`` to every text, as they do for facebook/opt-*.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(directory))
    roles = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    added = {str(tokenizer.token_to_id(tok)): {"content": tok, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}
             for tok in SPECIAL_TOKENS}
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
              "errors": "replace", "clean_up_tokenization_spaces": False, "added_tokens_decoder": added, **roles}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    _write_json(directory / "special_tokens_map.json", roles)
    _write_json(directory / "tokenizer_config.json", config)
    return directory


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a directory, an optkit Tokenizer or a backend itself."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from optkit.tokenizer import Tokenizer

        return Tokenizer.from_directory(tokenizer).backend
    return getattr(tokenizer, "backend", tokenizer)


def default_tokenizer_dir() -> Path:
    """The bundled model's tokenizer: what ``train`` uses when it is given none."""
    from optkit.bundled import default_model_dir

    return default_model_dir()


# ---------------------------------------------------------------------------------- token data
def encode_documents(tokenizer: Any, documents: Sequence[str], bos_id: int) -> Tensor:
    """One int32 stream: each document prefixed with ``bos_id`` (OPT's ``</s>``), as a prompt is."""
    encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False)
    pieces = [torch.tensor([bos_id] + enc.ids, dtype=torch.int32) for enc in encodings]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)


def sample_windows(stream: Tensor, *, seq_len: int, batch_size: int, seed: int, step: int) -> Tensor:
    """A batch of random windows that depends only on (seed, step): resuming needs no sampler state."""
    check_enough_tokens(stream, seq_len)
    generator = torch.Generator().manual_seed(_step_seed(seed, step, salt=1))
    starts = torch.randint(0, stream.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()]).long()


def check_enough_tokens(stream: Tensor, seq_len: int) -> None:
    """A window needs ``seq_len + 1`` tokens; checked once before training starts, so a short corpus is one
    clear error rather than a failure at the first step."""
    if stream.numel() < seq_len + 1:
        raise InputError(f"the training corpus has {stream.numel()} tokens; seq_len={seq_len} needs at least "
                         f"{seq_len + 1}: give more text or a smaller seq_len (--seq-len); a string that is not an "
                         "existing path is read as the text itself, so check the corpus paths")


def eval_windows(stream: Tensor, *, seq_len: int, max_windows: int) -> Tensor:
    """Non-overlapping windows from the start of the held-out stream: the same every evaluation."""
    count = min(max_windows, stream.numel() // seq_len)
    return stream[: count * seq_len].reshape(count, seq_len).long()


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------------- optimization
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, never biases, norms or positional embeddings (usual practice)."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        exempt = param.dim() < 2 or "embed_positions" in name or "norm" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                                  foreach=False)
    schedule = _Schedule(config.warmup_steps, config.steps, config.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class _Schedule:
    """The LR multiplier as a small object, so LambdaLR's state_dict stays plain numbers."""

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        return lr_factor(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_ratio=self.min_ratio)


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over ``windows`` (eval mode; the model's mode is restored)."""
    if windows.numel() == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        loss = model(batch, labels=batch).loss
        tokens = batch.numel() - batch.shape[0]  # the last position of a window predicts nothing
        total_nll += float(loss) * tokens
        total_tokens += tokens
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


# ---------------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: dict[str, Any],
                    out_dir: Path) -> None:
    """Weights and trainer state as one atomic save (see module doc): never one without the other."""
    payload = {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    from optkit.adapters.training import has_adapters, save_adapter_checkpoint

    if has_adapters(model):  # LoRA: the adapter in PEFT's files + the trainer state, never the frozen base
        return save_adapter_checkpoint(model, payload, out_dir, TRAINER_STATE)
    shutil.rmtree(out_dir / STAGING, ignore_errors=True)  # left by an older optkit's checkpoint writer
    model.save_pretrained(out_dir, extra_files={TRAINER_STATE: lambda path: torch.save(payload, path)})


def check_savable(model: nn.Module) -> None:
    """Raise now what ``save_checkpoint`` would raise at the first checkpoint (nothing is written).

    A model with no transformers equivalent is saved in optkit's own format (optkit.native_checkpoint);
    what can still fail is found here: weights that are not in memory, a spec that does not survive YAML.
    """
    from optkit.adapters.training import has_adapters
    from optkit.checkpoints import check_savable as check_format

    if not has_adapters(model):  # a LoRA run saves only its adapter, in PEFT's files
        check_format(model)


def load_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The trainer state of the last complete checkpoint in ``out_dir``, or None.

    Complete means its config.json is there: the save writes it last, after the weights and this state.
    """
    path = out_dir / TRAINER_STATE
    if not path.is_file():
        return None
    from optkit.adapters.training import is_adapter_checkpoint

    if not (out_dir / CONFIG_NAME).is_file() and not is_adapter_checkpoint(out_dir):
        raise CheckpointError(f"{out_dir} holds a trainer state but no {CONFIG_NAME}: its last checkpoint save was "
                              f"interrupted{interrupted_hint(out_dir)}; restore those files or pass resume=False")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_weights(model: nn.Module, out_dir: Path) -> None:
    from optkit.loading import from_pretrained

    saved = from_pretrained(out_dir, dtype=model.dtype)
    model.load_state_dict(saved.state_dict())


# ---------------------------------------------------------------------------------- progress
class Progress:
    """One line per report: step, a bar, loss, lr, tokens/s and an ETA (no dependency)."""

    def __init__(self, total: int, every: int, stream: TextIO | None = None):
        self.total, self.every = total, max(1, every)
        self.stream = stream if stream is not None else sys.stdout
        self.last_time, self.pending_steps = time.perf_counter(), 0

    def update(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_step: int) -> None:
        """Count a step; every ``every`` steps (and at the end) print the rates since the last line."""
        self.pending_steps += 1
        if step % self.every and step != self.total:
            return
        now = time.perf_counter()
        seconds_per_step = (now - self.last_time) / self.pending_steps
        self.last_time, self.pending_steps = now, 0
        filled = int(20 * step / self.total)
        bar = "#" * filled + "." * (20 - filled)
        eta_min = (self.total - step) * seconds_per_step / 60
        self.say(f"step {step:>6}/{self.total} [{bar}] loss {loss:.4f} lr {lr:.2e} |g| {grad_norm:.2f} "
                 f"{tokens_per_step / seconds_per_step:,.0f} tok/s eta {eta_min:.1f} min")

    def say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


# ---------------------------------------------------------------------------------- the loop
def train(spec_or_model: Any, corpus: Corpus, *, out_dir: str | os.PathLike[str], steps: int = 1000,
          batch_size: int = 16, seq_len: int = 256, lr: float = 1e-3, warmup_steps: int = 100,
          weight_decay: float = 0.1, eval_every: int = 200, eval_fraction: float = 0.02, seed: int = 0,
          grad_clip: float = 1.0, gradient_checkpointing: bool = False, resume: bool = True,
          tokenizer: Any = None, eval_corpus: Corpus | None = None, log_every: int = 10,
          stream: TextIO | None = None, fsdp: bool | None = None, mixed_precision: str = "fp32",
          tp_size: int | None = None, stop_at: int | None = None, **more_settings: Any) -> TrainResult:
    """Train a causal LM on ``corpus`` and checkpoint it into ``out_dir``; rerunning resumes.

    ``spec_or_model``: a spec / preset name / YAML path (built with ``seed``) or a built model.
    ``tokenizer``: a tokenizer directory, an optkit Tokenizer or a ``tokenizers.Tokenizer``
    (default: the bundled model's). ``eval_corpus`` gives the held-out documents explicitly;
    otherwise ``eval_fraction`` of the documents are held out. Extra keyword settings
    (``min_lr_ratio``, ``eval_windows``, ``save_every``, ``betas``) go to ``TrainConfig``.
    ``fsdp``: under torchrun (a process group of several ranks) the model is sharded with FSDP2 and
    checkpointed with torch.distributed.checkpoint into ``out_dir/dcp`` (``None``: when the group has > 1
    rank or ``out_dir`` holds such a checkpoint; ``True``: also on one rank; ``False``: never);
    ``mixed_precision`` "fp32" or "bf16": under FSDP its precision policy (optkit.parallel.fsdp,
    docs/distributed.md); in one process, ``torch.autocast`` to bf16 around the forward, with the weights,
    gradients and optimizer state kept in fp32 (on CPUs with AMX / AVX512-BF16 about 2x faster).
    ``stop_at``: end this call after that step (checkpointed) without finishing the schedule; a later call
    with the same settings resumes there -- a long run in several parts, or a change of corpus at a fixed step.
    ``tp_size``: under torchrun, train on a 2-D mesh (world / tp_size, tp_size): tensor parallelism within
    groups of ``tp_size`` consecutive ranks, FSDP2 across the groups, the batch split over the groups only
    (``None``: no tensor parallelism; the world size must be a multiple of ``tp_size``).
    """
    from optkit.parallel.fsdp import sharded_training

    _check_more_settings(more_settings)
    sharded = sharded_training(fsdp, mixed_precision, Path(out_dir) if resume else None,  # type: ignore[arg-type]
                               tp_size=tp_size)
    config = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
                         weight_decay=weight_decay, eval_every=eval_every, eval_fraction=eval_fraction, seed=seed,
                         grad_clip=grad_clip, gradient_checkpointing=gradient_checkpointing,
                         mixed_precision=mixed_precision, **more_settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(steps, log_every, stream if sharded is None else sharded.stream(stream))
    model = _model(spec_or_model, seed)
    check_savable(model)  # before step 1: a run never trains for hours to fail at its first checkpoint
    from optkit.adapters.training import check_trainable

    check_trainable(model)  # an optimizer with no gradient to follow: refused now, not deep inside autograd
    if seq_len > model.spec.decoder.max_positions:
        raise InputError(f"seq_len={seq_len} exceeds the model's {model.spec.decoder.max_positions} positions; "
                         f"train on shorter windows (seq_len / --seq-len <= {model.spec.decoder.max_positions}) or "
                         "use a spec with more decoder.max_positions")
    backend = load_tokenizer(tokenizer if tokenizer is not None else default_tokenizer_dir())
    train_stream, eval_stream = _token_streams(model, backend, corpus, eval_corpus, config, progress)
    if sharded is None or sharded.is_main:
        _save_tokenizer_files(tokenizer, backend, out, model)
    return _run(model, train_stream, eval_stream, config, out, resume, progress, sharded, stop_at)


def _check_more_settings(more_settings: dict[str, Any]) -> None:
    """An unknown keyword (e.g. transformers' ``gradient_accumulation_steps``, which this loop does not have) is
    an InputError listing the settings there are, not a TypeError from TrainConfig."""
    known = {f.name for f in fields(TrainConfig)} - set(inspect.signature(train).parameters)
    unknown = sorted(set(more_settings) - known)
    if unknown:
        raise InputError(f"train: unknown setting(s) {brief_repr(unknown)}; the extra settings are "
                         f"{', '.join(sorted(known))} (and train's own keywords)")


def _model(spec_or_model: Any, seed: int) -> nn.Module:
    if isinstance(spec_or_model, nn.Module):
        return spec_or_model
    from optkit.builder import build

    torch.manual_seed(seed)
    return build(spec_or_model, dtype=torch.float32)


def _token_streams(model: nn.Module, backend: Any, corpus: Corpus, eval_corpus: Corpus | None, config: TrainConfig,
                   progress: Progress) -> tuple[Tensor, Tensor]:
    """Tokenize once; check the ids fit the model's vocabulary."""
    documents = read_documents(corpus)
    if not documents:
        raise InputError(f"the training corpus {brief_repr(corpus)} holds no text (no documents, or only blank "
                         "ones); pass files, directories or a string with the text to train on")
    if eval_corpus is None:
        train_docs, eval_docs = split_documents(documents, config.eval_fraction, config.seed)
    else:
        train_docs, eval_docs = documents, read_documents(eval_corpus)
    bos = model.spec.tokens.bos_token_id
    bos = backend.token_to_id("</s>") if bos is None else bos
    start = time.perf_counter()
    train_stream = encode_documents(backend, train_docs, bos)
    check_enough_tokens(train_stream, config.seq_len)
    eval_stream = encode_documents(backend, eval_docs, bos)
    vocab = model.spec.decoder.vocab_size
    top = max((int(s.max()) for s in (train_stream, eval_stream) if s.numel()), default=0)
    if top >= vocab:
        raise InputError(f"the tokenizer produces id {top} but the model's vocabulary has {vocab} entries; "
                         f"use a matching tokenizer or a spec with decoder.vocab_size >= {top + 1} (the preset "
                         "'optkit-default' fits the bundled tokenizer)")
    progress.say(f"data: {len(train_docs)} train / {len(eval_docs)} held-out documents, {train_stream.numel():,} / "
                 f"{eval_stream.numel():,} tokens (tokenized in {time.perf_counter() - start:.1f}s)")
    return train_stream, eval_stream


def _save_tokenizer_files(source: Any, backend: Any, out: Path, model: nn.Module) -> None:
    """Make ``out_dir`` a complete model directory: copy (or write) the tokenizer next to the weights."""
    if source is None or isinstance(source, (str, os.PathLike)):
        directory = default_tokenizer_dir() if source is None else Path(source)
        if directory.resolve() == out.resolve():
            return
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                shutil.copyfile(directory / name, out / name)
    elif hasattr(source, "save_pretrained"):  # an optkit Tokenizer
        source.save_pretrained(out)
    else:
        save_opt_tokenizer(backend, out, model_max_length=model.spec.decoder.max_positions)


def _run(model: nn.Module, train_stream: Tensor, eval_stream: Tensor, config: TrainConfig, out: Path, resume: bool,
         progress: Progress, sharded: Any = None, stop_at: int | None = None) -> TrainResult:
    started = time.perf_counter()
    model.train()
    model.gradient_checkpointing_enable(config.gradient_checkpointing)
    if sharded is not None:  # FSDP2 over the ranks, before the optimizer sees the parameters
        sharded.shard(model)
    optimizer, scheduler = make_optimizer(model, config)
    state = (_initial_state(model, optimizer, scheduler, config, out, resume, progress) if sharded is None
             else sharded.initial_state(model, optimizer, scheduler, out, resume, progress.say))
    result = TrainResult(model=model, out_dir=out, step=state["step"], losses=state["losses"].tolist(),
                         evals=[(int(s), float(p)) for s, p in state["evals"].tolist()],
                         tokens_seen=state["tokens_seen"], resumed_from=state["step"],
                         num_parameters=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
    held_out = eval_windows(eval_stream, seq_len=config.seq_len, max_windows=config.eval_windows)
    save_every = config.save_every or config.eval_every
    end = config.steps if stop_at is None else max(0, min(stop_at, config.steps))
    while result.step < end:
        loss, lr, grad_norm = _train_step(model, optimizer, scheduler, train_stream, config, result.step,
                                          sharded=sharded)
        result.step += 1
        result.losses.append(loss)
        result.tokens_seen += config.batch_size * config.seq_len
        progress.update(result.step, loss, lr, grad_norm, config.batch_size * config.seq_len)
        last = result.step == end
        if held_out.numel() and (result.step % config.eval_every == 0 or last):
            result.evals.append((result.step, perplexity(model, held_out)))
            progress.say(f"eval step {result.step}: held-out perplexity {result.evals[-1][1]:.3f} "
                         f"({held_out.numel():,} tokens)")
        if result.step % save_every == 0 or last:
            (save_checkpoint if sharded is None else sharded.save)(model, optimizer, scheduler,
                                                                   _state_dict(result, config), out)
    if sharded is not None:  # the full weights as a plain checkpoint in out_dir, as single-process training leaves
        sharded.export(model, out)
    result.wall_time_s = time.perf_counter() - started
    model.eval()
    return result


def _initial_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: TrainConfig, out: Path,
                   resume: bool, progress: Progress) -> dict[str, Any]:
    """A fresh state, or the last checkpoint's (weights, optimizer and scheduler loaded)."""
    saved = load_checkpoint(out) if resume else None
    if saved is None:
        empty = torch.zeros(0, dtype=torch.float64)
        return {"step": 0, "losses": empty, "evals": empty.reshape(0, 2), "tokens_seen": 0}
    from optkit.adapters.training import restore_adapter

    if not restore_adapter(model, saved, out):  # a LoRA run resumes its adapter; any other run its weights
        _load_weights(model, out)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scheduler.lr_lambdas[0] = _Schedule(config.warmup_steps, config.steps, config.min_lr_ratio)
    changed = {k: (saved["config"][k], v) for k, v in _config_dict(config).items()
               if k in saved["config"] and saved["config"][k] != v}  # an older checkpoint lacks newer settings
    progress.say(f"resuming from {out} at step {saved['step']}"
                 + (f" (settings changed since: {changed})" if changed else ""))
    return saved


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, stream: Tensor,
                config: TrainConfig, step: int, *, sharded: Any = None) -> tuple[float, float, float]:
    """One optimizer step -> (loss, lr used, grad norm); the RNG is reseeded from (seed, step)
    so dropout is reproducible. ``sharded``: this rank takes its slice of the batch (optkit.parallel.fsdp)."""
    batch = sample_windows(stream, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed, step=step)
    torch.manual_seed(_step_seed(config.seed, step))
    if sharded is not None:
        batch = sharded.local_batch(batch, _step_seed(config.seed, step))
    with _autocast(model, config.mixed_precision if sharded is None else "fp32"):
        loss = model(batch, labels=batch).loss
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = torch.nn.utils.clip_grad_norm_ if sharded is None else sharded.clip_grad_norm_
    norm = clip(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return (loss.item() if sharded is None else sharded.mean(loss)), lr, norm.item()


def _autocast(model: nn.Module, mixed_precision: str) -> Any:
    """bf16 autocast on the device of the model's weights; a no-op context for "fp32" (FSDP casts by its own
    policy instead)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _state_dict(result: TrainResult, config: TrainConfig) -> dict[str, Any]:
    """Plain numbers and tensors only, so ``torch.load(weights_only=True)`` reads it back."""
    evals = torch.tensor(result.evals, dtype=torch.float64).reshape(-1, 2)
    return {"step": result.step, "losses": torch.tensor(result.losses, dtype=torch.float64), "evals": evals,
            "tokens_seen": result.tokens_seen, "config": _config_dict(config)}

