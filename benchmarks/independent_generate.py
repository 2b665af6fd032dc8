"""Independent side-by-side check of plain ``generate()`` against transformers (issue 16, "Done means").

``optkit bench`` / optkit/benchmarking.py produce the figures in docs/performance.md; this script cross-checks
them, so it deliberately does not import optkit.benchmarking and keeps its own few lines of timing. transformers
writes one checkpoint with seeded random fp32 weights (``save_pretrained``, safetensors); optkit and transformers
each load that directory the way a user does — ``optkit.from_pretrained(dir)`` and
``AutoModelForCausalLM.from_pretrained(dir)``, no other arguments — and decode greedily, alternating.

    python benchmarks/independent_generate.py                          # opt-125m, batch 1 (128+64) and 8 (128+32)
    python benchmarks/independent_generate.py --first-call --json independent.json
    python benchmarks/independent_generate.py --tiny --repeats 1 --prompt-len 8 --new-tokens 4   # smoke test

Time to first token is the wall time of a generate() with one new token; decode tok/s is
batch * (new - 1) / (t_full - t_first). ``--first-call`` also times the first generate() of fresh processes
(issue 16 target 2: compilation, if any, counts; import and load do not, load is printed apart). The exit
status is 1 when the fp32 greedy tokens of the two systems differ at any batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

SHAPES = {  # OPTConfig fields of the published checkpoints
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
}
COMMON = dict(vocab_size=50272, max_position_embeddings=2048)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=1024,
            max_position_embeddings=256)
SYSTEMS = ("optkit", "transformers")
PAD = 1  # OPT's pad id; prompts draw ids >= 4 so no special token appears in them


def write_checkpoint(config_fields: dict[str, Any], directory: Path, seed: int) -> None:
    """Seeded random fp32 weights at the shape, saved by transformers as a user's checkpoint would be."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**config_fields)).float().eval()
    model.save_pretrained(directory, safe_serialization=True)


def load(system: str, directory: Path) -> Any:
    """The plain, default load path of each library: nothing optkit-specific is passed."""
    if system == "optkit":
        import optkit

        return optkit.from_pretrained(directory)
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory)


def prompt(batch: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded random prompts, identical for both systems, with an all-ones attention mask."""
    ids = torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def generate(system: str, model: Any, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy, exactly ``new`` tokens (EOS held off), as each library's users call it."""
    if system == "optkit":
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
    return model.generate(ids, attention_mask=mask, do_sample=False, min_new_tokens=new, max_new_tokens=new,
                          pad_token_id=PAD)


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_workload(models: dict[str, Any], batch: int, length: int, new: int, vocab: int,
                     repeats: int) -> dict[str, Any]:
    """Warm up each system once (and compare their greedy tokens), then alternate them for ``repeats`` rounds,
    flipping the order each round so neither always runs first on a warm cache."""
    ids, mask = prompt(batch, length, vocab, seed=batch)
    tokens = {}
    for system, model in models.items():
        generate(system, model, ids, mask, 1)
        tokens[system] = generate(system, model, ids, mask, new)
    ttft: dict[str, list[float]] = {s: [] for s in models}
    decode: dict[str, list[float]] = {s: [] for s in models}
    for round_ in range(repeats):
        for system in (SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]):
            model = models[system]
            first = timed(lambda: generate(system, model, ids, mask, 1))
            full = timed(lambda: generate(system, model, ids, mask, new))
            ttft[system].append(first * 1000)
            decode[system].append(batch * (new - 1) / max(full - first, 1e-9))
    return {"batch": batch, "prompt_len": length, "new_tokens": new,
            "same_tokens": torch.equal(tokens["optkit"], tokens["transformers"]),
            "ttft_ms": {s: spread(v) for s, v in ttft.items()},
            "decode_tok_s": {s: spread(v) for s, v in decode.items()}}


