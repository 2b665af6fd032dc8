"""Build optkit's bundled default model from nothing, offline: corpus, tokenizer, weights.

Why: on a machine without the Hugging Face Hub the README's main job must still produce
meaningful text, and tests need a model with trained weights. Everything here comes from this
machine: the corpus is the Python standard library's own source (PSF license), the tokenizer is
a byte-level BPE trained on it, and the model is a small OPT trained by ``optkit.training``.

    python examples/train_tiny.py            # ~30 min on 2 CPU cores; rerun to resume
    python examples/train_tiny.py --steps 20 --out /tmp/smoke   # a quick smoke run

The run checkpoints into ``--work`` (default ``build/train_tiny``), so rerunning after an
interruption continues; at the end it writes fp16 weights, tokenizer files and a README into
``--out`` (default ``optkit/default_model``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

import optkit
from optkit.training import (TrainResult, encode_documents, eval_windows, load_tokenizer, perplexity,
                             save_opt_tokenizer, train, train_bpe)

REPO = Path(__file__).resolve().parent.parent
# Directories of the standard library that are not ordinary library code (or are machine specific).
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "lib2to3", "encodings",
                           "turtledemo", "ensurepip", "pydoc_data", "lib-dynload", "__pycache__", "__phello__"})
EXCLUDED_FILES = frozenset({"this.py", "antigravity.py", "__hello__.py"})  # rot13 text / jokes
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-", "test_")
# A fixed held-out set: whole modules the model never trains on.
HELD_OUT = ("bisect.py", "colorsys.py", "fractions.py", "graphlib.py", "heapq.py", "json/decoder.py", "netrc.py",
            "queue.py", "sched.py", "shlex.py", "textwrap.py", "email/quoprimime.py")
# --corpus stdlib adds the rest of the standard library's source: its test suite and tools (PSF-2.0 too), but
# nothing that tests or copies a held-out module (any path mentioning one of these names is left out).
EXTRA_DIRS = ("test", "idlelib", "lib2to3", "pydoc_data")
HELD_OUT_STEMS = ("bisect", "colorsys", "fractions", "graphlib", "heapq", "json", "netrc", "queue", "sched", "shlex",
                  "textwrap", "email", "quopri")
EXTRA_MAX_BYTES = 400_000  # larger test files are data tables, not prose or code
# Decoding defaults shipped as generation_config.json: chosen by examples/choose_generation_defaults.py
# (the table and the reasons are in docs/generation.md); --generation-defaults none ships none.
GENERATION_DEFAULTS = {"do_sample": False, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}
HELD_OUT_SAMPLE = "heldout.txt"  # shipped with the model: a fixed text the tests score
SAMPLE_CHARS = 6000


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[Path]:
    """Every library .py file under ``root``, sorted, without tests, tools and generated files."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith(EXCLUDED_PREFIXES) for part in rel.parts):
            continue
        if rel.name in EXCLUDED_FILES:
            continue
        files.append(path)
    return files


def split_corpus(root: Path) -> tuple[list[Path], list[Path]]:
    """(train, held-out) files; held-out is the fixed ``HELD_OUT`` module list."""
    files = corpus_files(root)
    held = {root / name for name in HELD_OUT}
    missing = sorted(str(p) for p in held if p not in files)
    if missing:
        raise SystemExit(f"held-out modules missing from this Python's standard library: {missing}")
    return [p for p in files if p not in held], [p for p in files if p in held]


def extra_files(root: Path) -> list[Path]:
    """The standard library's test suite, idlelib, lib2to3 and pydoc_data (the documentation's topics as text):
    UTF-8 ``.py`` files, sorted, none larger than ``EXTRA_MAX_BYTES``, none mentioning a held-out module."""
    files = []
    for top in EXTRA_DIRS:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix().lower()
            if "__pycache__" in rel or any(stem in rel for stem in HELD_OUT_STEMS):
                continue
            if path.stat().st_size > EXTRA_MAX_BYTES or not _is_utf8(path):
                continue
            files.append(path)
    return files


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:  # the test suite keeps deliberately mis-encoded files
        return False
    return True


