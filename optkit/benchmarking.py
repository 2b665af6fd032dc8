"""optkit's decode speed on this machine, side by side with transformers on the same weights.

``optkit bench`` and ``benchmarks/bench_generate.py`` share this method: every system loads one set of
weights (transformers' tensors shared in memory, or one optkit state dict), warms up (compilations and
graph captures fall there), then the systems alternate A/B/A/B for ``repeats`` rounds; medians are
reported with time to first token, decode tokens/s, peak memory and the fraction of a read bandwidth
measured in the same run. Greedy, with EOS held off, so every system produces the same tokens count.

An optkit variant is ``attention/linear[/compile][/nograph][/nofuse]``: the attention and linear
backends, ``compile`` for ``generate(compile=True)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import optkit
from optkit.errors import InputError

TRANSFORMERS = "transformers"


@dataclass
class Result:
    """One system on one workload: the repeated measurements (medians are derived)."""

    system: str
    workload: str
    batch: int
    prompt: int
    new: int
    ttft_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    weights_mib: float | None = None

    @property
    def decode_median(self) -> float:
        return statistics.median(self.decode_tok_s)

    @property
    def ttft_median(self) -> float:
        return statistics.median(self.ttft_s)


# -- measuring ---------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def memory_bandwidth_gbs(device: str = "cpu", reps: int = 7, gib: float = 1.0) -> float:
    """Read bandwidth (a sum over ``gib``, timed; 4 GiB on CUDA): the roofline of decoding."""
    if device.startswith("cuda"):
        gib = 4.0  # many times the L2
    x = torch.ones(int(gib * 2**30 // 4), dtype=torch.float32, device=device)
    x.sum()
    times = [timed(x.sum, device) for _ in range(reps)]
    return x.numel() * 4 / statistics.median(times) / 1e9


def peak_rss_of_this_process_mib() -> float:
    """VmHWM: unlike ru_maxrss, it starts afresh at exec (ru_maxrss keeps a forking parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompts(batch: int, length: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row i has i*4 pads (batch 1: none)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : min(row * 4, length - 1)] = 0
    return ids.masked_fill(mask == 0, 1).to(device), mask.to(device)


def generate(system: str, model_and_options: tuple[Any, dict], ids: torch.Tensor, mask: torch.Tensor,
             new: int) -> torch.Tensor:
    """Greedy, EOS held off by min_new_tokens so every system produces exactly ``new`` tokens."""
    model, options = model_and_options
    if system.startswith(TRANSFORMERS):
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=1, **options)
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **options)


def measure(systems: dict[str, tuple[Any, dict]], ids: torch.Tensor, mask: torch.Tensor, new: int, reps: int,
            device: str, workload: str) -> list[Result]:
    """Warm every system up on the timed shapes, then alternate them ``reps`` times."""
    results = {name: Result(name, workload, ids.shape[0], ids.shape[1], new) for name in systems}
    for name, system in systems.items():  # compiles and graph captures happen here
        generate(name, system, ids, mask, 1)
        generate(name, system, ids, mask, new)
    for _ in range(reps):
        for name, system in systems.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            ttft = timed(lambda: generate(name, system, ids, mask, 1), device)
            total = timed(lambda: generate(name, system, ids, mask, new), device)
            results[name].ttft_s.append(ttft)
            decode = total - ttft  # a noisy run can make it <= 0: then the whole call's rate, a lower bound
            rate = ids.shape[0] * (new - 1) / decode if decode > 0 and new > 1 else ids.shape[0] * new / total
            results[name].decode_tok_s.append(rate)
            peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                    else peak_rss_of_this_process_mib())
            results[name].peak_mib = max(results[name].peak_mib or 0.0, peak)
    for name, result in results.items():
        result.weights_mib = model_bytes(systems[name][0]) / 2**20
    return list(results.values())


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, each storage once (tied and shared tensors are not counted twice)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def bytes_per_token(model: Any, context: int, batch: int, element: int | None = None) -> float:
    """Bytes one decode step reads: every weight once (the position table: one row) plus the KV cache.

    Weights count at their stored size (an int8 linear's weight one byte each) and the cache at the
    embeddings' dtype. ``element`` counts every value at that size instead: another system over this
    model's shapes (transformers at its own dtype).
    """
    d = model.spec.decoder
    weights = [p for name, p in model.named_parameters() if "embed_positions" not in name]
    kv = 2 * d.num_layers * context * d.hidden_size * batch
    if element is not None:
        return (sum(p.numel() for p in weights) + kv) * element
    cache_element = model.decoder.embed_tokens.weight.element_size()
    return sum(p.numel() * p.element_size() for p in weights) + kv * cache_element


