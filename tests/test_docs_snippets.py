"""Every fenced block of README.md and docs/*.md is run, so the docs cannot drift from what optkit does (issue 19 §5).

- ```python blocks of one page run in order in one fresh process and one namespace (a page reads top to bottom,
  as doctest does); the working directory is a temporary folder that sees the repository's ``examples``,
  ``docs``, ``benchmarks``, ``plugins`` and ``registry.yaml``, so writes never touch the checkout.
- ```bash / ```sh blocks run line by line (``\\`` continues a line) under ``bash -e`` there too, with stdin empty.
  A leading ``python -m pip install ... &&`` is what this environment already did, so only the rest runs;
  a line that is only a pip install is not run.
- ```yaml blocks that are specs are validated with ``optkit.load_spec``; ```toml blocks must parse.
- ```pyi blocks are API signatures (``name(args) -> result``, one per line or continued): each must parse as the
  header of a Python ``def``; tests/test_docs_meta.py compares hooks.md's with the code.
- ```text blocks are output, not input.

A block the test cannot run here says why in an HTML comment on the line before it:
``<!-- snippet: needs cuda -->``, ``<!-- snippet: needs hub -->``, ``<!-- snippet: needs torchrun -->`` or
``<!-- snippet: skip <reason> -->``. Each such block is reported as a skip with that reason; the markers are few
(a test below bounds them at 20), and a page whose blocks are all skipped still fails.
docs/errors.md has its own, stricter test (tests/test_errors_doc.py), which compares the printed messages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "errors.md")]
SHARED = ("examples", "docs", "benchmarks", "plugins", "registry.yaml", "optkit")
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*snippet:\s*(?P<what>needs cuda|needs hub|needs torchrun|skip)\s*(?P<why>.*?)\s*-->$")
PIP_PREFIX = re.compile(r"^\s*python -m pip install [^&]*&&\s*")
REASONS = {"needs cuda": "needs a CUDA GPU", "needs hub": "needs the Hugging Face Hub (no network here)",
           "needs torchrun": "starts several processes with torchrun; tests/test_parallel*.py run the same path"}
MAX_SKIPPED_BLOCKS = 20
TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None  # why the block cannot run here, from its marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page with the marker (if any) on the line before each."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        skip = None
        if marker:
            skip = REASONS.get(marker["what"]) or marker["why"] or "marked skip"
        found.append(Block(page, i + 1, opening.group(1) or "text", "\n".join(lines[i + 1:end]) + "\n", skip))
        i = end + 1
    return found


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    for name in SHARED:
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


RUNNER = textwrap.dedent("""
    import __future__, json, sys, traceback
    blocks = json.loads(sys.stdin.read())
    namespace = {"__name__": "__main__"}
    for where, code in blocks:
        try:
            exec(compile(code, where, "exec", flags=__future__.annotations.compiler_flag), namespace)
        except BaseException:
            print(f"\\n--- the block at {where} failed ---", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
""")


def python_pages() -> list[Path]:
    return [page for page in PAGES if any(b.language == "python" for b in blocks(page))]


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: p.name)
def test_python_blocks_of_each_page_run_in_order(page: Path, workdir: Path):
    runnable = [b for b in blocks(page) if b.language == "python" and b.skip is None]
    if not runnable:
        pytest.skip("; ".join(sorted({b.skip for b in blocks(page) if b.skip})))
    payload = json.dumps([(b.where, b.code) for b in runnable])
    result = subprocess.run([sys.executable, "-c", RUNNER], input=payload, capture_output=True, text=True,
                            cwd=workdir, env=environment(), timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, pip installs left to setup."""
    joined = code.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = PIP_PREFIX.sub("", line)
        if line.startswith(("pip install", "python -m pip install")):
            continue
        commands.append(line)
    return commands


SHELL = [b for b in all_blocks() if b.language in ("bash", "sh", "shell", "console")]


@pytest.mark.parametrize("block", SHELL, ids=[b.where for b in SHELL])
def test_each_shell_block_runs(block: Block, workdir: Path):
    if block.skip:
        pytest.skip(block.skip)
    commands = shell_commands(block.code)
    assert commands, f"{block.where}: a shell block with nothing to run"
    for command in commands:
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                                cwd=workdir, env=environment(), stdin=subprocess.DEVNULL, timeout=TIMEOUT_S)
        assert result.returncode == 0, f"{block.where}: `{command}` exited {result.returncode}\n{result.stderr[-3000:]}"


SIGNATURES = [b for b in all_blocks() if b.language == "pyi"]


def signatures(code: str) -> list[str]:
    """The signatures of a ```pyi block: a line that is not indented starts one, indented lines continue it."""
    found: list[str] = []
    for line in code.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if (line[0].isspace() or line.startswith(")")) and found:
            found[-1] += " " + line.strip()
        else:
            found.append(line.strip())
    return found


@pytest.mark.parametrize("block", SIGNATURES, ids=[b.where for b in SIGNATURES])
def test_each_signature_block_is_python(block: Block):
    import ast

    listed = signatures(block.code)
    assert listed, f"{block.where}: an empty signature block"
    for signature in listed:
        head = signature.removeprefix("async ").removeprefix("def ").rstrip(":")
        if "(" in head:  # a callable: Name.method(arguments) -> result
            name, rest = head[:head.index("(")], head[head.index("("):]
            stub = f"def {name.split('.')[-1]}{rest}: ..."
        elif "->" in head:  # a property: Name.attribute -> type
            name, result = head.split("->", 1)
            stub = f"def {name.strip().split('.')[-1]}() -> {result}: ..."
        else:  # an attribute: Name.attribute: type
            name, _, annotation = head.partition(":")
            stub = f"{name.strip().split('.')[-1]}: {annotation or 'missing'}"
        try:
            ast.parse(stub)
        except SyntaxError as exc:
            raise AssertionError(f"{block.where}: `{signature}` is not a Python signature: {exc}") from None


DATA = [b for b in all_blocks() if b.language in ("yaml", "toml")]


@pytest.mark.parametrize("block", DATA, ids=[b.where for b in DATA])
def test_each_yaml_and_toml_block_is_valid(block: Block, tmp_path: Path):
    if block.skip:
        pytest.skip(block.skip)
    if block.language == "toml":
        tomllib.loads(block.code)
        return
    data = yaml.safe_load(block.code)
    if isinstance(data, dict) and ("decoder" in data or "extends" in data):
        import optkit

        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(block.code)
        optkit.load_spec(spec_file)


def test_the_runner_sees_every_language_it_does_not_run_as_output():
    languages = {b.language for b in all_blocks()}
    assert languages <= {"python", "pyi", "bash", "sh", "shell", "console", "yaml", "toml", "text"}, languages


def test_skips_are_few_and_every_page_with_code_runs_something():
    skipped = [b.where for b in all_blocks() if b.skip]
    assert len(skipped) <= MAX_SKIPPED_BLOCKS, skipped
    for page in PAGES:
        code = [b for b in blocks(page) if b.language == "python"]
        assert not code or any(b.skip is None for b in code), f"{page.name}: every Python block is skipped"
