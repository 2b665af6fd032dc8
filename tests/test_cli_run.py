"""``optkit run``: end to end through ``optkit.cli.main`` and as a real process reading stdin."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import make_text_model_dir

from optkit.cli import main
from optkit.pipelines import pipeline

PIPELINE_MODULE = importlib.import_module("optkit.pipelines")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_model_dir(tmp_path_factory.mktemp("text_model"))


@pytest.fixture(scope="module")
def pipe(model_dir: Path):
    return pipeline("text-generation", model=model_dir)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["run", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompt_prints_prompt_and_continuation(capsys, model_dir, pipe):
    code, out, err = run(capsys, "--model", str(model_dir), "--prompt", "Hello world", "--max-new-tokens", "12",
                         "--no-stream")
    assert code == 0 and err == ""
    assert out == pipe("Hello world", max_new_tokens=12)[0]["generated_text"] + "\n"


@pytest.mark.parametrize("prompt", ["Hello world", "café 日本語 😀 the"])
def test_streamed_output_equals_the_final_text(capsys, model_dir, prompt):
    args = ("--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "15")
    streamed = run(capsys, *args)
    assert streamed[0] == 0
    assert streamed[1] == run(capsys, *args, "--no-stream")[1]
    assert streamed[1].startswith(prompt)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) on CPU needs a C++ compiler (g++ or c++)")
def test_compiled_decoding_prints_the_same_text(capsys, model_dir):
    args = ("--model", str(model_dir), "--prompt", "Hello world", "--max-new-tokens", "10", "--no-stream")
    plain = run(capsys, *args)
    compiled = run(capsys, *args, "--compile")
    assert compiled[0] == 0 and compiled[1] == plain[1]
    assert "compiles the decode step" in compiled[2] and "compiles" not in plain[2]  # says why the wait


def test_prompts_from_stdin_one_per_line(capsys, monkeypatch, model_dir):
    args = ("--model", str(model_dir), "--max-new-tokens", "6")
    expected = run(capsys, *args, "--prompt", "the quick")[1] + run(capsys, *args, "--prompt", "brown fox")[1]
    monkeypatch.setattr(sys, "stdin", io.StringIO("the quick\n\nbrown fox\n"))  # blank lines are skipped
    assert run(capsys, *args)[1] == expected


def test_sampling_with_a_seed_is_reproducible(capsys, model_dir):
    args = ("--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "10", "--do-sample", "--top-k", "0",
            "--top-p", "0.95", "--temperature", "1.2", "--seed")
    first = run(capsys, *args, "7")[1]
    assert run(capsys, *args, "7")[1] == first
    assert any(run(capsys, *args, seed)[1] != first for seed in ("8", "9", "10"))


def test_beam_search(capsys, model_dir, pipe):
    code, out, _ = run(capsys, "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "8",
                       "--num-beams", "3", "--attention", "sdpa", "--dtype", "float32", "--device", "cpu")
    assert code == 0
    assert out == pipe("Hello", max_new_tokens=8, num_beams=3)[0]["generated_text"] + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--task", "summarization"], "unknown task 'summarization'; supported tasks: text-generation"),
    (["--max-new-tokens", "500"], "exceeds the model's 64 positions (max_new_tokens=500); use max_new_tokens <="),
    (["--do-sample", "--temperature", "0"], "temperature=0.0: must be > 0 when sampling"),
    (["--top-p", "1.5"], "top_p=1.5: must be in (0, 1]"),
    (["--dtype", "float99"], "dtype='float99' is not a torch dtype"),
])
def test_errors_print_one_line_and_exit_2(capsys, model_dir, argv, message):
    code, out, err = run(capsys, "--model", str(model_dir), "--prompt", "Hello", *argv)
    assert code == 2 and out == ""
    assert err.startswith("optkit: error: ") and message in err and err.count("\n") == 1


def test_empty_stdin_is_an_error(capsys, monkeypatch, model_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, _, err = run(capsys, "--model", str(model_dir))
    assert code == 2 and "no prompt: pass --prompt TEXT or pipe prompts on stdin, one per line" in err


def test_without_model_uses_the_bundled_one(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(PIPELINE_MODULE, "default_model_dir", lambda: tmp_path)
    code, _, err = run(capsys, "--prompt", "Hello")
    assert code == 2 and f"the bundled default model is not available yet ({tmp_path} has no config.json)" in err


def test_help_says_where_the_prompt_comes_from(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    assert "every non-empty line of standard input is one prompt" in capsys.readouterr().out


def test_subprocess_reads_the_prompt_from_stdin(model_dir, pipe):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "optkit.cli", "run", "--model", str(model_dir),
                           "--max-new-tokens", "10"], input="Hello world\n", capture_output=True, text=True,
                          env=env, timeout=120, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    assert done.stdout == pipe("Hello world", max_new_tokens=10)[0]["generated_text"] + "\n"
