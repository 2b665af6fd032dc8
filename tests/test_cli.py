"""optkit.cli: plugins, info, spec validate, presets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import optkit
from optkit.cli import main
from optkit.registration import Registry

ENV = ("OPTKIT_STRICT_PLUGINS", "OPTKIT_DISABLE_PLUGIN_AUTOLOAD", "OPTKIT_LOAD_PLUGINS", "OPTKIT_BLOCK_PLUGINS")

PLUGINS = """\
eager (optkit 0.1.0) [ok]
    attention: eager
flash (optkit 0.1.0) [ok]
    attention: flash
int8 (optkit 0.1.0) [ok]
    linear: int8
    linear: nf4
    linear: fp4
llama_components (optkit 0.1.0) [ok]
    checkpoint_format: open-llama
    norm: rmsnorm
    positional_embedding: rotary
    mlp: gated
    token_embedding: stable
onednn (optkit 0.1.0) [ok]
    linear: onednn
sdpa (optkit 0.1.0) [ok]
    attention: sdpa
torch_components (optkit 0.1.0) [ok]
    token_embedding: learned
    positional_embedding: learned
    norm: layernorm
    mlp: ffn
    linear: torch
    kv_cache: dynamic
    kv_cache: static
    checkpoint_format: opt
    block: sequential
    head: base
    head: causal_lm
    head: sequence_classification
    head: question_answering
xformers (optkit 0.1.0) [ok]
    attention: xformers
"""

INFO = """\
token_embedding       learned                  available  [torch_components]
token_embedding       stable                   available  [llama_components]
positional_embedding  learned                  available  [torch_components]
positional_embedding  rotary                   available  [llama_components]
attention             eager                    available  [eager]
attention             sdpa                     available  [sdpa]
mlp                   ffn                      available  [torch_components]
mlp                   gated                    available  [llama_components]
norm                  layernorm                available  [torch_components]
norm                  rmsnorm                  available  [llama_components]
linear                torch                    available  [torch_components]
kv_cache              dynamic                  available  [torch_components]
kv_cache              static                   available  [torch_components]
block                 sequential               available  [torch_components]
head                  base                     available  [torch_components]
head                  causal_lm                available  [torch_components]
head                  question_answering       available  [torch_components]
head                  sequence_classification  available  [torch_components]
"""


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch) -> Registry:
    """A global registry of our own, loaded from the installed entry points on first use."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    registry = Registry(autoload=True)
    monkeypatch.setattr(optkit, "registry", registry)
    return registry


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins(capsys):
    assert run(capsys, "plugins", "--no-usable") == (0, PLUGINS, "")


def test_plugins_say_what_cannot_run_here(capsys):
    code, out, _ = run(capsys, "plugins", "--device", "cpu", "--dtype", "float32")
    lines = out.splitlines()
    assert code == 0 and "    attention: sdpa" in lines and "    attention: eager" in lines
    flash = next(line for line in lines if line.startswith("    attention: flash"))
    assert flash.startswith("    attention: flash  (not usable on cpu/float32: device cpu (supported: cuda); "
                            "dtype float32 (supported: bfloat16, float16)")


