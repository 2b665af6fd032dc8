"""``optkit bench``: decode speed of every usable backend combination here, next to transformers.

What ``llama-bench`` is to llama.cpp: the first thing to run to choose settings. The method is
:mod:`optkit.benchmarking`'s (same weights, alternating systems, medians).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optkit.errors import InputError

DTYPES = ["float32", "bfloat16", "float16"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="decode speed of every usable backend here, side by side with transformers")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="a checkpoint directory or Hub id (its real weights)")
    source.add_argument("--preset", default=None, help="a preset name (random weights at its shape; default opt-125m)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to measure (e.g. 1 8)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="alternating repetitions per workload (medians)")
    p.add_argument("--against", default="transformers", choices=["transformers", "none"],
                   help="compare with transformers when it is installed (default) or run optkit alone")
    p.add_argument("--variants", nargs="+", default=None,
                   help="optkit systems, each attention/linear[/compile] (default: every usable combination)")
    p.add_argument("--no-compile", action="store_true", help="leave the compiled-step variants out (no compile wait)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--plot", type=Path, default=None, help="write an SVG bar chart of decode tokens/s here")
    p.add_argument("--json", type=Path, default=None, help="write the table and the run's facts as JSON here")
    p.set_defaults(func=_cmd_bench)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise InputError(f"{name}: expected a positive integer, got {value}")


def _writable(name: str, path: Path | None) -> None:
    """Refuse an output path whose directory is missing before minutes of measurement, not after."""
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        why = "is a directory" if path.is_dir() else f"goes into {str(path.parent)!r}, which is no directory"
        raise InputError(f"{name} {str(path)!r} {why}; pass a file in an existing directory")


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from optkit import benchmarking

    for name, value in (("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens),
                        ("--repeats", args.repeats), *(("--batch", b) for b in args.batch)):
        _positive(name, value)
    if args.threads is not None:
        _positive("--threads", args.threads)
    for name, path in (("--json", args.json), ("--plot", args.plot)):
        _writable(name, path)
    if args.threads:
        torch.set_num_threads(args.threads)
    from optkit.cli import _device

    device = _device(args.device)
    source = args.model or args.preset or "opt-125m"
    report = benchmarking.run(source, is_checkpoint=args.model is not None, dtype=getattr(torch, args.dtype),
                              device=device, batches=args.batch, prompt=args.prompt_len, new=args.new_tokens,
                              repeats=args.repeats, against=args.against == "transformers", variants=args.variants,
                              compile=not args.no_compile)
    print(report.text(device), end="")
    if args.json:
        args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    if args.plot:
        benchmarking.svg_bars(report.table, args.plot, f"{source} {args.dtype} on {device}: decode tokens/s")
    return 0
