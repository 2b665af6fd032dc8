"""``optkit bench``: the table, the JSON and the plot carry what they promise (no timing assertions)."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optkit
from optkit import benchmarking
from optkit.cli import main
from optkit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

TINY = ["bench", "--preset", "opt-tiny", "--new-tokens", "4", "--prompt-len", "8", "--repeats", "1", "--no-compile"]
FIELDS = {"workload", "batch", "system", "ttft_ms", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max",
          "vs_transformers", "bandwidth_pct", "peak_mib", "weights_mib", "repeats"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of the command, in a fresh process as a user starts it, shared by the tests below: every
    usable uncompiled backend, batch 1."""
    out = tmp_path_factory.mktemp("bench")
    argv = TINY + ["--json", str(out / "b.json"), "--plot", str(out / "b.svg")]
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-m", "optkit.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.returncode, done.stdout, json.loads((out / "b.json").read_text()), out / "b.svg"


def test_table_lists_every_system_and_batch(tiny_run):
    code, text, report, _ = tiny_run
    assert code == 0
    assert "| workload | batch | system | time to first token (ms) | decode tok/s" in text
    systems = {row["system"] for row in report["rows"]}
    assert {"transformers", "optkit sdpa/torch", "optkit eager/torch"} <= systems
    assert {row["batch"] for row in report["rows"]} == {1}
    for name in systems:
        assert f"| {name} |" in text
    assert "measured read bandwidth" in text


def test_json_fields(tiny_run):
    _, _, report, _ = tiny_run
    assert report["bandwidth_gbs"] > 0
    for row in report["rows"]:
        assert set(row) == FIELDS
        assert row["decode_tok_s"] > 0 and row["ttft_ms"] > 0 and row["repeats"] == 1
        assert row["weights_mib"] > 0 and row["peak_mib"] > 0
        assert row["workload"] == "8+4"
    assert all(row["vs_transformers"] == 1.0 for row in report["rows"] if row["system"] == "transformers")


def test_fp32_tokens_equal_transformers(tiny_run):
    _, _, report, _ = tiny_run
    assert report["same_tokens"] and all(report["same_tokens"].values())


def test_plot_is_an_svg_with_one_bar_per_row(tiny_run):
    _, _, report, svg = tiny_run
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert len(root.findall("{http://www.w3.org/2000/svg}rect")) == len(report["rows"])