def system_bytes_per_token(systems: dict[str, tuple[Any, dict]], name: str, context: int, batch: int) -> float:
    """:func:`bytes_per_token` of one system: an optkit model reads its own stored weights; transformers
    reads the same shapes at its dtype (measured on the first optkit model, which has them)."""
    model = systems[name][0]
    if not name.startswith(TRANSFORMERS):
        return bytes_per_token(model, context, batch)
    ours = next(m for n, (m, _) in systems.items() if not n.startswith(TRANSFORMERS))
    return bytes_per_token(ours, context, batch, next(model.parameters()).element_size())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return f"{cpu}; {torch.get_num_threads()} torch threads; GPU: {gpu}"


# -- the systems ------------------------------------------------------------------------------------
def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def usable_variants(device: str, dtype: torch.dtype, *, compile: bool = True) -> list[str]:
    """Every backend combination that can run here: attention x linear x (eager | compiled) step."""
    from optkit import registry
    from optkit.inference.policy import compiler_available

    linears = ["torch"]
    if ("linear", "onednn") in registry and not registry.reasons_unavailable("linear", "onednn", device, dtype):
        linears.append("onednn")
    attentions = [a for a in ("sdpa", "eager")
                  if ("attention", a) in registry and not registry.reasons_unavailable("attention", a, device, dtype)]
    steps = [""] + (["/compile"] if compile and compiler_available(torch.device(device).type) else [])
    return [f"{a}/{lin}{step}" for step in steps for lin in linears for a in attentions]


def check_variant(variant: str) -> tuple[str, str, list[str]]:
    attention, _, rest = variant.partition("/")
    linear, _, flags = rest.partition("/")
    flag_list = [f for f in flags.split("/") if f]
    unknown = [f for f in flag_list if f not in {"compile", "nograph", "nofuse"}]
    if not attention or not linear or unknown:
        raise InputError(f"--variants: {variant[:100]!r} is not attention/linear[/compile|nograph|nofuse] "
                         "(e.g. sdpa/torch/compile)")
    return attention, linear, flag_list


