"""``optkit run``: generate text from the command line (``optkit.cli`` registers it)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from optkit.errors import InputError

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
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand to the ``optkit`` CLI."""
    p = subparsers.add_parser("run", help="generate text with a model (default: the bundled one)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="text-generation", help="pipeline task (supported: text-generation)")
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the bundled model)")
    p.add_argument("--prompt", default=None, help="prompt text (default: one prompt per line of stdin)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: up to 256, within the model's positions)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default 50; 0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy or sampling)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--attention", default=None, help="attention backend, e.g. eager or sdpa")
    p.add_argument("--linear", default=None, help="linear backend, e.g. torch or int8")
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16 or auto")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
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


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def run(args: argparse.Namespace) -> int:
    """Load the pipeline, generate for the prompt, print the full text."""
    from optkit.pipelines import pipeline
    from optkit.streaming import TextStreamer

    prompts = _read_prompts(args)
    if sys.stderr.isatty():
        print(f"optkit: loading {args.model or 'the bundled model'} ...", file=sys.stderr, flush=True)
    pipe = pipeline(args.task, model=args.model, dtype=args.dtype, device=args.device, attention=args.attention,
                    linear=args.linear)
    options: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
                                   no_repeat_ngram_size=args.no_repeat_ngram_size, generator=_generator(args.seed, pipe.model.device))
    if args.compile:
        options["compile"] = True
    for prompt in prompts:  # every prompt is checked before any is printed
        pipe.check(prompt, **options)
    for prompt in prompts:
        if args.stream and args.num_beams == 1:
            pipe(prompt, streamer=TextStreamer(pipe.tokenizer, skip_special_tokens=True), **options)
        else:
            print(pipe(prompt, **options)[0]["generated_text"], flush=True)
    return 0
