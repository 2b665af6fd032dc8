"""optkit vs transformers on the same weights: prefill latency, decode tokens/s, memory, bandwidth use.

The method lives in optkit.benchmarking (shared with `optkit bench`, the user-facing form); this script
adds what the project's docs need: real OPT shapes, the context sweep, fresh-process memory and
--write-docs. Not a test: a user runs it and reads the table. Both systems load one checkpoint (random weights
at real OPT shapes), warm up, then alternate A/B/A/B; medians and spread are reported together
with a memory bandwidth measured in the same run.

    python benchmarks/bench_generate.py --shape opt-125m --dtype float32 --batch 1 8 --write-docs
    python benchmarks/bench_generate.py --device cuda --shape opt-125m --dtype float16 \
        --variants sdpa/torch/float16 sdpa/torch/float16/nograph --hf-compiled

An optkit variant is ``attention/linear/dtype``; further fields ``nograph`` (no CUDA-graph decode
step) and ``nofuse`` (q/k/v stay three GEMMs) turn optimisations off for comparison; ``compile``
compiles the decode step with torch.compile (inductor) before it is captured (its compilation
falls in the warm-up, outside the timed runs). ``--hf-compiled`` adds transformers' best setting (static cache, which makes its
``generate`` compile the decode step with torch.compile "reduce-overhead" on CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

import optkit
import optkit.inference
from optkit.benchmarking import (Result, bytes_per_token, generate, machine, measure, memory_bandwidth_gbs,
                                 peak_rss_of_this_process_mib, prompts)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # transformers OPTConfig fields of the real checkpoints
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
}
HF_COMPILED = "transformers static+compile"


def hf_model(shape: str, dtype: torch.dtype, device: str):
    """transformers' OPT at a real shape with random weights, created directly on ``device`` in ``dtype``."""
    import transformers

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.OPTForCausalLM(transformers.OPTConfig(**SHAPES[shape]))
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def load_systems(shape: str, dtype: torch.dtype, device: str, variants: list[str], hf_compiled: bool) -> dict:
    """name -> (model, generate keywords): transformers at ``dtype`` and one optkit model per variant.

    optkit takes transformers' tensors in memory (shared where device and dtype agree), so both
    systems run the very same weights.
    """
    hf = hf_model(shape, dtype, device)
    systems = {"transformers": (hf, {})}
    if hf_compiled:
        systems[HF_COMPILED] = (hf, {"cache_implementation": "static"})
    for variant in variants:
        attention, linear, variant_dtype, *flags = variant.split("/")
        model = optkit.from_transformers(hf, dtype=getattr(torch, variant_dtype), attention=attention, linear=linear)
        optkit.inference.restore(model)
        optkit.inference.prepare(model, stack_projections="nofuse" not in flags)  # nofuse: q/k/v as three GEMMs
        options = {"decode_graph": False} if "nograph" in flags else {}
        if "compile" in flags:
            options["compile"] = True
        systems[f"optkit {variant}"] = (model, options)
    return systems