def reference_model(spec: Any, dtype: torch.dtype, device: str, seed: int = 0) -> Any:
    """transformers' model of ``spec`` (an OPT-family spec) with seeded random weights, built on ``device``."""
    import transformers

    from optkit.checkpoints import hf_config_from_spec

    config = hf_config_from_spec(spec, dtype)
    architecture = (config.get("architectures") or ["OPTForCausalLM"])[0]
    hf_config = transformers.AutoConfig.for_model(
        config["model_type"], **{k: v for k, v in config.items() if k not in {"model_type", "architectures"}})
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, architecture)(hf_config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def load_systems(source: str, dtype: torch.dtype, device: str, variants: list[str], against: bool,
                 *, is_checkpoint: bool) -> dict[str, tuple[Any, dict]]:
    """name -> (model, generate keywords): transformers (when ``against``) and one optkit model per variant,
    all on the same weights."""
    import optkit.inference

    systems: dict[str, tuple[Any, dict]] = {}
    hf = None
    if against and is_checkpoint:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    elif against:
        hf = reference_model(optkit.load_spec(source), dtype, device)
    if hf is not None:
        systems[TRANSFORMERS] = (hf, {})
    base_state = None
    for variant in variants:
        attention, linear, flags = check_variant(variant)
        if hf is not None:
            model = optkit.from_transformers(hf, dtype=dtype, attention=attention, linear=linear)
        elif is_checkpoint:
            model = optkit.from_pretrained(source, dtype=dtype, device=device, attention=attention, linear=linear)
        else:  # a preset: fresh weights, drawn once and loaded into every variant
            torch.manual_seed(0)
            model = optkit.build(source, dtype=dtype, device=device, attention=attention, linear=linear).eval()
            if base_state is None:
                base_state = model.state_dict()
            else:
                model.load_state_dict(base_state)
        optkit.inference.restore(model)
        optkit.inference.prepare(model, stack_projections="nofuse" not in flags)
        options: dict[str, Any] = {"decode_graph": False} if "nograph" in flags else {}
        if "compile" in flags:
            options["compile"] = True
        systems[f"optkit {variant}"] = (model, options)
    return systems


# -- reporting -------------------------------------------------------------------------------------
def rows(results: list[Result], bandwidth_gbs: float, systems: dict[str, tuple[Any, dict]]) -> list[dict[str, Any]]:
    """One dict per system and workload: the fields of the table and of ``--json``."""
    table = []
    by_workload: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        by_workload.setdefault((r.workload, r.batch), {})[r.system] = r
    for (workload, batch), group in by_workload.items():
        reference = group.get(TRANSFORMERS)
        for name, r in group.items():
            per_token = system_bytes_per_token(systems, name, r.prompt + r.new // 2, batch) / batch
            effective = per_token * r.decode_median / 1e9
            table.append({
                "workload": workload, "batch": batch, "system": name,
                "ttft_ms": round(r.ttft_median * 1e3, 2), "decode_tok_s": round(r.decode_median, 2),
                "decode_tok_s_min": round(min(r.decode_tok_s), 2), "decode_tok_s_max": round(max(r.decode_tok_s), 2),
                "vs_transformers": None if reference is None else round(r.decode_median / reference.decode_median, 3),
                "bandwidth_pct": round(100 * effective / bandwidth_gbs, 1) if bandwidth_gbs > 0 else None,
                "peak_mib": None if r.peak_mib is None else round(r.peak_mib, 1),
                "weights_mib": None if r.weights_mib is None else round(r.weights_mib, 1),
                "repeats": len(r.decode_tok_s),
            })
    return table


def render_table(table: list[dict[str, Any]], device: str) -> str:
    peak = "peak GPU MiB" if device.startswith("cuda") else "process peak RSS MiB"
    lines = [f"| workload | batch | system | time to first token (ms) | decode tok/s [min–max] | vs transformers "
             f"| % of bandwidth | weights MiB | {peak} |", "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        ratio = "—" if row["vs_transformers"] is None else f"{row['vs_transformers']:.2f}x"
        pct = "—" if row["bandwidth_pct"] is None else f"{row['bandwidth_pct']:.0f}%"
        lines.append(f"| {row['workload']} | {row['batch']} | {row['system']} | {row['ttft_ms']:.1f} "
                     f"| {row['decode_tok_s']:.1f} [{row['decode_tok_s_min']:.1f}–{row['decode_tok_s_max']:.1f}] "
                     f"| {ratio} | {pct} | {row['weights_mib']:.1f} | {row['peak_mib']:.0f} |")
    return "\n".join(lines)


# -- plots (plain SVG: no plotting library, so `optkit bench --plot` works on a bare install) -------------
CHAR_WIDTH = 0.6  # x the font size: a generous average glyph width of sans-serif text
PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def text_width(text: str, font_size: float) -> float:
    """Approximate rendered width of ``text``: SVG has no text metrics without a renderer, so layouts reserve this."""
    return CHAR_WIDTH * font_size * len(text)


def nice_ticks(top: float, count: int = 6) -> list[float]:
    """Axis ticks 0, s, 2s, ... up to the first tick at or above ``top``, where the step s is 1, 2 or 5 x 10^k.

    The step is the smallest such number giving at most ``count`` intervals, so the axis ends on a round tick
    and its labels read as round numbers (22, 45, 67 ... become 0, 20, 40 ...).
    """
    if not math.isfinite(top) or top <= 0:
        return [0.0, 1.0]
    raw = top / max(1, count)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    intervals = max(1, math.ceil(top / step * (1 - 1e-12)))
    return [float(f"{i * step:.12g}") for i in range(intervals + 1)]


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as the tick step needs (0.5 -> one decimal, 20 -> none)."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{value:.{decimals}f}"


def svg_text(x: float, y: float, text: str, size: float, anchor: str = "start", extra: str = "") -> str:
    """One ``<text>`` element, escaped, with rounded coordinates."""
    attributes = f' text-anchor="{anchor}"' if anchor != "start" else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}"{attributes} font-size="{size:g}"{extra}>{_xml(text)}</text>')


def svg_bars(table: list[dict[str, Any]], path: Path, title: str) -> None:
    """A dependency-free horizontal bar chart of decode tokens/s, one bar per system and batch.

    The canvas grows to fit the longest bar label and the title; a second title line names the batch sizes and
    workloads, and the value axis has round ticks ending at the last one.
    """
    bar, gap, top, plot_width = 18, 6, 58, 400
    labels = [f"{row['system']}, batch {row['batch']}" for row in table]
    values = [f"{row['decode_tok_s']:.1f}" for row in table]
    batches = ", ".join(str(b) for b in dict.fromkeys(row["batch"] for row in table))
    workloads = ", ".join(dict.fromkeys(str(row["workload"]) for row in table))
    subtitle = f"batch {batches}; prompt+new tokens {workloads}; medians"
    left = 10 + max((text_width(label, 11) for label in labels), default=0) + 8
    right = max((text_width(value, 11) for value in values), default=0) + 16
    ticks = nice_ticks(max((row["decode_tok_s"] for row in table), default=0.0))
    width = math.ceil(max(left + plot_width + right, text_width(title, 14) + 20, text_width(subtitle, 12) + 20))
    axis_y = top + len(table) * (bar + gap)
    height = axis_y + 50
    scale = plot_width / ticks[-1]
    systems = list(dict.fromkeys(row["system"] for row in table))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
             svg_text(width / 2, 20, title, 14, "middle"), svg_text(width / 2, 38, subtitle, 12, "middle")]
    for tick in ticks:
        x = left + tick * scale
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_y}" stroke="#ddd"/>')
        parts.append(svg_text(x, axis_y + 14, tick_label(tick, ticks[1]), 10, "middle"))
    for i, (row, label, value) in enumerate(zip(table, labels, values)):
        y = top + i * (bar + gap)
        length = row["decode_tok_s"] * scale
        color = PALETTE[systems.index(row["system"]) % len(PALETTE)]
        parts.append(svg_text(left - 6, y + bar - 5, label, 11, "end"))
        parts.append(f'<rect x="{left}" y="{y}" width="{length:.1f}" height="{bar}" fill="{color}"/>')
        parts.append(svg_text(left + length + 4, y + bar - 5, value, 11))
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_width}" y2="{axis_y}" stroke="black"/>')
    parts.append(svg_text(left + plot_width / 2, axis_y + 34, "decode tokens/s (median)", 12, "middle"))
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- the whole run -------------------------------------------------------------------------------------
@dataclass
class BenchReport:
    """What ``optkit bench`` prints and writes."""

    header: list[str]
    table: list[dict[str, Any]]
    bandwidth_gbs: float
    same_tokens: dict[str, bool]
    notes: list[str]

    def text(self, device: str) -> str:
        return "\n".join(self.header + [""] + [render_table(self.table, device)] + [""] + self.notes) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {"header": self.header, "bandwidth_gbs": round(self.bandwidth_gbs, 2), "same_tokens": self.same_tokens,
                "rows": self.table, "notes": self.notes}


