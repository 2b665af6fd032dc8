"""Offloaded decoding: optkit's device maps next to transformers + Accelerate with the same map, same weights.

Not a test: a GPU session runs it and reads the table. One checkpoint with random weights at a real OPT
shape is written to a temporary directory; then, for each map (every unit on the compute device, the second
half of the layers streamed from "cpu", the same from "disk"), optkit and transformers + Accelerate load it
with that map and decode greedily from the same prompt. Reported per row: decode tokens/s (median over
``--reps``), whether the tokens equal optkit's all-on-device run, and for offloaded maps the bytes streamed
per token and the host-to-device rate that implies, next to the host-to-device bandwidth measured in the
same run (pinned memory, one large copy): offloaded decoding at batch 1 is transfer-bound.

    python benchmarks/bench_offload.py --device cuda --shape opt-6.7b --out /tmp/offload      # the GPU run
    python benchmarks/bench_offload.py --device cpu --shape opt-tiny --dtype float32 --new 4  # a smoke test

On the CPU "cpu" units are resident (the CPU computes), so only the disk map streams: the smoke test checks
the plumbing and the token comparison, not speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import optkit

SHAPES = ("opt-tiny", "opt-125m", "opt-1.3b", "opt-6.7b")  # optkit presets (the real checkpoints' shapes)
MAPS = ("all-on-device", "half-cpu", "half-disk")


@dataclass
class Row:
    system: str
    device_map: str
    decode_tok_s: list[float] = field(default_factory=list)
    tokens_equal: bool | None = None  # to optkit's all-on-device tokens
    streamed_bytes_per_token: int = 0
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.decode_tok_s) if self.decode_tok_s else float("nan")

    @property
    def achieved_gbs(self) -> float:
        return self.streamed_bytes_per_token * self.median / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    """Give back what the model just measured held, so the next map starts from an empty device."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def host_to_device_gbs(device: str, gib: float = 1.0, reps: int = 5) -> float | None:
    """Pinned host -> device copy rate (GB/s, 10^9): the ceiling for streaming offloaded weights."""
    if not device.startswith("cuda"):
        return None
    host = torch.empty(int(gib * 2**30), dtype=torch.uint8).pin_memory()
    target = torch.empty_like(host, device=device)
    target.copy_(host, non_blocking=True)
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return host.numel() / statistics.median(times) / 1e9


def write_checkpoint(shape: str, dtype: torch.dtype, device: str, directory: Path) -> int:
    """A random-weight checkpoint at ``shape`` (initialised on ``device`` for speed); returns its layer count."""
    torch.manual_seed(0)
    model = optkit.build(shape, device=device, dtype=dtype).eval()
    layers = len(model.decoder.layers)
    model.save_pretrained(directory)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return layers


