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

The plots are drawn from the recorded tables, so they always show the recorded numbers; redraw them without
running anything (``--extra`` adds systems of other tables as points, e.g. a compiled run):

    python benchmarks/bench_generate.py --replot-docs
    python benchmarks/bench_generate.py --replot docs/performance/performance-opt-125m-float16-cuda.md \
        --extra docs/performance/performance-opt-125m-float16-cuda-compile.md --out /tmp
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import optkit
import optkit.inference
from optkit.benchmarking import (PALETTE, Result, generate, machine, measure, memory_bandwidth_gbs,
                                 nice_ticks, peak_rss_of_this_process_mib, prompts, svg_text, system_bytes_per_token,
                                 text_width, tick_label)
from optkit.errors import InputError

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


@dataclass(frozen=True)
class Series:
    """One thing drawn on the context plot: a measured line, separate-run points, or a dashed reference line."""

    name: str
    points: list[tuple[float, float]]
    style: str = "line"  # "line" | "points" | "dashed"
    note: str = ""  # a second, smaller legend line: where the points come from


def svg_plot(series: list[Series], path: Path, title: str, subtitle: str = "") -> None:
    """A dependency-free line chart of decode tokens/s against context length.

    Round ticks on both axes (each ending at its last tick); the legend sits right of the plot and the canvas is
    widened to its longest label, so no text is clipped.
    """
    left, top, plot_w, plot_h, bottom = 64, 58 if subtitle else 40, 520, 260, 46
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_ticks, y_ticks = nice_ticks(max(xs, default=0.0)), nice_ticks(max(ys, default=0.0))
    sx = lambda x: left + plot_w * x / x_ticks[-1]
    sy = lambda y: top + plot_h - plot_h * y / y_ticks[-1]
    legend_x, row, note_row = left + plot_w + 20, 18, 13
    label = max((max(text_width(s.name, 12), text_width(s.note, 10)) for s in series), default=0)
    width = math.ceil(max(legend_x + 30 + label + 10, text_width(title, 14) + 20, text_width(subtitle, 12) + 20))
    legend_h = sum(row + (note_row if s.note else 0) for s in series)
    height = max(top + plot_h + bottom, top + 10 + legend_h)
    bottom_y = top + plot_h
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
             svg_text(width / 2, 20, title, 14, "middle")]
    if subtitle:
        parts.append(svg_text(width / 2, 38, subtitle, 12, "middle"))
    for tick in y_ticks:
        parts.append(f'<line x1="{left}" y1="{sy(tick):.1f}" x2="{left + plot_w}" y2="{sy(tick):.1f}" stroke="#ddd"/>')
        parts.append(svg_text(left - 6, sy(tick) + 4, tick_label(tick, y_ticks[1]), 10, "end"))
    for tick in x_ticks:
        parts.append(svg_text(sx(tick), bottom_y + 15, tick_label(tick, x_ticks[1]), 10, "middle"))
    parts += [f'<line x1="{left}" y1="{bottom_y}" x2="{left + plot_w}" y2="{bottom_y}" stroke="black"/>',
              f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom_y}" stroke="black"/>',
              svg_text(left + plot_w / 2, bottom_y + 36, "context length (prompt tokens)", 12, "middle"),
              svg_text(16, top + plot_h / 2, "decode tokens/s", 12, "middle",
                       f' transform="rotate(-90 16 {top + plot_h / 2:.1f})"')]
    legend_y = top + 10
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        points = sorted(s.points)
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        dash = ' stroke-dasharray="6 4"' if s.style == "dashed" else ""
        if s.style != "points" and len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{line}"/>')
        if s.style != "dashed":
            radius = 5 if s.style == "points" else 3
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" fill="{color}"/>' for x, y in points]
        if s.style == "points":
            parts.append(f'<circle cx="{legend_x + 12}" cy="{legend_y - 4}" r="5" fill="{color}"/>')
        else:
            parts.append(f'<line x1="{legend_x}" y1="{legend_y - 4}" x2="{legend_x + 24}" y2="{legend_y - 4}" '
                         f'stroke="{color}" '
                         f'stroke-width="2"{dash}/>')
        parts.append(svg_text(legend_x + 30, legend_y, s.name, 12, extra=f' fill="{color}"'))
        if s.note:
            parts.append(svg_text(legend_x + 30, legend_y + note_row, s.note, 10, extra=' fill="#555"'))
        legend_y += row + (note_row if s.note else 0)
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# -- plots from the recorded tables ------------------------------------------------------------------------
DOC_PLOTS = {  # the plots docs/ shows: sweep table, tables with extra (separate-run) points, bandwidth line
    "performance-opt-125m-float32-cpu.svg": ("performance-opt-125m-float32-cpu.md", [], True),
    "performance-opt-125m-float16-cuda.svg": ("performance-opt-125m-float16-cuda.md",
                                              ["performance-opt-125m-float16-cuda-compile.md"], False),
}


