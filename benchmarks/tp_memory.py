"""Peak host memory (VmHWM) of one rank loading a checkpoint, plain and with ``tp_size=N`` (slice-wise loading).

Writes a random-weight fp32 checkpoint of a preset's shape (sharded safetensors, one shard per few layers, so
writing it never holds the model), then loads it in fresh processes: once plainly (``from_pretrained(path)``)
and once per rank of an N-process gloo group (``from_pretrained(path, tp_size=N)``). Each process reports
its peak resident set (``VmHWM`` of /proc/self/status, after reading every weight it holds once, as a first
forward pass would) and the parameter bytes it holds.

    python benchmarks/tp_memory.py --preset opt-1.3b --dir /tmp/opt13b-random --tp 2

Needs the checkpoint's size on disk and about that much free memory (opt-1.3b fp32: 5.3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

LAYERS_PER_FILE = 4


def vm_hwm_bytes() -> int:
    """This process's peak resident set size (bytes), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def write_random_checkpoint(preset: str | dict, directory: Path, *, seed: int = 0) -> int:
    """A transformers-layout fp32 checkpoint of ``preset``'s shape with random weights; returns its bytes.

    The model is built on "meta" and each file's tensors are drawn just before that file is written.
    """
    from safetensors.torch import save_file

    import optkit
    from optkit.checkpoints import hf_config_from_spec, hf_key
    from optkit.formats import format_for_spec

    directory.mkdir(parents=True, exist_ok=True)
    model = optkit.build(preset, device="meta")
    fmt = format_for_spec(model.spec)
    names = {key: hf_key(fmt, key, model.head.checkpoint_prefix, base_model=False)
             for key in model.state_dict() if not (model.head.tied and key == "head.weight")}
    groups: dict[str, list[str]] = {}
    for key in names:
        parts = key.split(".")
        layer = int(parts[2]) // LAYERS_PER_FILE if key.startswith("decoder.layers.") else -1
        groups.setdefault(str(layer), []).append(key)
    shapes = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for number, keys in enumerate(groups.values(), 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {names[k]: (torch.randn(shapes[k].shape, generator=generator) * 0.02) for k in keys}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config_from_spec(model.spec, torch.float32)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return total


def load_and_report(path: str, tp_size: int | None, out: str) -> None:
    """One process: load (within the group torchrun-style environment variables describe), report as JSON."""
    import torch.distributed as dist

    import optkit
    from optkit.parallel import local_parameter_bytes

    torch.set_num_threads(1)
    if tp_size is not None:
        dist.init_process_group("gloo")
    before = vm_rss_bytes()
    started = time.perf_counter()
    model = optkit.from_pretrained(path, tp_size=tp_size)
    seconds = time.perf_counter() - started
    touch(model)
    report = {"rank": dist.get_rank() if tp_size else 0, "tp_size": tp_size or 1, "rss_before": before,
              "peak_rss": vm_hwm_bytes(), "parameter_bytes": local_parameter_bytes(model), "seconds": seconds}
    Path(out).write_text(json.dumps(report))
    if tp_size is not None:
        dist.barrier()
        dist.destroy_process_group()


def touch(model: torch.nn.Module) -> None:
    """Read every byte of every parameter this rank holds. A plain CPU load in the file's dtype keeps views of
    the memory-mapped files, which become resident only when read: without this, its peak would miss them."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for param in model.parameters():
            (param.to_local() if isinstance(param, DTensor) else param).sum()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(path: Path, tp_size: int | None, *, timeout: float = 1800) -> list[dict]:
    """Spawn the process(es) of one measurement and collect their reports (one per rank)."""
    world = tp_size or 1
    port = free_port()
    outs = [path.parent / f".tp_memory_{world}_{rank}.json" for rank in range(world)]
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import tp_memory; "
                f"tp_memory.load_and_report({str(path)!r}, {tp_size!r}, {str(outs[rank])!r})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env))
    try:
        for proc in procs:
            if proc.wait(timeout=timeout) != 0:
                raise RuntimeError(f"a measuring process failed (exit {proc.returncode})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    reports = [json.loads(out.read_text()) for out in outs]
    for out in outs:
        out.unlink()
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="opt-1.3b")
    parser.add_argument("--dir", type=Path, required=True, help="where the random checkpoint is (or is written)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    if not (args.dir / "config.json").is_file():
        size = write_random_checkpoint(args.preset, args.dir)
        print(f"wrote {args.dir}: {size / 2**30:.2f} GiB", flush=True)
    gib = 2**30
    rows = [("plain", measure(args.dir, None))] + [(f"tp_size={n}", measure(args.dir, n)) for n in args.tp]
    baseline = rows[0][1][0]["peak_rss"]
    print("| load | rank | parameter bytes | peak RSS (VmHWM) | RSS before loading | vs plain | load time |")
    print("|---|---|---|---|---|---|---|")
    for label, reports in rows:
        for r in reports:
            print(f"| {label} | {r['rank']} | {r['parameter_bytes'] / gib:.2f} GiB | {r['peak_rss'] / gib:.2f} GiB "
                  f"| {r['rss_before'] / gib:.2f} GiB | {r['peak_rss'] / baseline:.2f}x | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