def device_maps(layers: int, compute: int | str) -> dict[str, dict[str, object]]:
    """optkit maps by name: everything on the compute device, or the second half of the layers on cpu / disk."""
    half = {f"decoder.layers.{i}" for i in range(layers // 2, layers)}
    return {"all-on-device": {"": compute},
            "half-cpu": {"": compute, **dict.fromkeys(sorted(half), "cpu")},
            "half-disk": {"": compute, **dict.fromkeys(sorted(half), "disk")}}


def hf_device_map(per_unit: dict[str, object]) -> dict[str, object]:
    """optkit's resolved {unit: device} in transformers' OPTForCausalLM module names."""
    names = {"head": "lm_head"}
    return {names.get(unit, f"model.{unit}"): device for unit, device in per_unit.items()}


def streamed_bytes(model: optkit.Model) -> int:
    """Bytes of the units streamed per forward (what crosses to the compute device for each token)."""
    compute = model.placement.compute_devices
    total = 0
    for unit, device in model.device_map.items():
        if device == "disk" or (device == "cpu" and compute[unit].type != "cpu"):
            module = model.get_submodule(unit)
            total += sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return total


def decode_rates(generate, ids: torch.Tensor, new: int, device: str, reps: int) -> list[float]:
    """Decoded tokens per second, one figure per rep: (new - 1) / (time for ``new`` tokens - time for 1), so the
    prefill cancels out (a rep where noise makes the difference non-positive is dropped)."""
    seconds = [timed_generate(generate, ids, new, device) for _ in range(reps)]
    return [1 / s for s in seconds if s > 0]


def timed_generate(generate, ids: torch.Tensor, new: int, device: str) -> float:
    """Seconds per decoded token: (time for ``new`` tokens - time for 1) / (new - 1), prefill cancelling out."""
    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        generate(ids, n)
        sync(device)
        return time.perf_counter() - start

    run(2)  # warm-up
    one, many = run(1), run(new)
    return (many - one) / (new - 1)


def bench_optkit(ckpt: Path, name: str, device_map: dict, dtype: torch.dtype, ids: torch.Tensor, args,
                 folder: Path) -> tuple[Row, torch.Tensor, dict]:
    model = optkit.from_pretrained(ckpt, dtype=dtype, device_map=device_map, offload_folder=folder / f"optkit-{name}")
    ids = ids.to(model.device)

    def generate(x: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=[])

    tokens = generate(ids, args.new).cpu()
    row = Row("optkit", name, streamed_bytes_per_token=streamed_bytes(model) if name != "all-on-device" else 0)
    row.decode_tok_s = decode_rates(generate, ids, args.new, args.device, args.reps)
    return row, tokens, dict(model.device_map)


def bench_transformers(ckpt: Path, name: str, per_unit: dict, dtype: torch.dtype, ids: torch.Tensor, args,
                       folder: Path, streamed: int) -> tuple[Row, torch.Tensor | None]:
    row = Row("transformers + Accelerate", name, streamed_bytes_per_token=streamed)
    try:
        import accelerate  # noqa: F401 - transformers' device_map needs it
        import transformers
    except ImportError as error:
        row.note = f"not run: {error}"
        return row, None
    model = transformers.OPTForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map=hf_device_map(per_unit),
                                                        offload_folder=str(folder / f"hf-{name}")).eval()
    model.generation_config.eos_token_id = None  # decode exactly ``new`` tokens, as optkit's eos_token_id=[]
    model.generation_config.pad_token_id = model.config.pad_token_id
    first = next(iter(per_unit.values()))
    ids = ids.to(f"cuda:{first}" if isinstance(first, int) else "cpu")
    mask = torch.ones_like(ids)

    def generate(x: torch.Tensor, n: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(x, attention_mask=mask, max_new_tokens=n, do_sample=False)

    tokens = generate(ids, args.new).cpu()
    row.decode_tok_s = decode_rates(generate, ids, args.new, args.device, args.reps)
    return row, tokens


def render(args, rows: list[Row], h2d: float | None) -> str:
    lines = [f"## Offloaded decoding: {args.shape}, {args.dtype}, batch 1, prompt {args.prompt}, {args.new} new tokens",
             "", f"{machine(args.device)}; host-to-device bandwidth measured (pinned, 1 GiB): "
             + (f"{h2d:.1f} GB/s" if h2d else "n/a (no accelerator)"), "",
             "| system | device map | decode tok/s | tokens = optkit all-on-device | streamed / token "
             "| achieved GB/s | of measured H2D |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.decode_tok_s:
            lines.append(f"| {r.system} | {r.device_map} | {r.note or 'no timing (noise)'} | | | | |")
            continue
        streamed = f"{r.streamed_bytes_per_token / 2**20:.0f} MiB" if r.streamed_bytes_per_token else "-"
        achieved = f"{r.achieved_gbs:.2f}" if r.streamed_bytes_per_token else "-"
        share = f"{100 * r.achieved_gbs / h2d:.0f}%" if r.streamed_bytes_per_token and h2d else "-"
        equal = {True: "yes", False: "NO", None: "-"}[r.tokens_equal]
        lines.append(f"| {r.system} | {r.device_map} | {r.median:.2f} | {equal} | {streamed} | {achieved} | {share} |")
    return "\n".join(lines) + "\n"


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="opt-6.7b", choices=SHAPES)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--maps", nargs="+", default=list(MAPS), choices=MAPS)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="optkit only")
    parser.add_argument("--out", type=Path, default=None, help="write bench_offload.json and bench_offload.md here")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and offload files go "
                        "(default: a temporary directory, removed afterwards)")
    args = parser.parse_args(argv)
    if args.new < 2:
        parser.error("--new must be at least 2 (decode speed is measured past the first token)")
    dtype = getattr(torch, args.dtype)
    compute: int | str = 0 if args.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        layers = write_checkpoint(args.shape, dtype, args.device, work / "ckpt")
        h2d = host_to_device_gbs(args.device)
        vocab = json.loads((work / "ckpt" / "config.json").read_text())["vocab_size"]
        ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        rows: list[Row] = []
        reference: torch.Tensor | None = None
        for name in args.maps:
            device_map = device_maps(layers, compute)[name]
            row, tokens, per_unit = bench_optkit(work / "ckpt", name, device_map, dtype, ids, args, work)
            reference = tokens if reference is None and name == "all-on-device" else reference
            row.tokens_equal = None if reference is None else torch.equal(tokens, reference)
            rows.append(row)
            free_memory(args.device)
            print(f"optkit {name}: {row.median:.2f} tok/s", file=sys.stderr, flush=True)
            if not args.no_transformers:
                hf_row, hf_tokens = bench_transformers(work / "ckpt", name, per_unit, dtype, ids, args, work,
                                                       row.streamed_bytes_per_token)
                if hf_tokens is not None and reference is not None:
                    hf_row.tokens_equal = torch.equal(hf_tokens, reference)
                rows.append(hf_row)
                free_memory(args.device)
                print(f"transformers {name}: {hf_row.median:.2f} tok/s {hf_row.note}", file=sys.stderr, flush=True)
    table = render(args, rows, h2d)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"shape": args.shape, "dtype": args.dtype, "device": args.device, "prompt": args.prompt,
                  "new": args.new, "host_to_device_gbs": h2d,
                  "rows": [{**asdict(r), "median_tok_s": r.median, "achieved_gbs": r.achieved_gbs} for r in rows]}
        (args.out / "bench_offload.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "bench_offload.md").write_text(table)
    optkit_rows = [r for r in rows if r.system == "optkit" and r.tokens_equal is not None]
    return 0 if all(r.tokens_equal for r in optkit_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