def test_without_transformers_runs_optkit_alone(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmarking, "transformers_installed", lambda: False)
    assert main(TINY + ["--variants", "sdpa/torch", "--batch", "1", "2", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "transformers is not installed: optkit alone" in out
    report = json.loads((tmp_path / "b.json").read_text())
    assert [(row["system"], row["batch"]) for row in report["rows"]] == [("optkit sdpa/torch", 1),
                                                                           ("optkit sdpa/torch", 2)]
    assert all(row["vs_transformers"] is None for row in report["rows"])


def test_usable_variants_cover_attention_and_compile():
    plain = benchmarking.usable_variants("cpu", torch.float32, compile=False)
    assert "sdpa/torch" in plain and "eager/torch" in plain and not any("compile" in v for v in plain)


@pytest.mark.parametrize("argv, named", [
    (["--variants", "sdpa"], "--variants"),
    (["--variants", "sdpa/torch/turbo"], "--variants"),
    (["--prompt-len", "0"], "--prompt-len"),
    (["--batch", "0"], "--batch"),
    (["--prompt-len", "120", "--new-tokens", "20"], "--prompt-len"),
])
def test_bad_arguments_are_one_error_naming_them(capsys, argv, named):
    assert main(TINY + ["--against", "none"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("optkit: error: ") and named in err


def test_check_variant_raises_input_error():
    with pytest.raises(InputError, match="--variants"):
        benchmarking.check_variant("eager//compile")


# -- plots: round ticks, nothing clipped, drawn from the recorded tables (issue 19 §5) -------------------------
SVG = "{http://www.w3.org/2000/svg}"


def bench_generate():
    """benchmarks/bench_generate.py as a module (it is a script, not part of the package)."""
    if "bench_generate" not in sys.modules:  # registered before it runs: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "bench_generate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_generate"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_generate"]


def is_round_step(step: float) -> bool:
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    return any(math.isclose(mantissa, m, rel_tol=1e-9) for m in (1, 2, 5))


@settings(deadline=None, max_examples=200)
@given(st.floats(min_value=1e-6, max_value=1e9, allow_nan=False), st.integers(min_value=2, max_value=10))
def test_nice_ticks_are_round_and_end_at_or_above_the_top(top, count):
    ticks = benchmarking.nice_ticks(top, count)
    step = ticks[1] - ticks[0]
    assert ticks[0] == 0 and is_round_step(step)
    assert all(math.isclose(b - a, step, rel_tol=1e-6) for a, b in zip(ticks, ticks[1:]))
    assert ticks[-1] >= top * (1 - 1e-9) and ticks[-2] < top  # the axis ends at the first tick at or above the data
    assert len(ticks) - 1 <= count


@pytest.mark.parametrize("top, expected", [
    (112.0, [0, 20, 40, 60, 80, 100, 120]), (101.5, [0, 20, 40, 60, 80, 100, 120]),
    (1716.7, [0, 500, 1000, 1500, 2000]), (0.37, [0, 0.1, 0.2, 0.3, 0.4]), (100.0, [0, 20, 40, 60, 80, 100]),
    (0.0, [0, 1]),
])
def test_nice_ticks_examples(top, expected):
    assert benchmarking.nice_ticks(top) == pytest.approx(expected)


def test_tick_labels_have_the_decimals_the_step_needs():
    assert [benchmarking.tick_label(v, 0.1) for v in (0, 0.1, 0.3)] == ["0.0", "0.1", "0.3"]
    assert [benchmarking.tick_label(v, 500) for v in (0, 1500)] == ["0", "1500"]


def text_box(element: ET.Element) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) an SVG text element covers, with the same width estimate the plotters use; text rotated
    by -90 degrees about its own anchor point (the y-axis title) is turned accordingly."""
    x, y, size = float(element.get("x")), float(element.get("y")), float(element.get("font-size"))
    width = benchmarking.text_width(element.text or "", size)
    start = {"start": 0.0, "middle": -width / 2, "end": -width}[element.get("text-anchor", "start")]
    rotation = re.fullmatch(r"rotate\((-?[\d.]+) ([\d.]+) ([\d.]+)\)", element.get("transform", ""))
    if rotation:
        assert float(rotation[1]) == -90 and (float(rotation[2]), float(rotation[3])) == (x, y)
        return x - size, y - start - width, x, y - start
    return x + start, y - size, x + start + width, y + 0.3 * size


def assert_text_inside(svg: Path) -> list[str]:
    root = ET.parse(svg).getroot()
    width, height = float(root.get("width")), float(root.get("height"))
    texts = root.findall(f"{SVG}text")
    assert texts
    for element in texts:
        x0, y0, x1, y1 = text_box(element)
        assert 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height, (element.text, (x0, y0, x1, y1), width, height)
    return [element.text for element in texts]


def test_bars_fit_long_labels_and_name_the_batch(tmp_path):
    table = [{"system": "optkit " + "very-long-attention-backend/" * 3 + "compile", "batch": b, "workload": "128+128",
              "decode_tok_s": v} for b, v in ((1, 51.6), (8, 110.7))]
    table.append({"system": "transformers", "batch": 1, "workload": "128+128", "decode_tok_s": 21.8})
    benchmarking.svg_bars(table, tmp_path / "b.svg", "opt-125m float32 on cpu: decode tokens/s")
    texts = assert_text_inside(tmp_path / "b.svg")
    assert "batch 1, 8; prompt+new tokens 128+128; medians" in texts
    assert [t for t in texts if t in {"0", "20", "40", "60", "80", "100", "120"}] == ["0", "20", "40", "60", "80",
                                                                                        "100", "120"]
    assert len(ET.parse(tmp_path / "b.svg").getroot().findall(f"{SVG}rect")) == 3


def test_bench_plot_text_is_inside(tiny_run):
    assert_text_inside(tiny_run[3])


TABLE = """### opt-125m on cpu: transformers float32 vs optkit sdpa/torch/float32/compile

- machine: AMD EPYC; 2 torch threads; GPU: none
- measured read bandwidth (torch sum over 1 GiB): 30.0 GB/s at the start, 32.0 GB/s at the end; percentages ...

| workload | batch | system | time to first token (ms) | decode tok/s | vs transformers | bytes/token (MB) | effective GB/s | % of bandwidth |
|---|---|---|---|---|---|---|---|---|
| 128+128 | 1 | transformers | 1.0 [1.0–1.0] | 21.8 [20.8–22.8] | 1.00x | 509 | 11.1 | 34% |
| context 128+32 | 1 | transformers | 1.0 [1.0–1.0] | 20.0 [20.0–20.0] | 1.00x | 500 | 11.1 | 34% |
| context 128+32 | 1 | optkit sdpa/torch/float32/compile | 1.0 [1.0–1.0] | 60.0 [60.0–60.0] | 3.00x | 500 | 30.0 | 94% |
| context 1900+32 | 1 | transformers | 1.0 [1.0–1.0] | 15.0 [15.0–15.0] | 1.00x | 640 | 9.6 | 30% |
| context 1900+32 | 1 | optkit sdpa/torch/float32/compile | 1.0 [1.0–1.0] | 35.0 [35.0–35.0] | 2.33x | 640 | 22.4 | 70% |
"""
EXTRA = """### opt-125m on cpu: transformers float32 vs optkit eager/torch/float32/compile

- machine: AMD EPYC; 2 torch threads; GPU: none
- measured read bandwidth (torch sum over 1 GiB): 40.0 GB/s

| workload | batch | system | time to first token (ms) | decode tok/s | vs transformers | bytes/token (MB) | effective GB/s | % of bandwidth |
|---|---|---|---|---|---|---|---|---|
| 128+128 | 1 | transformers | 1.0 [1.0–1.0] | 22.0 [22.0–22.0] | 1.00x | 509 | 11.1 | 34% |
| 128+128 | 1 | optkit eager/torch/float32/compile | 1.0 [1.0–1.0] | 52.0 [52.0–52.0] | 2.36x | 509 | 26.3 | 81% |
"""


def polyline_values(svg: Path) -> list[int]:
    return [len(p.get("points").split()) for p in ET.parse(svg).getroot().findall(f"{SVG}polyline")]


def test_replot_draws_the_recorded_sweep_with_extra_compiled_points(tmp_path):
    module = bench_generate()
    (tmp_path / "sweep.md").write_text(TABLE, encoding="utf-8")
    (tmp_path / "extra.md").write_text(EXTRA, encoding="utf-8")
    module.replot(tmp_path / "sweep.md", tmp_path / "p.svg", [tmp_path / "extra.md"], bandwidth_line=True)
    texts = assert_text_inside(tmp_path / "p.svg")
    assert texts[0] == "opt-125m, float32, cpu (AMD EPYC, 2 threads), batch 1: decode tokens/s"
    assert {"transformers", "optkit sdpa/torch/float32/compile", "optkit eager/torch/float32/compile",
            "batch 1, 128+128, separate run (transformers 22.0 there)"} <= set(texts)
    assert "32 GB/s (torch.sum, same run) / float32 bytes per token" in texts  # the higher of the two measurements
    assert polyline_values(tmp_path / "p.svg") == [2, 2, 2]  # two sweep lines and the bandwidth line
    root = ET.parse(tmp_path / "p.svg").getroot()
    assert len(root.findall(f"{SVG}circle")) == 2 * 2 + 1 + 1  # sweep points, the extra point, its legend marker


def test_replot_of_a_table_without_a_sweep_is_one_input_error(tmp_path):
    (tmp_path / "extra.md").write_text(EXTRA, encoding="utf-8")
    with pytest.raises(InputError, match=r"extra\.md has no context sweep rows"):
        bench_generate().replot(tmp_path / "extra.md", tmp_path / "p.svg")
    (tmp_path / "notes.md").write_text("# notes\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"notes\.md is not a table written by bench_generate\.py"):
        bench_generate().replot(tmp_path / "notes.md", tmp_path / "p.svg")


def test_docs_plots_are_the_recorded_tables_redrawn(tmp_path):
    """The SVGs docs/ shows are exactly what --replot-docs draws from docs/performance/*.md, with nothing clipped,
    batch size in the title and a compiled series in each."""
    for svg in bench_generate().replot_docs(tmp_path):
        shown = ROOT / "docs" / svg.name
        assert shown.read_text() == svg.read_text(), f"{shown} is stale: run benchmarks/bench_generate.py --replot-docs"
        texts = assert_text_inside(shown)
        assert "batch 1" in texts[0]
        assert any(t.startswith("optkit") and t.endswith("/compile") for t in texts)


def test_independent_generate_script_runs_and_finds_identical_tokens(tmp_path):
    """benchmarks/independent_generate.py, the cross-check of these figures (issue 16), at a toy shape: it exits 0,
    prints its table with both systems side by side, and the fp32 greedy tokens of both loads are identical."""
    script = ROOT / "benchmarks" / "independent_generate.py"
    tree = ast.parse(script.read_text(encoding="utf-8"))
    imported = {(node.module or "") + "." + alias.name if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert not any("benchmarking" in name for name in imported), imported  # independent of what it checks
    argv = ["--tiny", "--repeats", "1", "--prompt-len", "8", "--new-tokens", "4", "--batch", "1", "2", "--first-call",
            "--json", str(tmp_path / "i.json")]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| measure | batch | prompt+new | transformers | optkit | optkit/transformers |" in done.stdout
    assert "- batch 1: greedy tokens identical: yes" in done.stdout
    assert "- batch 2: greedy tokens identical: yes" in done.stdout
    assert "| first generate() of a fresh process (s) | 1 | 8+4 |" in done.stdout
    report = json.loads((tmp_path / "i.json").read_text())
    assert [w["batch"] for w in report["workloads"]] == [1, 2] and all(w["same_tokens"] for w in report["workloads"])
    for stats in (*(w["decode_tok_s"] for w in report["workloads"]), report["first_call"]["first_generate_s"]):
        assert set(stats) == {"optkit", "transformers"} and all(s["median"] > 0 for s in stats.values())


def profile_decode_script():
    """benchmarks/profile_decode.py as a module (registered first: its dataclass resolves names through it)."""
    spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "benchmarks" / "profile_decode.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    return script


def test_profile_decode_isolates_one_decode_step(tmp_path, capsys):
    """benchmarks/profile_decode.py (issue 18's per-kernel record) at a toy shape on the CPU: the difference of a
    1-token and a (1+N)-token profile is exactly N decode steps, so each step shows one product per projection
    (q, k, v, out, fc1, fc2 per layer: q/k/v are stacked on accelerators only) plus the LM head."""
    script = profile_decode_script()
    out = tmp_path / "profile.md"
    assert script.main(["--shape", "opt-tiny", "--device", "cpu", "--steps", "3", "--reps", "1", "--prompt", "8",
                        "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    layers = optkit.build("opt-tiny").spec.decoder.num_layers
    products = re.search(r"\| matrix product \(cuBLAS/CUTLASS/aten\) \| (\d+) \|", text)
    assert products and int(products.group(1)) == 6 * layers + 1, text
    assert re.search(r"- step time \(median of 1 unprofiled runs\): \*\*\d+\.\d+ ms\*\*", text)
    assert "| `aten::addmm` | matrix product (cuBLAS/CUTLASS/aten) | " + f"{6 * layers:.1f} |" in text


def test_profile_decode_subtracts_the_common_prefill():
    script = profile_decode_script()
    short = {"prefill_only": (4, 400.0), "gemv": (2, 20.0), "triton_red_fused_0": (0, 0.0)}
    long = {"prefill_only": (4, 401.0), "gemv": (10, 100.0), "triton_red_fused_0": (8, 64.0), "triton_poi_x": (4, 8.0)}
    kernels = script.step_kernels(short, long, 4)
    assert [(k.name, k.calls, k.micros) for k in kernels] == [
        ("gemv", 2.0, 20.0), ("triton_red_fused_0", 2.0, 16.0), ("triton_poi_x", 1.0, 2.0),
        ("prefill_only", 0.0, 0.25)]
    assert [k.category for k in kernels] == ["matrix product (cuBLAS/CUTLASS/aten)",
                                             "one-row product (inductor reduction)", "pointwise (inductor)", "other"]


def test_bytes_per_token_counts_weights_at_their_stored_size():
    """An int8 linear's weight is read as one byte per value: the bandwidth columns of an int8 variant use it."""
    reasons = optkit.registry.reasons_unavailable("linear", "int8", "cpu", torch.float32)
    if reasons:
        pytest.skip(f"int8 on CPU: {'; '.join(reasons)}")
    dense, int8 = optkit.build("opt-tiny"), optkit.build("opt-tiny", linear="int8").eval()
    with torch.no_grad():
        int8(torch.tensor([[3, 4, 5]]))  # an int8 linear quantizes its weight on the first forward
    d = dense.spec.decoder
    kv = 2 * d.num_layers * 10 * d.hidden_size * 4  # context 10, batch 1, fp32 cache
    linear = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear) and m is not dense.head)
    positions = dense.decoder.embed_positions.weight.numel()
    assert benchmarking.bytes_per_token(dense, 10, 1) == 4 * (sum(p.numel() for p in dense.parameters()) - positions) + kv
    assert benchmarking.bytes_per_token(dense, 10, 1) - benchmarking.bytes_per_token(int8, 10, 1) == 3 * linear
    assert benchmarking.bytes_per_token(int8, 10, 1, element=2) == benchmarking.bytes_per_token(dense, 10, 1) / 2


def test_gemv_probe_forms_compute_the_product():
    """benchmarks/gemv_probe.py's kernel choices (BLAS, optkit's inductor reduction, split-K) on a CPU at a toy
    shape: every form is timed and equals an fp32 product of the same operands."""
    spec = importlib.util.spec_from_file_location("gemv_probe", ROOT / "benchmarks" / "gemv_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rows = probe.main(["--device", "cpu", "--dtype", "float32", "--hidden", "64", "--reps", "1", "--batch", "1",
                       "--shapes", "fc2", "--copies", "2"])
    assert [r["form"] for r in rows] == ["linear+bias", "linear", "relu epilogue", "inductor", "inductor split-K 2",
                                         "inductor split-K 4", "inductor split-K 8"]
    assert all(r["us"] > 0 and r["error"] < 1e-4 for r in rows), rows
    assert {(r["n"], r["k"]) for r in rows} == {(64, 256)}
