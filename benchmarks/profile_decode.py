"""Where one decode step's time goes: every kernel of a decode step, its time, and the bytes the step must read.

The decode-bandwidth targets (issue "GPU proof": >= 50 % of HBM bandwidth at opt-1.3b, >= 70 % at opt-6.7b, fp16,
batch 1) are met or missed by the kernels inside one step. This script names them, so a gap is explained even
where it is not closed: how much of the step is one-row products (cuBLAS GEMV or inductor's reductions), how
much attention, norms, pointwise work and copies, and how much is no kernel at all (launch gaps).

Method. Random weights at a real OPT shape, built directly on the device. After a warm-up that captures the
CUDA graph (and compiles the step with ``--compile``), ``generate`` runs twice under torch.profiler: once for one
new token and once for 1 + N. The prefill and the first token are common to both, so the difference, divided by
N, is exactly N decode steps' kernels; the same difference of wall times (synchronised) is the step time. Kernels
launched from a CUDA graph are recorded by CUPTI like any other. On a CPU the "kernels" are the aten operators'
self times (a smoke run of the same code; CPU decode is profiled better with ``optkit bench``).

    python benchmarks/profile_decode.py --device cuda --dtype float16 --shape opt-1.3b            # CUDA graph
    python benchmarks/profile_decode.py --device cuda --dtype float16 --shape opt-1.3b --compile  # + inductor
    python benchmarks/profile_decode.py --shape opt-tiny --steps 4                                # CPU smoke
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import optkit
import optkit.inference
from optkit.benchmarking import bytes_per_token, machine, memory_bandwidth_gbs

# Kernel name -> what it does. First match wins; names are cuBLAS/CUTLASS, inductor (triton_*), flash and
# aten's own kernels. Anything else is "other" and printed by name anyway.
CATEGORIES = (
    ("one-row product (inductor reduction)", r"^triton_(red|per)_"),
    ("pointwise (inductor)", r"^triton_poi_"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matrix product (cuBLAS/CUTLASS/aten)", r"gemv|gemm|sm\d+_xmma|cutlass|cublas|ampere_|sm90|splitK|dot_kernel|"
                                        r"^aten::(addmm|mm|bmm|baddbmm)$"),  # not linear/matmul: wrappers
    ("norm", r"norm"),
    ("copy / cache write", r"copy|memcpy|memset|index_put|scatter|cat|^aten::(copy_|index_copy_|slice_scatter)$"),
    ("pointwise (aten)", r"elementwise|vectorized|unrolled|^aten::(add|mul|relu|gelu|silu|div|sub)_?$"),
)


@dataclass
class Kernel:
    name: str
    calls: float  # per decode step
    micros: float  # per decode step

    @property
    def category(self) -> str:
        for label, pattern in CATEGORIES:
            if re.search(pattern, self.name, flags=re.IGNORECASE):
                return label
        return "other"


def kernel_times(prof, device: str) -> dict[str, tuple[int, float]]:
    """name -> (calls, self microseconds) of device kernels (CUDA) or aten operators (CPU)."""
    out: dict[str, tuple[int, float]] = {}
    for event in prof.key_averages():
        if device == "cuda":
            if event.device_type != DeviceType.CUDA or event.self_device_time_total <= 0:
                continue
            micros = event.self_device_time_total
        else:
            if event.device_type != DeviceType.CPU or not event.key.startswith("aten::"):
                continue
            micros = event.self_cpu_time_total
        calls, total = out.get(event.key, (0, 0.0))
        out[event.key] = (calls + event.count, total + micros)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profiled_generate(model, ids: torch.Tensor, new: int, options: dict, device: str):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, eos_token_id=[], **options)
        sync(device)
        seconds = time.perf_counter() - start
    return kernel_times(prof, device), seconds


def timed_generate(model, ids: torch.Tensor, new: int, options: dict, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, eos_token_id=[], **options)
    sync(device)
    return time.perf_counter() - start


def step_kernels(short: dict, long: dict, steps: int) -> list[Kernel]:
    """Kernels of ``steps`` decode steps: the long run minus the short one, per step, largest first."""
    kernels = []
    for name in set(short) | set(long):
        calls = (long.get(name, (0, 0.0))[0] - short.get(name, (0, 0.0))[0]) / steps
        micros = (long.get(name, (0, 0.0))[1] - short.get(name, (0, 0.0))[1]) / steps
        if calls > 0 or micros > 0.05:
            kernels.append(Kernel(name, calls, micros))
    return sorted(kernels, key=lambda k: -k.micros)


def build(args: argparse.Namespace):
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = optkit.build(args.shape, dtype=dtype, device=args.device, attention=args.attention,
                         linear=args.linear).eval()
    return optkit.inference.prepare(model)


def report(args: argparse.Namespace, kernels: list[Kernel], step_ms: float, profiled_step_ms: float,
           bytes_step: float, bandwidth: float, path: str) -> str:
    kernel_ms = sum(k.micros for k in kernels) / 1e3
    achieved = bytes_step / (step_ms / 1e3) / 1e9
    lines = [
        f"# One decode step: {args.shape}, {args.dtype}, batch 1, {args.device}, {path}",
        "",
        f"Machine: {machine() if args.device == 'cpu' else torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"optkit {optkit.__version__}; attention {args.attention}, linear {args.linear}; prompt {args.prompt} "
        f"tokens, {args.steps} profiled steps.",
        "",
        f"- step time (median of {args.reps} unprofiled runs): **{step_ms:.3f} ms** "
        f"({1e3 / step_ms:.1f} tok/s); under the profiler {profiled_step_ms:.3f} ms",
        f"- bytes one step must read: {bytes_step / 2**20:.1f} MiB -> {achieved:.1f} GB/s, "
        f"**{100 * achieved / bandwidth:.0f} %** of the {bandwidth:.1f} GB/s read bandwidth measured in this run",
        f"- time in kernels: {kernel_ms:.3f} ms per step ({100 * kernel_ms / profiled_step_ms:.0f} % of the profiled "
        f"step); the rest is launch gaps and host work",
        f"- kernels per step: {sum(k.calls for k in kernels):.0f}",
        "",
        "| what | kernels per step | ms per step | share of kernel time |",
        "|---|---|---|---|",
    ]
    by_category: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for k in kernels:
        by_category[k.category][0] += k.calls
        by_category[k.category][1] += k.micros
    for label, (calls, micros) in sorted(by_category.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {label} | {calls:.0f} | {micros / 1e3:.3f} | {100 * micros / 1e3 / kernel_ms:.0f} % |")
    lines += ["", f"Largest {args.top} kernels:", "", "| kernel | what | calls per step | µs per step | µs per call |",
              "|---|---|---|---|---|"]
    for k in kernels[:args.top]:
        per_call = k.micros / k.calls if k.calls else float("nan")
        lines.append(f"| `{k.name[:90]}` | {k.category} | {k.calls:.1f} | {k.micros:.1f} | {per_call:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="opt-1.3b", help="an optkit preset (opt-tiny, opt-125m, opt-1.3b, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--linear", default="torch")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (generate(compile=True))")
    parser.add_argument("--nograph", action="store_true", help="no CUDA-graph step (decode_graph=False)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32, help="decode steps in the profiled difference")
    parser.add_argument("--reps", type=int, default=5, help="unprofiled repetitions for the step time")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.dtype == "float16":
        args.dtype = "float32"  # half precision decode on a CPU measures nothing this script is for

    model = build(args)
    options = {"compile": True} if args.compile else {}
    if args.nograph:
        options["decode_graph"] = False
    vocab = model.spec.decoder.vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(args.device)
    for new in (1, 1 + args.steps, 1 + args.steps):  # warm-up: graph capture, compilation, allocator
        timed_generate(model, ids, new, options, args.device)

    short, short_s = profiled_generate(model, ids, 1, options, args.device)
    long, long_s = profiled_generate(model, ids, 1 + args.steps, options, args.device)
    kernels = step_kernels(short, long, args.steps)
    steps_ms = []
    for _ in range(args.reps):  # alternate, so drift hits both alike
        one = timed_generate(model, ids, 1, options, args.device)
        many = timed_generate(model, ids, 1 + args.steps, options, args.device)
        steps_ms.append((many - one) / args.steps * 1e3)
    session = model.inference_session
    kept = session.kept_step if session is not None else None
    path = ("compiled step in a CUDA graph" if args.compile and kept is not None and kept.graph is not None else
            "CUDA graph" if kept is not None and kept.graph is not None else
            "compiled step" if args.compile else "eager loop")
    text = report(args, kernels, statistics.median(steps_ms), (long_s - short_s) / args.steps * 1e3,
                  bytes_per_token(model, args.prompt + args.steps // 2, 1),
                  memory_bandwidth_gbs(args.device), path)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
