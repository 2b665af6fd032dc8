"""The command line under bad input (issue 13 §5): closed or binary stdin, prompts that are not UTF-8,
prompts that fail after another was read, several bad spec files, and Ctrl-C during start-up.

Each failure is one line on stderr, nothing on stdout (the prompt is never echoed before it is known to
be valid), and the exit status says what happened: 2 an error, 1 a spec that is invalid, 130 Ctrl-C.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import make_text_model_dir

from optkit.cli import main

PIPELINE_MODULE = sys.modules.get("optkit.pipelines") or __import__("optkit.pipelines", fromlist=["pipeline"])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_model_dir(tmp_path_factory.mktemp("text_model"))


def run_with_stdin(capsys, monkeypatch, data: bytes, *argv: str) -> tuple[int, str, str]:
    """``optkit run`` in this process, with ``data`` as the bytes of standard input."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code = main(["run", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(result: tuple[int, str, str], message: str) -> None:
    code, out, err = result
    assert (code, out) == (2, ""), result
    assert err.startswith("optkit: error: ") and message in err and err.count("\n") == 1, err


# -- standard input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe\x00Hello\n", "standard input is not UTF-8 text: byte 0xff at offset 0 (line 1); convert it"),
    (b"Hello world\ncaf\xe9\n", "standard input is not UTF-8 text: byte 0xe9 at offset 15 (line 2)"),
    (b"Hello\x00world\n", "standard input looks binary: a NUL byte at offset 5 (line 1)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "standard input is not UTF-8 text: byte 0x89 at offset 0"),
])
def test_stdin_that_is_not_utf8_text_is_one_line_and_nothing_is_echoed(capsys, monkeypatch, model_dir, data, message):
    result = run_with_stdin(capsys, monkeypatch, data, "--model", str(model_dir), "--max-new-tokens", "3")
    assert_one_line_error(result, message)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=40))  # capsys is read and monkeypatch undone in every example
def test_any_stdin_bytes_give_text_or_one_line(capsys, monkeypatch, model_dir, data):
    """Whatever the bytes, the outcome is output with exit 0, or exactly one error line and no output."""
    with monkeypatch.context() as patch:
        code, out, err = run_with_stdin(capsys, patch, data, "--model", str(model_dir), "--max-new-tokens", "2",
                                        "--no-stream")
    if code == 0:
        assert err == "" and out
    else:
        assert (code, out) == (2, "") and err.startswith("optkit: error: ") and err.count("\n") == 1


def test_a_utf8_bom_is_not_part_of_the_prompt(capsys, monkeypatch, model_dir):
    args = ("--model", str(model_dir), "--max-new-tokens", "4")
    with_bom = run_with_stdin(capsys, monkeypatch, b"\xef\xbb\xbfHello\r\n", *args)
    assert with_bom[0] == 0
    assert with_bom[1] == run_with_stdin(capsys, monkeypatch, b"Hello\n", *args)[1]


def test_closed_stdin_in_process(capsys, monkeypatch, model_dir):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when file descriptor 0 is closed
    code = main(["run", "--model", str(model_dir)])
    assert_one_line_error((code, *capsys.readouterr()), "no prompt: standard input is closed; pass --prompt TEXT")


def test_closed_stdin_as_a_real_process(model_dir):
    done = subprocess.run([sys.executable, "-m", "optkit.cli", "run", "--model", str(model_dir)],
                          stdin=None, preexec_fn=lambda: os.close(0), capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert_one_line_error((done.returncode, done.stdout, done.stderr), "no prompt: standard input is closed")


def test_prompt_argument_that_is_not_utf8(capsys, model_dir):
    """Non-UTF-8 bytes in argv reach Python as surrogate escapes; they are named as bytes, not surrogates."""
    code = main(["run", "--model", str(model_dir), "--prompt", "caf\udce9"])
    assert_one_line_error((code, *capsys.readouterr()), "--prompt is not UTF-8 text: byte 0xe9 at offset 3")


def test_every_prompt_is_checked_before_any_is_printed(capsys, monkeypatch, model_dir):
    long_prompt = " ".join(["word"] * 80)  # more tokens than the model's 64 positions
    result = run_with_stdin(capsys, monkeypatch, f"Hello world\n{long_prompt}\n".encode(), "--model",
                            str(model_dir), "--max-new-tokens", "3")
    assert_one_line_error(result, "but the model has only 64 positions (no room for new tokens); shorten the prompt")


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan", "--do-sample"], "temperature=nan: must be a finite number"),
    (["--repetition-penalty", "inf"], "repetition_penalty=inf: must be > 0 and finite"),
    (["--top-p", "nan", "--do-sample"], "top_p=nan: must be in (0, 1]"),
])
def test_non_finite_options(capsys, model_dir, argv, message):
    code = main(["run", "--model", str(model_dir), "--prompt", "Hello", *argv])
    assert_one_line_error((code, *capsys.readouterr()), message)


# -- spec validate ---------------------------------------------------------------------------------------
def test_spec_validate_reports_every_file_and_exits_1(capsys, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("extends: opt-tiny\n", encoding="utf-8")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01binary")
    broken = tmp_path / "broken.yaml"
    broken.write_text("decoder: [1,\n", encoding="utf-8")
    directory = tmp_path / "adir.yaml"
    directory.mkdir()
    files = [binary, good, tmp_path / "missing.yaml", broken, directory, "opt-tiny"]
    code = main(["spec", "validate", *map(str, files)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.splitlines() == [f"{good}: ok (2 layers, hidden 64, attention eager, head causal_lm)",
                                "opt-tiny: ok (2 layers, hidden 64, attention eager, head causal_lm)"]
    reported = [line.split(": INVALID")[0] for line in err.splitlines() if line.endswith(": INVALID")]
    assert reported == [str(binary), str(tmp_path / "missing.yaml"), str(broken), str(directory)]
    assert "Traceback" not in err


# -- Ctrl-C ------------------------------------------------------------------------------------------------
def test_ctrl_c_while_loading_exits_130_in_process(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PIPELINE_MODULE, "pipeline", interrupted)
    assert main(["run", "--prompt", "Hello"]) == 130
    assert capsys.readouterr() == ("", "optkit: interrupted\n")


SIGINT_DURING_START_UP = textwrap.dedent("""
    import os, signal, sys, time
    import optkit.cli, optkit.pipelines

    def loading(*args, **kwargs):  # a real SIGINT, delivered while the model loads
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)

    optkit.pipelines.pipeline = loading
    sys.exit(optkit.cli.main(["run", "--prompt", "Hello"]))
""")


def test_real_sigint_during_start_up_exits_130_without_a_traceback():
    done = subprocess.run([sys.executable, "-c", SIGINT_DURING_START_UP], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "optkit: interrupted\n")


def test_an_error_caused_by_ctrl_c_is_reported_as_an_interrupt(capsys, monkeypatch):
    """Python wraps a KeyboardInterrupt that lands in a class body while torch imports into a RuntimeError."""
    import optkit.cli as cli

    def wrapped(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from exc

    monkeypatch.setattr(cli, "_cmd_presets", wrapped)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "optkit: interrupted\n"


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_the_traceback_but_keeps_the_exit_code(capsys, monkeypatch, model_dir, debug):
    """``--debug`` is for reading the cause; scripts that check the exit status must see the same 2 either way."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello"))
    argv = ["--debug"] if debug else []
    code = main([*argv, "run", "--model", str(model_dir), "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "max-new-tokens" in err or "max_new_tokens" in err
    assert ("Traceback" in err) is debug