def run(source: str, *, is_checkpoint: bool, dtype: torch.dtype, device: str, batches: list[int], prompt: int,
        new: int, repeats: int, against: bool, variants: list[str] | None, compile: bool = True) -> BenchReport:
    """Load the systems, check the tokens, measure every batch size: the report ``optkit bench`` prints."""
    notes = []
    if against and not transformers_installed():
        against = False
        notes.append("transformers is not installed: optkit alone (pip install transformers to compare)")
    variants = variants or usable_variants(device, dtype, compile=compile)
    for variant in variants:
        check_variant(variant)
    if not is_checkpoint:  # a preset: its positions are known before anything is built
        _check_length(prompt, new, optkit.load_spec(source).decoder.max_positions)
    bandwidth = memory_bandwidth_gbs(device, reps=3, gib=0.25 if device == "cpu" else 1.0)
    systems = load_systems(source, dtype, device, variants, against, is_checkpoint=is_checkpoint)
    ours = next(model for name, (model, _) in systems.items() if not name.startswith(TRANSFORMERS))
    vocab = ours.spec.decoder.vocab_size
    _check_length(prompt, new, ours.spec.decoder.max_positions)
    same = {}
    if TRANSFORMERS in systems and dtype == torch.float32:
        ids, mask = prompts(1, prompt, vocab, device)
        expected = generate(TRANSFORMERS, systems[TRANSFORMERS], ids, mask, new)
        same = {name: bool(torch.equal(generate(name, system, ids, mask, new), expected))
                for name, system in systems.items() if name != TRANSFORMERS}
    results: list[Result] = []
    for batch in batches:
        ids, mask = prompts(batch, prompt, vocab, device)
        results += measure(systems, ids, mask, new, repeats, device, f"{prompt}+{new}")
    header = [f"optkit bench: {source} ({str(dtype).removeprefix('torch.')}) on {device}",
              f"- machine: {machine()}",
              f"- versions: optkit {optkit.__version__}, torch {torch.__version__}"
              + (f", transformers {_version('transformers')}" if TRANSFORMERS in systems else "")
              + f", python {platform.python_version()}",
              f"- measured read bandwidth (torch.sum): {bandwidth:.1f} GB/s",
              f"- {repeats} alternating repetitions after a warm-up (compilation there); medians"]
    if same:
        header.append("- greedy tokens identical to transformers: "
                      + ", ".join(f"{name}: {ok}" for name, ok in same.items()))
    if any("compile" in v for v in variants):
        from optkit.inference import compile_cache

        directory = compile_cache.cache_directory()
        notes.append(f"compile cache: {directory or 'off (OPTKIT_COMPILE_CACHE=0)'}; this run loaded "
                     f"{compile_cache.stats['loaded']} and saved {compile_cache.stats['saved']} entries")
    return BenchReport(header, rows(results, bandwidth, systems), bandwidth, same, notes)


def _check_length(prompt: int, new: int, positions: int) -> None:
    if prompt + new > positions:
        raise InputError(f"--prompt-len {prompt} + --new-tokens {new} exceeds the model's {positions} positions; "
                         "use shorter ones")


def _version(module: str) -> str:
    return getattr(importlib.import_module(module), "__version__", "?")