def child(args: argparse.Namespace) -> None:
    """Fresh-process mode: load, then time only the first generate() call; one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load(args.child, Path(args.dir))
    load_s = time.perf_counter() - start
    ids, mask = prompt(1, args.prompt_len, args.vocab, seed=1)
    first_s = timed(lambda: generate(args.child, model, ids, mask, args.new))
    print(json.dumps({"load_s": load_s, "first_generate_s": first_s}))


def run_child(system: str, directory: Path, args: argparse.Namespace, length: int, new: int, vocab: int) -> dict:
    """One fresh interpreter for ``system``; a hung or failed child ends the run with its stderr."""
    command = [sys.executable, __file__, "--child", system, "--dir", str(directory), "--threads", str(args.threads),
               "--prompt-len", str(length), "--new", str(new), "--vocab", str(vocab)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout)
    if done.returncode != 0:
        raise SystemExit(f"independent_generate.py: the fresh {system} process failed (exit {done.returncode}):\n"
                         f"{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_first_call(directory: Path, args: argparse.Namespace, length: int, new: int, vocab: int) -> dict:
    """Issue 16 target 2: fresh processes, alternating optkit / transformers, ``repeats`` each."""
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for round_ in range(args.repeats):
        for system in (SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]):
            runs[system].append(run_child(system, directory, args, length, new, vocab))
    return {"prompt_len": length, "new_tokens": new,
            "first_generate_s": {s: spread([r["first_generate_s"] for r in v]) for s, v in runs.items()},
            "load_s": {s: spread([r["load_s"] for r in v]) for s, v in runs.items()}}


def machine(threads: int) -> str:
    """CPU model, cores and versions: the line a reader needs to compare this run with another."""
    cpu = platform.processor() or "unknown CPU"
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import optkit
    import transformers

    return (f"machine: {cpu}; {os.cpu_count()} cores; {threads} torch threads; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, optkit {optkit.__version__}, Python {platform.python_version()}")


def cell(s: dict[str, float], digits: int) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}–{s['max']:.{digits}f}]"


def table(workloads: list[dict], first_call: dict | None) -> str:
    """One markdown table: one row per measure, the two systems side by side, medians [min–max]."""
    lines = ["| measure | batch | prompt+new | transformers | optkit | optkit/transformers |", "|---|---|---|---|---|---|"]

    def row(name: str, batch: int, workload: str, stats: dict, digits: int) -> None:
        ratio = stats["optkit"]["median"] / stats["transformers"]["median"]
        lines.append(f"| {name} | {batch} | {workload} | {cell(stats['transformers'], digits)} | "
                     f"{cell(stats['optkit'], digits)} | {ratio:.2f}x |")

    for w in workloads:
        workload = f"{w['prompt_len']}+{w['new_tokens']}"
        row("time to first token (ms)", w["batch"], workload, w["ttft_ms"], 1)
        row("decode tok/s", w["batch"], workload, w["decode_tok_s"], 1)
    if first_call:
        workload = f"{first_call['prompt_len']}+{first_call['new_tokens']}"
        row("first generate() of a fresh process (s)", 1, workload, first_call["first_generate_s"], 2)
        row("load in that process (s, not in the row above)", 1, workload, first_call["load_s"], 2)
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="opt-125m")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy shape for the smoke test")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 at batch 1, else 32 (issue 16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--first-call", action="store_true", help="also time the first generate() of fresh processes")
    p.add_argument("--child-timeout", type=float, default=600.0, help="seconds per fresh process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)  # internal: the fresh-process mode
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--new", type=int, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.prompt_len < 1 or args.repeats < 1 or (args.new_tokens or 2) < 2:
        p.error("--batch, --prompt-len and --repeats must be >= 1 and --new-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    torch.set_num_threads(args.threads)
    fields = dict(TINY) if args.tiny else {**COMMON, **SHAPES[args.shape]}
    vocab = fields["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="independent_generate_") as tmp:
        directory = Path(tmp)
        write_checkpoint(fields, directory, args.seed)
        models = {system: load(system, directory) for system in SYSTEMS}
        workloads = [measure_workload(models, b, args.prompt_len, args.new_tokens or (64 if b == 1 else 32), vocab,
                                      args.repeats) for b in args.batch]
        del models
        first_call = (measure_first_call(directory, args, args.prompt_len, args.new_tokens or 64, vocab)
                      if args.first_call else None)
    name = "tiny" if args.tiny else args.shape
    print(f"### plain generate(), {name} shape, fp32, optkit vs transformers (medians of {args.repeats})\n")
    where = machine(args.threads)
    print(f"- {where}")
    for w in workloads:
        print(f"- batch {w['batch']}: greedy tokens identical: {'yes' if w['same_tokens'] else 'NO'}")
    print()
    print(table(workloads, first_call))
    if args.json:
        args.json.write_text(json.dumps({"shape": name, "machine": where, "repeats": args.repeats,
                                         "workloads": workloads, "first_call": first_call}, indent=2) + "\n")
    return 0 if all(w["same_tokens"] for w in workloads) else 1


if __name__ == "__main__":
    sys.exit(main())
