"""``optkit run``: generate text from the command line (``optkit.cli`` registers it)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import torch

from optkit.errors import InputError
from optkit.placement.command_line import add_arguments as add_placement_arguments, load_placed

DESCRIPTION = """\
Generate text with a model: the bundled default model, or --model (a checkpoint directory with
its tokenizer files, or a Hugging Face hub id).

The prompt is --prompt, or else every non-empty line of standard input is one prompt, e.g.
  echo -e "Hello\nThe meaning of life is" | optkit run --max-new-tokens 20
Standard input is read to its end and decoded as UTF-8 (a leading BOM is skipped); input that is not
UTF-8, or holds a NUL byte, is refused with one line naming the byte. Every prompt is checked before
anything is printed.

Each prompt and its continuation are printed on stdout, followed by a newline. With --stream
(the default) text is printed as it is generated; beam search (--num-beams > 1) prints at the end.

Generation settings not given here come from the model's generation_config.json (the bundled model's
is tuned for readable output); without a length there either, at most 64 new tokens are printed
(an interactive demo: pass --max-new-tokens for more). Generation also stops at the end-of-sequence
token and, for a prompt that looks like Python code, at the end of its code block (a blank line
followed by a line that is not indented; that line is not printed).
"""
DEFAULT_MAX_NEW_TOKENS = 64  # without --max-new-tokens and no length in the model's generation config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand to the ``optkit`` CLI."""
    p = subparsers.add_parser("run", help="generate text with a model (default: the bundled one)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="text-generation", help="pipeline task (supported: text-generation)")
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    p.add_argument("--prompt", default=None, help="prompt text (default: one prompt per line of stdin)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens to generate (default: the model's generation config, else {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of greedy decoding (default: the model's generation config)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default 50; 0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--num-beams", type=int, default=None, help="beam search width (1: greedy or sampling)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeating tokens")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--attention", default=None, help="attention backend, e.g. eager or sdpa")
    p.add_argument("--linear", default=None, help="linear backend, e.g. torch or int8")
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16 or auto")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--tp-size", type=int, default=None,
                   help="under torchrun: split the model over this many ranks (default: all); every rank "
                        "computes, rank 0 prints (see docs/distributed.md)")
    add_placement_arguments(p)  # --device-map, --max-memory, --offload-folder, -v
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile: faster decoding after a one-off "
                        "compilation of seconds to minutes (needs a C++ compiler on CPU, Triton on CUDA)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print text as it is generated (default: on)")
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, else one prompt per non-empty line of stdin (read whole, decoded as UTF-8)."""
    if args.prompt is not None:
        return [_checked_text(_as_bytes(args.prompt), "--prompt")]
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        raise InputError("no prompt: standard input is closed; pass --prompt TEXT or pipe prompts on stdin")
    if stdin.isatty():  # a terminal: say what is awaited instead of waiting silently
        print("optkit: type prompts, one per line, then Ctrl-D (Ctrl-Z Enter on Windows); "
              "or pass --prompt TEXT", file=sys.stderr, flush=True)
    try:
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else _as_bytes(stdin.read())
    except OSError as exc:  # e.g. fd 0 closed under a still-open sys.stdin
        raise InputError(f"no prompt: standard input cannot be read ({exc.strerror or exc}); "
                         "pass --prompt TEXT") from None
    text = _checked_text(data.removeprefix(b"\xef\xbb\xbf"), "standard input")  # a UTF-8 BOM is not a prompt
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise InputError("no prompt: pass --prompt TEXT or pipe prompts on stdin, one per line")
    return prompts


def _as_bytes(text: str) -> bytes:
    """The bytes a str was decoded from: arguments that were not UTF-8 arrive as surrogate escapes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escape: keep it, so the check reports it
        return text.encode("utf-8", "surrogatepass")


