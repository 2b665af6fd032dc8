"""``optkit bench``: the table, the JSON and the plot carry what they promise (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

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
