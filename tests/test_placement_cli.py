"""Planning a checkpoint directory, ``optkit run --device-map``, prefetching streamed units (CPU order here,
overlap and tokens on CUDA), and the offload benchmark's smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import optkit
from optkit.cli import main
from optkit.errors import CheckpointError, InputError
from optkit.placement import dispatch, plan
from optkit.placement.dispatcher import _host_copy, prefetcher_of
from tests.helpers import make_text_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _model(layers: int = 4) -> optkit.Model:
    torch.manual_seed(0)
    return optkit.build({"extends": "opt-tiny", "decoder": {"init_std": 0.2, "num_layers": layers}}).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "opt"
    _model().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def half_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt16") / "opt16"
    _model().to(torch.float16).save_pretrained(directory)
    return directory


def _file_bytes(directory: Path) -> int:
    """Bytes of every tensor stored in the checkpoint (the tied head is stored once: the embedding)."""
    total = 0
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for key in f.keys():
            tensor = f.get_slice(key)
            shape, dtype = tensor.get_shape(), tensor.get_dtype()
            numel = 1
            for size in shape:
                numel *= size
            total += numel * {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    return total


# -- planning a checkpoint ------------------------------------------------------------------------------
def test_plan_of_a_checkpoint_counts_its_tensors_in_its_own_dtype(checkpoint: Path, half_checkpoint: Path):
    for directory, dtype in ((checkpoint, "float32"), (half_checkpoint, "float16")):
        result = plan(directory, max_memory={"cpu": "1GiB"})
        assert result.dtype == dtype and result.model == str(directory)
        assert result.weight_bytes == _file_bytes(directory)
    assert plan(half_checkpoint, dtype="float32", max_memory={"cpu": "1GiB"}).weight_bytes == _file_bytes(checkpoint)


def test_plan_of_a_checkpoint_reads_only_its_config(checkpoint: Path, tmp_path: Path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((checkpoint / "config.json").read_text())
    (config_only / "model.safetensors").write_bytes(b"not a safetensors file: never opened")
    assert plan(config_only, max_memory={"cpu": "1GiB"}).weight_bytes == _file_bytes(checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty has no config.json"):
        plan(empty)
    (empty / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json holds a JSON list"):
        plan(empty)


@pytest.mark.parametrize(("batch", "length"), [(1, 16), (3, 100)])
def test_kv_cache_bytes_per_device_follow_batch_and_max_length(checkpoint: Path, batch: int, length: int):
    d = optkit.from_pretrained(checkpoint, device="meta").spec.decoder
    per_layer = 2 * batch * d.num_heads * length * d.head_dim * 4  # fp32 checkpoint
    result = plan(checkpoint, batch=batch, max_length=length, max_memory={"cpu": "1GiB", "disk": "1GiB"},
                  device_map={"": "cpu", "decoder.layers.3": "disk"})
    cpu, disk = result.devices
    assert cpu.kv_cache_bytes == 4 * per_layer and disk.kv_cache_bytes == 0  # the streamed layer computes on cpu
    sequential = plan(checkpoint, batch=batch, max_length=length, max_memory={"cpu": "1GiB"})
    assert sequential.devices[0].kv_cache_bytes == 4 * per_layer


@pytest.mark.parametrize("strategy", ["sequential", "auto"])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16-auto"])
def test_the_plan_of_a_checkpoint_is_the_map_from_pretrained_uses(strategy: str, half: bool, checkpoint: Path,
                                                                   half_checkpoint: Path, tmp_path: Path):
    directory = half_checkpoint if half else checkpoint
    # fp32: input units 164 KiB, a layer 131 KiB + its KV cache (128 positions) 64 KiB: two layers stay on the
    # cpu with room for one streamed layer and the caches of two; fp16 halves every figure
    budget = {"cpu": 425_000 if half else 850_000, "disk": "1GiB"}
    planned = plan(directory, max_memory=budget, device_map=strategy)
    assert set(planned.device_map.values()) == {"cpu", "disk"}  # the budget forces some units to disk
    loaded = optkit.from_pretrained(directory, dtype="auto" if half else None, device_map=strategy,
                                    max_memory=budget, offload_folder=tmp_path)
    assert loaded.device_map == planned.device_map
    reference = optkit.from_pretrained(directory, dtype="auto" if half else None)
    ids = torch.randint(3, 500, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.generate(ids, max_new_tokens=5), reference.generate(ids, max_new_tokens=5))


def test_a_cached_hub_id_is_planned_and_an_uncached_one_is_refused(checkpoint: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--opt-planned" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((checkpoint / "config.json").read_text())
    (cache / "models--acme--opt-planned" / "refs").mkdir()
    (cache / "models--acme--opt-planned" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: real(repo_id, cache_dir=str(cache), **kw))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert plan("acme/opt-planned", max_memory={"cpu": "1GiB"}).weight_bytes == _file_bytes(checkpoint)
    with pytest.raises(InputError, match=r"'acme/opt-elsewhere' is not a preset, a spec file or a checkpoint "
                                         r"directory, and not in the Hugging Face cache"):
        plan("acme/opt-elsewhere")


def test_optkit_plan_command_takes_a_checkpoint_directory(checkpoint: Path, half_checkpoint: Path, capsys):
    assert main(["plan", str(half_checkpoint), "--max-memory", "cpu=1GiB", "--batch", "2", "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{half_checkpoint}  dtype=float16  batch=2  max_length=64")
    d = optkit.from_pretrained(half_checkpoint, device="meta").spec.decoder
    kv = 4 * 2 * 2 * d.num_heads * 64 * d.head_dim * 2  # 4 layers, keys and values, batch 2, 64 positions, fp16
    assert f"{kv / 2**10:.2f}KiB" in out
    assert main(["plan", str(checkpoint), "--dtype", "bfloat16", "--max-memory", "cpu=1GiB"]) == 0
    assert "dtype=bfloat16" in capsys.readouterr().out
    assert main(["plan", str(checkpoint / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_the_plan_table_never_runs_a_layer_range_across_a_layer_placed_elsewhere(checkpoint: Path):
    result = plan(checkpoint, max_memory={"cpu": "1GiB", "disk": "1GiB"},
                  device_map={"": "cpu", "decoder.layers.1": "disk"})
    cpu_line = next(line for line in str(result).splitlines() if line.strip().startswith("'cpu'"))
    assert "decoder.layers.0, decoder.layers.2-3," in cpu_line


# -- optkit run --device-map -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_model_dir(tmp_path_factory.mktemp("text_model"))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["run", "--prompt", "Hello world", "--max-new-tokens", "10", "--no-stream", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("placement", [
    ("--device-map", '{"": "cpu", "decoder.layers.1": "disk"}'),
    ("--device-map", "sequential", "--max-memory", "cpu=420KiB,disk=1GiB"),
], ids=["explicit", "sequential-budget"])
def test_optkit_run_with_a_device_map_prints_it_and_the_same_text(placement, text_model: Path, tmp_path: Path,
                                                                  capsys):
    plain = _run(capsys, "--model", str(text_model))
    placed = _run(capsys, "--model", str(text_model), *placement, "--offload-folder", str(tmp_path), "-v")
    assert placed[0] == 0 and placed[1] == plain[1]
    err = placed[2]
    assert "device map (6 units, compute on 'cpu'):" in err
    assert "decoder.layers.1          'disk'" in err and "'disk'  weights" in err and "'cpu'  weights" in err
    assert [p.suffix for p in tmp_path.iterdir()] and all(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    quiet = _run(capsys, "--model", str(text_model), *placement, "--offload-folder", str(tmp_path / "quiet"))
    assert quiet[1] == plain[1] and "device map" not in quiet[2]


@pytest.mark.parametrize(("argv", "named"), [
    (("--max-memory", "cpu=1GiB"), "--max-memory places a model only with --device-map"),
    (("--offload-folder", "x"), "--offload-folder places a model only with --device-map"),
    (("--device-map", "auto", "--device", "cpu"), "--device 'cpu' and --device-map"),
    (("--device-map", "everywhere"), "--device-map: 'everywhere' is not one of auto, balanced, sequential"),
    (("--device-map", "{\"\": cpu}"), "--device-map: '{\"\": cpu}' is not valid JSON"),
    (("--device-map", "auto", "--max-memory", "cpu:1GiB"), "--max-memory: 'cpu:1GiB' is not DEVICE=SIZE"),
    (("--device-map", "auto", "--max-memory", "cpu=1GiB,cpu=2GiB"), "--max-memory: device 'cpu' is given twice"),
    (("--device-map", '{"": "disk"}'), "pass offload_folder="),
])
def test_optkit_run_refuses_placement_options_that_do_not_go_together(argv, named, text_model: Path, capsys):
    code, out, err = _run(capsys, "--model", str(text_model), *argv)
    assert code == 2 and out == "" and named in err


# -- prefetch ---------------------------------------------------------------------------------------------
def _streamed_on_disk() -> dict[str, str]:
    return {"": "cpu", "decoder.layers.1": "disk", "decoder.layers.2": "disk", "decoder.layers.3": "disk",
            "head": "cpu"}


def test_prefetch_order_on_cpu_loads_the_next_unit_before_the_current_one_finishes(tmp_path: Path):
    """``prefetch=True`` on the CPU runs the CUDA schedule synchronously: same outputs, and the trace shows each
    streamed unit's copy issued before the previous one's compute ends; nothing stays loaded afterwards."""
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = _model()
    with torch.no_grad():
        expected = reference(ids).logits
    plain = dispatch(_model(), _streamed_on_disk(), offload_folder=tmp_path / "plain")
    assert prefetcher_of(plain) is None  # the cpu computes: no prefetch unless asked for
    model = dispatch(_model(), _streamed_on_disk(), offload_folder=tmp_path / "fetch", prefetch=True)
    prefetcher = prefetcher_of(model)
    assert [site.name for site in prefetcher.sites] == ["decoder.layers.1", "decoder.layers.2", "decoder.layers.3"]
    prefetcher.trace = []
    with torch.no_grad():
        got = model(ids).logits
    assert torch.equal(got, expected) and torch.equal(plain(ids).logits, expected)
    copies = {site: (start, end) for what, site, start, end in prefetcher.trace if what == "copy"}
    computes = {site: (start, end) for what, site, start, end in prefetcher.trace if what == "compute"}
    assert list(copies) == list(computes) == ["decoder.layers.1", "decoder.layers.2", "decoder.layers.3"]
    for current, following in (("decoder.layers.1", "decoder.layers.2"), ("decoder.layers.2", "decoder.layers.3")):
        assert copies[following][0] < computes[current][1]  # the next copy starts before this compute ends
    assert copies["decoder.layers.1"][1] < computes["decoder.layers.1"][0]  # begun at the decoder's pre-hook
    assert prefetcher.pending is None
    assert all(p.device.type == "meta" for i in (1, 2, 3) for p in model.decoder.layers[i].parameters())
    with torch.no_grad():  # decoding modes go through the same schedule
        assert torch.equal(model.generate(ids, max_new_tokens=5, num_beams=2),
                           reference.generate(ids, max_new_tokens=5, num_beams=2))


def test_a_prefetch_no_unit_takes_is_dropped_at_the_end_of_the_forward(tmp_path: Path):
    model = dispatch(_model(), _streamed_on_disk(), offload_folder=tmp_path, prefetch=True)
    prefetcher = prefetcher_of(model)
    prefetcher.begin()  # as if a forward had started and stopped before its first streamed unit
    assert prefetcher.pending is not None and prefetcher.pending[0] == 0
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(ids)
    assert prefetcher.pending is None


def test_pinned_host_copies_only_where_cuda_is(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    copy = _host_copy(torch.ones(4), pin=True)  # pinning without CUDA would raise
    assert not copy.is_pinned() and torch.equal(copy, torch.ones(4))


def _gpu_map(layers: int) -> dict[str, object]:
    return {"": 0, **{f"decoder.layers.{i}": ("cpu" if i % 2 else "disk") for i in range(1, layers)}}


@pytest.mark.cuda
def test_one_gpu_with_cpu_and_disk_offload_gives_the_all_gpu_tokens(tmp_path: Path):
    reference = _model(layers=6).to("cuda")
    model = dispatch(_model(layers=6), _gpu_map(6), offload_folder=tmp_path)
    assert prefetcher_of(model) is not None and model.device == torch.device("cuda", 0)
    slots = [slot for site in prefetcher_of(model).sites for stream in site.streams for slot in stream.slots]
    hosts = [slot.host for slot in slots if slot.host is not None]  # the "cpu" layers' weights: pinned
    assert hosts and all(host.is_pinned() for host in hosts)
    assert all(p.device.type == "meta" for p in model.get_submodule("decoder.layers.1").parameters())
    ids = torch.randint(3, 500, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        assert float((model(ids).logits - reference(ids).logits).abs().max()) <= 1e-5
    for options in ({}, {"num_beams": 3}, {"cache_implementation": "dynamic"}):
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, **options),
                           reference.generate(ids, max_new_tokens=8, do_sample=False, **options)), options


@pytest.mark.cuda
def test_the_next_streamed_layer_is_copied_while_the_current_one_computes(tmp_path: Path):
    """CUDA events on the side stream and the compute stream: each streamed layer's copy starts before the
    previous streamed layer's compute ends (a synchronous schedule would start it only after)."""
    torch.manual_seed(0)
    spec = {"extends": "opt-tiny", "decoder": {"hidden_size": 1024, "ffn_dim": 4096, "num_heads": 16,
                                                "num_layers": 8, "max_positions": 512}}
    model = dispatch(optkit.build(spec, dtype=torch.float16).eval(),
                     {"": 0, **{f"decoder.layers.{i}": "cpu" for i in range(8)}}, offload_folder=tmp_path)
    prefetcher = prefetcher_of(model)
    ids = torch.randint(3, 500, (4, 256), device="cuda")
    with torch.no_grad():
        model(ids)  # warm-up
        prefetcher.trace = []
        model(ids)
    torch.cuda.synchronize()
    trace = prefetcher.trace
    base = next(start for what, _, start, _ in trace if what == "copy")
    copies = {site: base.elapsed_time(start) for what, site, start, _ in trace if what == "copy"}
    compute_ends = {site: base.elapsed_time(end) for what, site, _, end in trace if what == "compute"}
    names = [f"decoder.layers.{i}" for i in range(8)]
    overlapped = [copies[b] < compute_ends[a] for a, b in zip(names, names[1:])]
    assert all(overlapped), (copies, compute_ends)
    assert prefetcher.pending is None