def cuda_working_memory_mib(systems: dict, ids, mask, new: int) -> dict[str, float]:
    """Peak memory one generate() allocates beyond what was already allocated (weights, kept graphs)."""
    memory = {}
    for name, system in systems.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        generate(name, system, ids, mask, new)
        torch.cuda.synchronize()
        memory[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return memory


def decode_path(model) -> str:
    """Whether optkit's last decode ran as a captured CUDA graph (see optkit.inference)."""
    session = model.inference_session
    kept = session.kept_step if session is not None else None
    return "CUDA graph" if kept is not None and kept.graph is not None else "eager loop"


def peak_rss_mib(system: str, directory: Path, args: argparse.Namespace) -> float:
    """Peak resident memory of loading + one generate() in a fresh process (CPU)."""
    command = [sys.executable, __file__, "--peak-rss", system, "--checkpoint", str(directory), "--dtype", args.dtype,
               "--device", args.device, "--prompt", str(args.prompt), "--new", str(args.new)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_peak_rss(args: argparse.Namespace) -> None:
    import transformers

    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_rss == "transformers":
        model = transformers.OPTForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(args.device).eval()
    else:
        attention, linear, variant_dtype, *flags = args.peak_rss.removeprefix("optkit ").split("/")
        model = optkit.from_pretrained(args.checkpoint, dtype=getattr(torch, variant_dtype), device=args.device,
                                       attention=attention, linear=linear)
    ids, mask = prompts(1, args.prompt, 50272, args.device)
    options = {"compile": True} if args.peak_rss != "transformers" and "compile" in flags else {}
    generate(args.peak_rss, (model, options), ids, mask, args.new)  # with compile: compilation's peak included
    print(peak_rss_of_this_process_mib())


def svg_plot(points: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """A dependency-free line chart of tokens/s against context length."""
    width, height, pad = 640, 360, 50
    xs = [x for series in points.values() for x, _ in series]
    ys = [y for series in points.values() for _, y in series]
    x_max, y_max = max(xs), max(ys) * 1.1
    sx = lambda x: pad + (width - 2 * pad) * x / x_max
    sy = lambda y: height - pad - (height - 2 * pad) * y / y_max
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle" font-size="12">context length (tokens)</text>',
             f'<text x="15" y="{height / 2}" font-size="12" transform="rotate(-90 15 {height / 2})">decode tokens/s</text>']
    for tick in range(0, 6):
        y = y_max * tick / 5
        parts.append(f'<text x="{pad - 5}" y="{sy(y) + 4}" text-anchor="end" font-size="10">{y:.0f}</text>')
    for x in sorted(set(xs)):
        parts.append(f'<text x="{sx(x)}" y="{height - pad + 15}" text-anchor="middle" font-size="10">{x}</text>')
    for i, (name, series) in enumerate(points.items()):
        series = sorted(series)
        path_d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in series)
        parts.append(f'<polyline fill="none" stroke="{colors[i % len(colors)]}" stroke-width="2" points="{path_d}"/>')
        parts.append(f'<text x="{width - pad - 150}" y="{pad + 15 * i}" fill="{colors[i % len(colors)]}" font-size="12">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="opt-125m", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=["sdpa/torch/float32"],
                        help="optkit models to compare, each attention/linear/dtype[/nograph|nofuse|compile] (e.g. sdpa/onednn/bfloat16)")
    parser.add_argument("--hf-compiled", action="store_true",
                        help="also transformers with a static cache (compiled decode step on CUDA)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--long", type=int, default=1900, help="prompt length of the long-context case (0: skip)")
    parser.add_argument("--contexts", type=int, nargs="*", default=[128, 512, 1024, 1900])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (CPU: RSS of fresh processes)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true", help="write docs/performance/*.md and the plot")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where --write-docs writes")
    parser.add_argument("--label", default="", help="suffix of the --write-docs file names")
    parser.add_argument("--peak-rss", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss:
        return run_peak_rss(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    bandwidth = memory_bandwidth_gbs(args.device)
    systems = load_systems(args.shape, dtype, args.device, args.variants, args.hf_compiled)
    ours = next(model for name, (model, _) in systems.items() if name.startswith("optkit"))
    elements = {name: next(model.parameters()).element_size() for name, (model, _) in systems.items()}
    ids, mask = prompts(1, 32, 50272, args.device)
    reference = generate("transformers", systems["transformers"], ids, mask, 16)
    same = {name: torch.equal(generate(name, system, ids, mask, 16), reference)
            for name, system in systems.items() if name.startswith("optkit")}
    results: list[Result] = []
    paths: dict[str, str] = {}
    for batch in args.batch:
        ids, mask = prompts(batch, args.prompt, 50272, args.device)
        results += measure(systems, ids, mask, args.new, args.reps, args.device, f"{args.prompt}+{args.new}")
        if args.device.startswith("cuda"):
            paths.update({f"{name}, batch {batch}": decode_path(model) for name, (model, _) in systems.items()
                          if name.startswith("optkit")})
    curve: dict[str, list[tuple[int, float]]] = {name: [] for name in systems if name != HF_COMPILED}
    for context in args.contexts if args.long else []:
        ids, mask = prompts(1, context, 50272, args.device)
        reps = max(3, args.reps // 2)
        uncompiled = {name: system for name, system in systems.items() if name != HF_COMPILED}  # one compile per length
        for r in measure(uncompiled, ids, mask, 32, reps, args.device, f"context {context}+32"):
            results.append(r)
            curve[r.system].append((context, r.decode_median))
    memory = {}
    if args.memory and args.device.startswith("cuda"):
        ids, mask = prompts(1, args.prompt, 50272, args.device)
        memory = cuda_working_memory_mib(systems, ids, mask, args.new)
    elif args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            systems["transformers"][0].save_pretrained(tmp)
            memory = {name: peak_rss_mib(name, Path(tmp), args) for name in systems if name != HF_COMPILED}
    # a shared machine's bandwidth drifts during a long run: measure again and take the higher (the stricter roofline)
    bandwidths = (bandwidth, memory_bandwidth_gbs(args.device))
    report = render(args, results, bandwidths, ours, same, memory, elements, paths)
    print(report)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.write_docs:
        stem = f"performance-{args.shape}-{args.dtype}-{args.device.split(':')[0]}{args.label}"
        (args.out / "performance").mkdir(parents=True, exist_ok=True)
        if any(curve.values()):
            svg_plot(curve, args.out / f"{stem}.svg", f"{args.shape} {args.dtype} on {args.device}: decode tokens/s")
        (args.out / "performance" / f"{stem}.md").write_text(report)


def render(args, results: list[Result], bandwidths: tuple[float, float], ours, same: dict, memory: dict, elements: dict,
           paths: dict) -> str:
    import transformers

    lines = [f"### {args.shape} on {args.device}: transformers {args.dtype} vs optkit {', '.join(args.variants)}", "",
             f"- machine: {machine()}",
             f"- versions: optkit {optkit.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
             f"python {platform.python_version()}",
             f"- measured read bandwidth (torch sum over {'4' if args.device.startswith('cuda') else '1'} GiB): "
             f"{bandwidths[0]:.1f} GB/s at the start, {bandwidths[1]:.1f} GB/s at the end; percentages below are of the "
             f"higher",
             "- greedy tokens identical to transformers (16 tokens, batch 1): "
             + ", ".join(f"{name}: {equal}" for name, equal in same.items()),
             f"- {args.reps} alternating repetitions per workload; medians, [min–max] in brackets", "",
             "| workload | batch | system | time to first token (ms) | decode tok/s | vs transformers | bytes/token (MB) | effective GB/s | % of bandwidth |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_key: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        by_key.setdefault((r.workload, r.batch), {})[r.system] = r
    for (workload, batch), pair in by_key.items():
        for name, r in pair.items():
            context = r.prompt + r.new // 2
            per_token = bytes_per_token(ours, context, batch, elements[name]) / batch
            effective = per_token * r.decode_median / 1e9
            ratio = r.decode_median / pair["transformers"].decode_median
            lines.append(
                f"| {workload} | {batch} | {name} | {r.ttft_median * 1e3:.1f} [{min(r.ttft_s) * 1e3:.1f}–{max(r.ttft_s) * 1e3:.1f}] "
                f"| {r.decode_median:.1f} [{min(r.decode_tok_s):.1f}–{max(r.decode_tok_s):.1f}] | {ratio:.2f}x "
                f"| {per_token / 1e6:.0f} | {effective:.1f} | {100 * effective / max(bandwidths):.0f}% |")
    if paths:
        lines += ["", "optkit decode path: " + ", ".join(f"{k}: {v}" for k, v in paths.items())]
    if memory:
        what = ("Peak GPU memory one generate() allocated beyond the resident weights"
                if args.device.startswith("cuda") else "Peak resident memory of one generate() in a fresh process")
        lines += ["", f"{what} ({args.prompt}+{args.new}, batch 1): "
                  + ", ".join(f"{k} {v:.0f} MiB" for k, v in memory.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