def test_plugins_json(capsys):
    code, out, err = run(capsys, "plugins", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert [(p["name"], p["distribution"], p["version"], p["status"], p["reason"]) for p in data] == [
        (name, "optkit", "0.1.0", "ok", "") for name in ("eager", "flash", "int8", "llama_components", "onednn", "sdpa",
                                                         "torch_components", "xformers")]
    by_name = {p["name"]: p["components"] for p in data}
    assert by_name["sdpa"] == ["attention:sdpa"] and by_name["int8"] == ["linear:int8", "linear:nf4", "linear:fp4"]
    assert by_name["torch_components"][-2:] == ["head:sequence_classification", "head:question_answering"]


def test_plugins_shows_blocked(capsys, monkeypatch):
    monkeypatch.setenv("OPTKIT_BLOCK_PLUGINS", "sdpa")
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "sdpa (optkit 0.1.0) [blocked: listed in OPTKIT_BLOCK_PLUGINS]" in out.splitlines()


def test_plugins_none_installed(capsys, monkeypatch):
    monkeypatch.setattr("optkit.plugins.entry_points", lambda group: [])
    assert run(capsys, "plugins") == (0, "no optkit plugins are installed (is optkit installed with pip?)\n", "")


def test_info(capsys):
    code, out, err = run(capsys, "info", "--device", "cpu", "--dtype", "bfloat16")
    assert (code, err) == (0, "")
    first, rest = out.split("\n", 1)
    assert first.startswith("torch ") and first.endswith("; checking cpu/bfloat16")
    lines = rest.splitlines()
    gpu = [line for line in lines if line.split()[1] in ("flash", "xformers")]
    optional = (" int8 ", " nf4 ", " fp4 ", " onednn ")  # usable or not depending on the libraries and torch build
    assert [line for line in lines if line not in gpu and not any(o in line for o in optional)] == INFO.splitlines()
    assert len(gpu) == 2 and all("unavailable: device cpu (supported: cuda)" in line for line in gpu)


def test_validate_ok(capsys, tmp_path):
    path = tmp_path / "sdpa.yaml"
    path.write_text("extends: opt-tiny\ndecoder: {attention: sdpa}\n", encoding="utf-8")
    code, out, err = run(capsys, "spec", "validate", "opt-tiny", str(path))
    assert (code, err) == (0, "")
    assert out == ("opt-tiny: ok (2 layers, hidden 64, attention eager, head causal_lm)\n"
                   f"{path}: ok (2 layers, hidden 64, attention sdpa, head causal_lm)\n")


def test_validate_show(capsys):
    code, out, _ = run(capsys, "spec", "validate", "--show", "opt-tiny")
    assert code == 0
    header, text = out.split("\n", 1)
    assert header == "opt-tiny: ok (2 layers, hidden 64, attention eager, head causal_lm)"
    assert optkit.spec.spec_from_yaml(text) == optkit.load_spec("opt-tiny")


def test_validate_invalid(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("extends: opt-tiny\ndecoder: {hidden_size: 66, attention: sdp}\n", encoding="utf-8")
    code, out, err = run(capsys, "spec", "validate", str(path), "opt-125m")
    assert code == 1
    assert out == "opt-125m: ok (12 layers, hidden 768, attention eager, head causal_lm)\n"
    assert err == (f"{path}: INVALID\n"
                   f"2 problem(s) in model spec in {path}:\n"
                   "  - decoder.hidden_size: 66 is not divisible by num_heads=4\n"
                   "  - decoder.attention: unknown attention 'sdp' (available: eager, flash, sdpa, xformers); did you mean 'sdpa'?\n")


def test_validate_unknown_preset(capsys):
    code, out, err = run(capsys, "spec", "validate", "opt-12m")
    assert (code, out) == (1, "")
    assert err.startswith("opt-12m: INVALID\n1 problem(s) in model spec:\n  - unknown preset 'opt-12m' (presets: ")


def test_old_validate_command_is_a_hidden_deprecated_alias(capsys):
    code, out, err = run(capsys, "validate", "opt-tiny")
    assert (code, out) == (0, "opt-tiny: ok (2 layers, hidden 64, attention eager, head causal_lm)\n")
    assert err == "optkit: 'optkit validate' is deprecated; use 'optkit spec validate'\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert "    spec " in listing and "    validate " not in listing and "validate," not in listing


def test_presets(capsys):
    code, out, err = run(capsys, "presets")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "opt-125m (aliases: facebook/opt-125m)",
        "opt-350m (aliases: facebook/opt-350m)",
        "opt-1.3b (aliases: facebook/opt-1.3b)",
        "opt-2.7b (aliases: facebook/opt-2.7b)",
        "opt-6.7b (aliases: facebook/opt-6.7b)",
        "opt-13b (aliases: facebook/opt-13b)",
        "opt-30b (aliases: facebook/opt-30b)",
        "opt-66b (aliases: facebook/opt-66b)",
        "opt-175b (aliases: facebook/opt-175b)",
        "opt-tiny",
        "optkit-default",
        "opt-tiny-350m-style",
        "open-llama-7b",
        "open-llama-tiny",
        "open-llama-tiny-v2-style",
    ]


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "the following arguments are required: command" in capsys.readouterr().err


def test_console_script():
    exe = shutil.which("optkit")
    assert exe is not None, "the optkit console script is not installed (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    result = subprocess.run([exe, "plugins", "--no-usable"], capture_output=True, text=True, env=env, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, PLUGINS, "")
