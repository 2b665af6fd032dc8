"""How close one decode-step product gets to memory bandwidth, per OPT weight shape and kernel choice (CUDA or CPU).

Decoding reads every weight once per token, so each projection's achieved GB/s bounds the model's tokens/s.
Prints one line per (shape, batch, form) with the median over many timed calls, and each form's largest
difference from an fp32 product of the same operands (a fast wrong kernel is no choice).

The forms are the kernel choices for a one-row product:
- ``linear+bias``, ``linear``, ``relu epilogue``: the BLAS (cuBLAS GEMV / GEMM with epilogue; MKL on a CPU),
  what the CUDA-graph step runs;
- ``inductor``: the reduction kernel optkit's compiled step emits (``optkit.inference.compiled``: the product as
  an fp32 multiply-and-sum, coordinate-descent tuned), batch 1 only;
- ``inductor split-K S``: the same product reduced in S slices of K first, then over the S partial sums (two
  kernels: more programs for a short, wide matrix), batch 1 only.
Every compiled form compiles once per shape (outside the timing) and is timed over weights rotated past the L2.

    python benchmarks/gemv_probe.py --device cuda --dtype float16 --hidden 2048      # opt-1.3b's shapes
    python benchmarks/gemv_probe.py --device cpu --dtype float32 --hidden 256 --reps 5 --shapes q/k/v/out
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SPLITS = (2, 4, 8)


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


def copy_rate(device: str) -> str:
    """The bandwidth roof of this run: a clone, read + write (1 GiB on CUDA, 256 MiB on a CPU)."""
    big = torch.empty(2**30 if device.startswith("cuda") else 2**28, dtype=torch.uint8, device=device)
    seconds = timed(big.clone, device, 10)
    return f"copy {big.numel() / 2**30:.2f} GiB: {2 * big.numel() / seconds / 1e9:.0f} GB/s (read + write)"


def shapes_of(hidden: int) -> dict[str, tuple[int, int]]:
    d = hidden
    return {"q/k/v/out": (d, d), "fused qkv": (3 * d, d), "fc1": (4 * d, d), "fc2": (d, 4 * d), "lm head": (50272, d)}


def compiled(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``fn`` through optkit's compile backend (inductor, one-row products as tuned reductions)."""
    from optkit.inference.compiled import inductor_with_gemv

    return torch.compile(fn, dynamic=False, backend=inductor_with_gemv)


def split_k(splits: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """bias + x @ w.T with K reduced in ``splits`` slices, then over the partial sums, in fp32."""

    def product(x: Tensor, w: Tensor, bias: Tensor) -> Tensor:
        n, k = w.shape
        partial = (w.float().view(n, splits, k // splits) * x.float().view(1, splits, k // splits)).sum(-1)
        return (partial.sum(-1) + bias.float()).to(x.dtype).view(1, n)

    return product


def forms_for(batch: int, k: int, with_compiled: bool) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    forms: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
        "linear+bias": lambda x, w, b: F.linear(x, w, b),
        "linear": lambda x, w, b: F.linear(x, w),
        "relu epilogue": lambda x, w, b: torch._addmm_activation(b, x, w.t()),
    }
    if batch == 1 and with_compiled:
        forms["inductor"] = compiled(lambda x, w, b: F.linear(x, w, b))
        for splits in SPLITS:
            if k % splits == 0:
                forms[f"inductor split-K {splits}"] = compiled(split_k(splits))
    return forms


def reference(form: str, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    out = x.float() @ w.float().t()
    if form == "linear":
        return out
    out = out + b.float()
    return out.relu() if form == "relu epilogue" else out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--shapes", nargs="+", default=None, help="a subset of: " + ", ".join(shapes_of(1)))
    parser.add_argument("--copies", type=int, default=4, help="weights rotated per call (beats the L2)")
    parser.add_argument("--blas-only", action="store_true", help="no compiled forms (each compiles per shape)")
    args = parser.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), args.device
    print(copy_rate(device))
    shapes = shapes_of(args.hidden)
    rows = []
    for name in args.shapes or list(shapes):
        n, k = shapes[name]
        g = torch.Generator(device=device).manual_seed(0)
        weights = [torch.randn(n, k, dtype=dtype, device=device, generator=g) / k**0.5 for _ in range(args.copies)]
        bias = torch.randn(n, dtype=dtype, device=device, generator=g)
        for batch in args.batch:
            x = torch.randn(batch, k, dtype=dtype, device=device, generator=g)
            for form, op in forms_for(batch, k, not args.blas_only).items():
                error = float((op(x, weights[0], bias).float() - reference(form, x, weights[0], bias)).abs().max())
                calls = [0]

                def run():
                    op(x, weights[calls[0] % args.copies], bias)
                    calls[0] += 1

                seconds = timed(run, device, args.reps)
                rate = n * k * weights[0].element_size() / seconds / 1e9
                rows.append(dict(shape=name, n=n, k=k, batch=batch, form=form, us=seconds * 1e6, gbs=rate,
                                 error=error))
                print(f"{name:10s} {n:6d}x{k:<6d} batch {batch}: {form:20s} {seconds * 1e6:8.1f} us "
                      f"{rate:7.0f} GB/s  max |diff| {error:.2e}")
    return rows


if __name__ == "__main__":
    main()