@dataclass
class Table:
    """A table written by --write-docs, read back: its heading facts and one dict per row."""

    shape: str
    device: str
    dtype: str
    machine: str
    bandwidth_gbs: float
    rows: list[dict[str, str]]

    def decode(self, row: dict[str, str]) -> float:
        """The median decode tokens/s of a row (the cell also holds [min–max])."""
        return float(row["decode tok/s"].split()[0])


def read_table(path: Path) -> Table:
    """Parse a docs/performance/*.md table written by this script (heading, machine, bandwidth, rows)."""
    text = path.read_text(encoding="utf-8")
    heading = re.search(r"^### (\S+) on (\S+): transformers (\S+) vs", text, re.M)
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("| workload | batch | system |")), None)
    if heading is None or header is None:
        raise InputError(f"{path} is not a table written by bench_generate.py --write-docs (no '### <shape> on "
                         "<device>: transformers <dtype> vs' heading or no '| workload | batch | system |' table)")
    names = [cell.strip() for cell in lines[header].strip("|").split("|")]
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (cell.strip() for cell in line.strip("|").split("|")))))
    machine_line = re.search(r"^- machine: (.*)$", text, re.M)
    bandwidth = re.search(r"^- measured read bandwidth.*$", text, re.M)
    gbs = [float(v) for v in re.findall(r"([\d.]+) GB/s", bandwidth.group(0))] if bandwidth else []
    return Table(heading[1], heading[2], heading[3], machine_line[1] if machine_line else "", max(gbs, default=0.0),
                 rows)


def context_rows(table: Table) -> list[dict[str, str]]:
    return [row for row in table.rows if row["workload"].startswith("context ")]


def replot(table_path: Path, svg_path: Path, extra: list[Path] | tuple[Path, ...] = (),
           bandwidth_line: bool = False) -> None:
    """Draw the context sweep of a recorded table (and separate-run points from ``extra`` tables) as SVG.

    The plot is made from the markdown the run wrote, so it always shows the recorded numbers. Systems of an
    ``extra`` table that the sweep lacks (e.g. a compiled variant measured in another run) become points
    labelled with their batch, workload and that run's transformers figure.
    """
    table = read_table(table_path)
    sweep = context_rows(table)
    if not sweep:
        raise InputError(f"{table_path} has no context sweep rows ('context <prompt>+<new>'); replot a table "
                         "written by a run with --long > 0")
    series: dict[str, list[tuple[float, float]]] = {}
    for row in sweep:
        prompt = float(row["workload"].split()[1].split("+")[0])
        series.setdefault(row["system"], []).append((prompt, table.decode(row)))
    drawn = [Series(name, points) for name, points in series.items()]
    for path in extra:
        other = read_table(path)
        reference = {(r["workload"], r["batch"]): table.decode(r) for r in other.rows if r["system"] == "transformers"}
        for row in other.rows:
            if row["system"] in series or row["workload"].startswith("context "):
                continue
            base = reference.get((row["workload"], row["batch"]))
            there = f" (transformers {base:.1f} there)" if base is not None else ""
            note = f"batch {row['batch']}, {row['workload']}, separate run{there}"
            drawn.append(Series(row["system"], [(float(row["workload"].split("+")[0]), other.decode(row))], "points",
                                note))
    if bandwidth_line:
        per_token = [(float(r["workload"].split()[1].split("+")[0]), float(r["bytes/token (MB)"]))
                     for r in sweep if r["system"] == "transformers"]
        drawn.append(Series(f"{table.dtype} weights read at 100 % of the bandwidth",
                            [(x, table.bandwidth_gbs * 1e3 / mb) for x, mb in per_token], "dashed",
                            f"{table.bandwidth_gbs:g} GB/s (torch.sum, same run) / {table.dtype} bytes per token"))
    batches = ", ".join(dict.fromkeys(row["batch"] for row in sweep))
    new = sweep[0]["workload"].split("+")[1]
    title = f"{table.shape}, {table.dtype}, {device_name(table)}, batch {batches}: decode tokens/s"
    subtitle = f"prompt of N tokens, then {new} new; medians of alternating runs ({table_path.name})"
    svg_plot(drawn, svg_path, title, subtitle)