def model_spec(args: argparse.Namespace) -> optkit.ModelSpec:
    """OPT architecture at a few million parameters (fp16 weights well under 10 MB)."""
    decoder = {"vocab_size": args.vocab_size, "hidden_size": args.hidden_size, "num_layers": args.num_layers,
               "num_heads": args.num_heads, "ffn_dim": args.ffn_dim, "max_positions": args.max_positions,
               "dropout": 0.0, "attention_dropout": 0.0, "attention": "sdpa"}
    return optkit.load_spec("opt-tiny", decoder=decoder)


def build_tokenizer(train_files: list[Path], directory: Path, args: argparse.Namespace) -> Path:
    """Train the BPE once; a rerun reuses it (the checkpoint's token ids depend on it)."""
    if (directory / "vocab.json").is_file():
        return directory
    start = time.perf_counter()
    texts = [p.read_text(encoding="utf-8") for p in train_files]
    tokenizer = train_bpe(texts, args.vocab_size)
    save_opt_tokenizer(tokenizer, directory, model_max_length=args.max_positions)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens trained in {time.perf_counter() - start:.1f}s", flush=True)
    return directory


def export(run_dir: Path, tokenizer_dir: Path, out: Path, held_out_files: list[Path], summary: dict) -> dict:
    """fp16 weights + tokenizer + a held-out sample + README into ``out``; returns measured numbers."""
    model = optkit.from_pretrained(run_dir, dtype=torch.float16)
    if summary.get("generation_defaults"):
        model.generation_config = optkit.GenerationConfig(**summary["generation_defaults"])
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(out)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    (out / HELD_OUT_SAMPLE).write_text(held_out_text(held_out_files)[:SAMPLE_CHARS], encoding="utf-8")
    summary.update(measure(out, held_out_files, summary["seq_len"]))
    (out / "README.md").write_text(model_readme(summary), encoding="utf-8")
    for path in out.iterdir():  # package data: readable by everyone (checkpoint writes are private temp files)
        path.chmod(0o644)
    return summary


def held_out_text(files: list[Path]) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in files)


def measure(out: Path, held_out_files: list[Path], seq_len: int) -> dict:
    """Held-out perplexity of the shipped (fp16) weights, run in fp32 on CPU."""
    model = optkit.from_pretrained(out, dtype=torch.float32)
    backend = load_tokenizer(out)
    docs = [p.read_text(encoding="utf-8") for p in held_out_files]
    stream = encode_documents(backend, docs, model.spec.tokens.bos_token_id)
    windows = eval_windows(stream, seq_len=seq_len, max_windows=10_000)
    files = [p for p in out.iterdir() if p.is_file()]
    return {"heldout_perplexity": round(perplexity(model, windows), 3), "heldout_tokens": int(windows.numel()),
            "size_bytes": sum(p.stat().st_size for p in files),
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}


def model_readme(s: dict) -> str:
    return f"""# optkit default model

A small OPT ({s['parameters']:,} parameters; {s['num_layers']} layers, hidden {s['hidden_size']},
{s['num_heads']} heads, ffn {s['ffn_dim']}, vocabulary {s['vocab_size']}, {s['max_positions']} positions),
trained from scratch so that optkit works offline. It writes Python-flavoured text; it knows nothing else.

- Corpus: {corpus_line(s)}
  {s['heldout_files']} modules held out (see `docs/default-model.md` for the rule).
- License of the corpus: Python Software Foundation License (PSF-2.0).
- Tokenizer: byte-level BPE trained on the same corpus (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; `</s>` is prepended).
- Command: `{s['command']}`
- Training: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens, AdamW lr {s['lr']}, seed {s['seed']};
  wall time {s['wall_time_min']:.1f} min on {s['machine']}.
- Held-out perplexity (fp16 weights run in fp32, {s['heldout_tokens']:,} tokens): {s['heldout_perplexity']}
- Weights: fp16 safetensors; loads with `optkit.from_pretrained` and `transformers.OPTForCausalLM`.
- `{HELD_OUT_SAMPLE}`: the first {SAMPLE_CHARS} characters of the held-out modules, scored by the tests.
"""