def _checked_text(data: bytes, source: str) -> str:
    """Prompts are UTF-8 text: invalid UTF-8 or a NUL byte (binary input) is one error naming the byte,
    raised before the model is loaded or anything is printed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                         f"(line {_line_of(data, exc.start)}); convert it, e.g. with iconv -t UTF-8") from None
    if "\0" in text:
        offset = data.index(b"\0")
        raise InputError(f"{source} looks binary: a NUL byte at offset {offset} (line {_line_of(data, offset)}); "
                         "prompts are text, one per line")
    return text


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _check_seed(seed: int | None) -> None:
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InputError(f"--seed {str(seed)[:40]}: out of range; use an integer from 0 to 2**64 - 1")


def run(args: argparse.Namespace) -> int:
    """Load the pipeline, generate for the prompt, print the full text.

    Under torchrun (or with --tp-size) every rank loads its slices of the model and computes; rank 0 reads
    the prompts and draws the seed for all of them, and alone prints."""
    from optkit.parallel.launch import launch

    group = launch(args.tp_size, args.device)
    if group is None:
        return _generate(args, None)
    try:
        with group.printing():
            status = _generate(args, group)
    except BaseException:
        group.close()
        raise
    group.close(wait=True)
    return status


def _generate(args: argparse.Namespace, group: Any) -> int:
    from optkit.pipelines import pipeline
    from optkit.streaming import TextStreamer

    _check_seed(args.seed)
    prompts = _read_prompts(args) if group is None else group.shared(lambda: _read_prompts(args))
    if sys.stderr.isatty() and (group is None or group.is_main):
        print(f"optkit: loading {args.model or 'the bundled model'} ...", file=sys.stderr, flush=True)
    placed = load_placed(args) if group is None else None  # with --device-map: loaded onto its devices
    if group is not None:
        pipe = pipeline(args.task, model=_load_split(args, group), tokenizer=_source(args))
    elif placed is not None:
        pipe = pipeline(args.task, model=placed.model, tokenizer=placed.tokenizer)
    else:
        pipe = pipeline(args.task, model=args.model, dtype=args.dtype, device=args.device, attention=args.attention,
                        linear=args.linear)
    given = _settings(args)
    seed = args.seed if group is None else group.shared_seed(args.seed)  # ranks sample the same stream
    given["generator"] = _generator(seed, pipe.model.device)
    for prompt in prompts:  # every prompt is checked before any is printed
        pipe.check(prompt, **_with_length(given, pipe, prompt))
    beams = (given.get("num_beams") or pipe.model.generation_config.num_beams) > 1
    if args.compile and (group is None or group.is_main):
        print("optkit: --compile: the first prompt compiles the decode step (seconds to minutes, once per shape; "
              "reused from the compile cache when warm)", file=sys.stderr, flush=True)
    for prompt in prompts:
        options = _with_length(given, pipe, prompt)
        code = not beams and looks_like_code(prompt)
        stops = {"stopping_criteria": [CodeBlockEnd(pipe.tokenizer, prompt)]} if code else {}
        if args.stream and not beams:
            printer = CodeBlockPrinter(prompt) if code else None
            pipe(prompt, streamer=TextStreamer(pipe.tokenizer, skip_special_tokens=True,
                                               on_text=printer.on_text if printer else None), **stops, **options)
        else:
            text = pipe(prompt, **stops, **options)[0]["generated_text"]
            print(prompt + code_block(text[len(prompt):]) if code else text, flush=True)
    return 0


def _source(args: argparse.Namespace) -> Any:
    from optkit.pipelines import _bundled_model

    return args.model if args.model is not None else _bundled_model()


def _load_split(args: argparse.Namespace, group: Any) -> Any:
    """This rank's part of the model, split over the tensor-parallel group (each rank reads its slices)."""
    from optkit.loading import from_pretrained

    if getattr(args, "device_map", None) is not None:
        raise InputError("--device-map and tensor parallelism (torchrun / --tp-size) do not combine: "
                         "drop --device-map, every rank holds its share of the model")
    return from_pretrained(_source(args), tp_size=group.tp_size, dtype=args.dtype, device=group.device,
                           attention=args.attention, linear=args.linear)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The generation settings given on the command line; the rest come from the model's generation config."""
    given = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                 repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                 compile=args.compile or None)
    return {name: value for name, value in given.items() if value is not None}


def _with_length(options: dict[str, Any], pipe: Any, prompt: str) -> dict[str, Any]:
    """An interactive demo's length when neither the command line nor the model's config gives one:
    64 new tokens, fewer when the model's positions end sooner."""
    own = pipe.model.generation_config
    if "max_new_tokens" in options or own.max_new_tokens is not None or own.max_length is not None:
        return options
    room = pipe.model.spec.decoder.max_positions - len(pipe.tokenizer.encode(prompt))
    return {**options, "max_new_tokens": min(DEFAULT_MAX_NEW_TOKENS, room)} if room > 0 else options


# -- code prompts: stop at the end of the block ----------------------------------------------------------
_CODE_START = re.compile(r"^\s*(def|class|async\s+def|import|from|for|while|if|with|try|@)\b", re.MULTILINE)
_BLOCK_END = re.compile(r"\n[ \t]*\n(?=\S)")  # a blank line, then a line that is not indented


def looks_like_code(prompt: str) -> bool:
    """A Python-looking prompt: a line opening a statement, or a line ending in ':'."""
    return bool(_CODE_START.search(prompt)) or prompt.rstrip().endswith(":")


def code_block(continuation: str) -> str:
    """The continuation up to the end of its code block (the blank line and what follows are cut)."""
    end = _BLOCK_END.search(continuation)
    return continuation if end is None else continuation[:end.start()]


class CodeBlockEnd:
    """Stopping criterion for generate: the row's new text has left the code block."""

    def __init__(self, tokenizer: Any, prompt: str):
        self.tokenizer = tokenizer
        self.prompt_length: int | None = None
        self.prompt = prompt

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_length is None:
            self.prompt_length = ids.shape[1] - 1  # first call: one new token after the prompt
        rows = [[i for i in row if i < len(self.tokenizer)] for row in ids[:, self.prompt_length:].tolist()]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return torch.tensor([_BLOCK_END.search(text) is not None for text in texts])


class CodeBlockPrinter:
    """A streamer sink that prints like ``code_block``: trailing whitespace is held until the next line shows
    whether the block goes on (indented) or has ended (then nothing more is printed)."""

    def __init__(self, prompt: str):
        self.prompt = prompt
        self.text = ""
        self.printed = 0

    def on_text(self, text: str, final: bool) -> None:
        self.text += text
        continuation = self.text[len(self.prompt):] if self.text.startswith(self.prompt) else None
        if continuation is None:  # still inside the prompt
            shown = self.text
        else:
            block = code_block(continuation)
            shown = self.prompt + (block if final or len(block) < len(continuation) else block.rstrip())
        print(shown[self.printed:], end="\n" if final else "", flush=True)
        self.printed = len(shown)