def device_name(table: Table) -> str:
    """'cuda (NVIDIA H200)' or 'cpu (AMD EPYC, 2 threads)' from the table's machine line."""
    fields = [part.strip() for part in table.machine.split(";")]
    gpu = next((f.removeprefix("GPU: ") for f in fields if f.startswith("GPU: ")), "none")
    if table.device.startswith("cuda") and gpu != "none":
        return f"{table.device} ({gpu})"
    threads = next((f.split()[0] for f in fields if f.endswith("torch threads")), None)
    cpu = fields[0] if fields and fields[0] else ""
    details = ", ".join(part for part in (cpu, f"{threads} threads" if threads else "") if part)
    return f"{table.device} ({details})" if details else table.device


def replot_docs(out: Path) -> list[Path]:
    """Redraw every plot docs/ shows from its recorded tables into ``out``."""
    written = []
    for svg, (sweep, extra, bandwidth_line) in DOC_PLOTS.items():
        tables = ROOT / "docs" / "performance"
        replot(tables / sweep, out / svg, [tables / name for name in extra], bandwidth_line)
        written.append(out / svg)
    return written


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
    parser.add_argument("--replot", type=Path, metavar="TABLE.md",
                        help="only redraw the context plot of a recorded table into --out (no benchmark runs)")
    parser.add_argument("--extra", type=Path, nargs="*", default=[], metavar="TABLE.md",
                        help="with --replot: tables whose systems the sweep lacks (e.g. compiled) drawn as points")
    parser.add_argument("--bandwidth-line", action="store_true",
                        help="with --replot: a dashed line at measured bandwidth / bytes per token")
    parser.add_argument("--replot-docs", action="store_true", help="redraw every plot docs/ shows into --out")
    parser.add_argument("--peak-rss", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss:
        return run_peak_rss(args)
    if args.replot_docs or args.replot:
        if args.replot_docs:
            written = replot_docs(args.out)
        else:
            written = [args.out / f"{args.replot.stem}.svg"]
            replot(args.replot, written[0], args.extra, args.bandwidth_line)
        print("\n".join(str(path) for path in written))
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    bandwidth = memory_bandwidth_gbs(args.device)
    systems = load_systems(args.shape, dtype, args.device, args.variants, args.hf_compiled)
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
    for context in args.contexts if args.long else []:
        ids, mask = prompts(1, context, 50272, args.device)
        reps = max(3, args.reps // 2)
        uncompiled = {name: system for name, system in systems.items() if name != HF_COMPILED}  # one compile per length
        results += measure(uncompiled, ids, mask, 32, reps, args.device, f"context {context}+32")
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
    report = render(args, results, bandwidths, systems, same, memory, paths)
    print(report)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.write_docs:
        stem = f"performance-{args.shape}-{args.dtype}-{args.device.split(':')[0]}{args.label}"
        (args.out / "performance").mkdir(parents=True, exist_ok=True)
        (args.out / "performance" / f"{stem}.md").write_text(report)
        if args.long and args.contexts:  # drawn from the table just written, as --replot draws it
            replot(args.out / "performance" / f"{stem}.md", args.out / f"{stem}.svg")


def render(args, results: list[Result], bandwidths: tuple[float, float], systems: dict, same: dict, memory: dict,
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
            per_token = system_bytes_per_token(systems, name, context, batch) / batch
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
    try:
        main()
    except InputError as error:  # a wrong table or flag: one line, not a traceback
        sys.exit(f"bench_generate.py: error: {error}")