# -- the benchmark -----------------------------------------------------------------------------------------
def test_the_offload_benchmark_runs_with_the_tiny_shape(tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "benchmarks/bench_offload.py", "--device", "cpu", "--shape", "opt-tiny",
                          "--dtype", "float32", "--new", "3", "--prompt", "6", "--reps", "1", "--out", str(tmp_path),
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "bench_offload.json").read_text())
    rows = {(row["system"], row["device_map"]): row for row in record["rows"]}
    assert set(rows) == {(system, name) for system in ("optkit", "transformers + Accelerate")
                         for name in ("all-on-device", "half-cpu", "half-disk")}
    assert all(row["tokens_equal"] for row in rows.values()), rows  # fp32 on one CPU: the same tokens
    assert rows[("optkit", "half-disk")]["streamed_bytes_per_token"] > 0
    assert "| optkit | half-disk |" in (tmp_path / "bench_offload.md").read_text()


def test_plan_of_an_optkit_native_checkpoint_reads_its_saved_spec(tmp_path: Path):
    """A checkpoint in optkit's own format is planned from its spec file, as from_pretrained would build it."""
    model = _model()
    directory = tmp_path / "native"
    model.save_pretrained(directory, format="optkit")
    result = plan(directory, max_memory={"cpu": "1GiB"})
    assert result.weight_bytes == plan(model, dtype="float32", max_memory={"cpu": "1GiB"}).weight_bytes
    assert result.dtype == "float32"
