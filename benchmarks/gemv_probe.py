"""How close one decode-step GEMV gets to memory bandwidth, per OPT weight shape (CUDA or CPU).

Decoding reads every weight once per token, so each projection's achieved GB/s bounds the model's
tokens/s. Prints one line per (shape, batch, form) with the median over many timed calls.

    python benchmarks/gemv_probe.py --device cuda --dtype float16 --hidden 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    dtype, d = getattr(torch, args.dtype), args.hidden
    big = torch.empty(2**30, dtype=torch.uint8, device=args.device)
    copy_s = timed(lambda: big.clone(), args.device, 10)
    print(f"copy 1 GiB: {2 * big.numel() / copy_s / 1e9:.0f} GB/s (read + write)")
    shapes = {"q/k/v/out": (d, d), "fused qkv": (3 * d, d), "fc1": (4 * d, d), "fc2": (d, 4 * d),
              "lm head": (50272, d)}
    for name, (n, k) in shapes.items():
        weights = [torch.randn(n, k, dtype=dtype, device=args.device) for _ in range(4)]  # rotate: beat the L2
        bias = torch.randn(n, dtype=dtype, device=args.device)
        for batch in args.batch:
            x = torch.randn(batch, k, dtype=dtype, device=args.device)
            forms = {"linear+bias": lambda w: F.linear(x, w, bias), "linear": lambda w: F.linear(x, w),
                     "relu epilogue": lambda w: torch._addmm_activation(bias, x, w.t())}
            for form, op in forms.items():
                calls = [0]

                def run():
                    op(weights[calls[0] % 4])
                    calls[0] += 1

                seconds = timed(run, args.device, args.reps)
                print(f"{name:10s} {n:6d}x{k:<6d} batch {batch}: {form:14s} {seconds * 1e6:8.1f} us "
                      f"{n * k * weights[0].element_size() / seconds / 1e9:7.0f} GB/s")


if __name__ == "__main__":
    main()