def corpus_line(s: dict) -> str:
    library = "the Python {python} standard library's own `.py` modules (code, comments and docstrings)".format(**s)
    if s.get("corpus") != "stdlib":
        return f"{library}, {s['train_files']} files for training,"
    weight = (f"; from step {s['library_weight_from']} each library module counts {s['library_weight']} times"
              if s.get("library_weight", 1) > 1 else "")
    return (f"{library} plus its test suite, idlelib, lib2to3 and pydoc_data (the documentation's topics), "
            f"{s['train_files']} files for training{weight},")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "optkit" / "default_model")
    p.add_argument("--work", type=Path, default=REPO / "build" / "train_tiny")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--ffn-dim", type=int, default=768)
    p.add_argument("--max-positions", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--corpus", choices=("library", "stdlib"), default="library",
                   help="library: the standard library's modules; stdlib: also its test suite and tools "
                        "(the tokenizer is trained on the library modules either way)")
    p.add_argument("--generation-defaults", choices=("measured", "none"), default="measured",
                   help="measured: ship GENERATION_DEFAULTS as generation_config.json; none: ship none")
    p.add_argument("--library-weight", type=int, default=1,
                   help="with --corpus stdlib: from --library-weight-from on, each library module counts this often")
    p.add_argument("--library-weight-from", type=int, default=0, help="the step where --library-weight starts")
    p.add_argument("--mixed-precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the forward (about 2x faster on CPUs with AMX / AVX512-BF16)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    library_files, held_out_files = split_corpus(stdlib_dir())
    extras = extra_files(stdlib_dir()) if args.corpus == "stdlib" else []
    tokenizer_dir = build_tokenizer(library_files, args.work / "tokenizer", args)  # the same for both corpora
    for stop_at, train_files in phases(args, library_files, extras):
        chars = sum(p.stat().st_size for p in train_files)
        print(f"corpus{'' if stop_at is None else f' until step {stop_at}'}: {len(train_files)} train files "
              f"({chars / 1e6:.1f} MB), {len(held_out_files)} held out", flush=True)
        result = train(model_spec(args), train_files, eval_corpus=held_out_files, out_dir=args.work / "run",
                       tokenizer=tokenizer_dir, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=0.1, eval_every=args.eval_every,
                       eval_fraction=0.0, seed=args.seed, grad_clip=1.0, min_lr_ratio=0.1, eval_windows=64,
                       mixed_precision=args.mixed_precision, stop_at=stop_at)
        timing = _accumulate_wall_time(args.work / "wall_time.json", result)
    settings = ("steps", "batch_size", "seq_len", "lr", "seed", "vocab_size", "hidden_size", "num_layers", "num_heads",
                "ffn_dim", "max_positions", "corpus", "mixed_precision", "library_weight", "library_weight_from")
    summary = {**{k: getattr(args, k) for k in settings},
               "python": platform.python_version(), "train_files": len(library_files) + len(extras),
               "heldout_files": len(held_out_files), "wall_time_min": timing / 60,
               "machine": f"{args.threads} CPU threads, torch {torch.__version__}",
               "command": command_line(argv if argv is not None else sys.argv[1:]),
               "eval_history": [[step, round(ppl, 3)] for step, ppl in result.evals],
               "generation_defaults": GENERATION_DEFAULTS if args.generation_defaults == "measured" else None}
    summary = export(args.work / "run", tokenizer_dir, args.out, held_out_files, summary)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def phases(args: argparse.Namespace, library: list[Path], extras: list[Path]) -> list[tuple[int | None, list[Path]]]:
    """(last step or None for the end, training files) per phase. With ``--library-weight W --library-weight-from
    S`` the run switches at step S to a mix that repeats each library module W times, so the end of the
    schedule (the decaying learning rate) sees mostly the kind of text the held-out modules are."""
    if args.library_weight == 1 or not extras:
        return [(None, library + extras)]
    return [(args.library_weight_from, library + extras), (None, library * args.library_weight + extras)]


def command_line(argv: list[str]) -> str:
    """The command that reproduces the model: the arguments, less the ones that only pick directories."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--work"):
            skip = True
        elif not arg.startswith(("--out=", "--work=")):
            kept.append(arg)
    return " ".join(["python examples/train_tiny.py", *kept])


def _accumulate_wall_time(path: Path, result: TrainResult) -> float:
    """Training seconds over every invocation (a resumed run adds up), kept next to the checkpoint."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    seconds = sum(record.values())
    if result.step > result.resumed_from:
        record[f"{result.resumed_from}-{result.step}"] = result.wall_time_s
        path.write_text(json.dumps(record, indent=2) + "\n")
        seconds += result.wall_time_s
    return seconds


if __name__ == "__main__":
    sys.exit(main())
