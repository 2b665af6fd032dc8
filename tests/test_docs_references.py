"""Every name the docs' prose puts in a code span exists: a reader who copies `optkit plan ... --max-memory` or
`optkit.inference.prepare` from a sentence must find that flag, function or file.

tests/test_docs_snippets.py runs the fenced blocks; this file checks the inline code spans (single or double
backticks, outside fenced blocks) of README.md and docs/*.md, without running anything:

- commands: a span starting ``optkit `` (or the part after ``-m optkit.cli``) is parsed by optkit's own argparse
  parser (``optkit.cli.build_parser``), so an unknown subcommand, an unknown flag or a value outside an option's
  choices fails. Placeholders get a dummy value the option accepts (see ``_fill_placeholders``); ``[...]`` brackets
  around optional parts are dropped; ``A|B`` checks each alternative. A fragment that names a command or flag
  without its required arguments (`optkit spec validate`, `optkit train --lora-r`) is accepted: prose names them.
- Python: each dotted ``optkit.x.y`` in a span is resolved by import and getattr; a span that is a whole call
  (`optkit.from_pretrained(..., device_map=...)`) or signature must name only parameters the callable accepts.
  `model.x` / `model.x(...)` must be an attribute or method of ``optkit.model.Model``.
- paths: ``benchmarks/``, ``tests/``, ``optkit/``, ``plugins/``, ``examples/`` and ``docs/`` paths must exist
  (a trailing ``/`` must be a folder), ``path::name`` must define ``name``, and ``--flags`` given after a script's
  path must appear in that script.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import io
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from optkit.cli import build_parser
from optkit.model import Model

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
# A run of backticks, then text that does not cross a blank line, then the same run (CommonMark's rule, simplified).
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.S)

COMMAND = re.compile(r"^optkit\s+\S")
MODULE_CLI = re.compile(r"-m\s+optkit\.cli\s+(.*)$")
OPTKIT_NAME = re.compile(r"(?<![\w./-])optkit(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^from\s+(optkit(?:\.\w+)*)\s+import\s+([\w\s,]+)$")
WHOLE_CALL = re.compile(r"^((?:optkit|model)(?:\.[A-Za-z_]\w*)+)\s*(\(.*\))$", re.S)
MODEL_ATTRIBUTE = re.compile(r"^model\.([A-Za-z_]\w*)(?:\(.*\))?(?:\s*=.*)?$", re.S)
FILE_SUFFIXES = {"py", "pt", "bin", "json", "safetensors", "yaml"}  # `model.py` is a file name, not an attribute
PATH = re.compile(r"(?<![\w./~$-])((?:benchmarks|tests|optkit|plugins|examples|docs)/[\w./<>{}*-]*)((?:::\w+)*)")
PLACEHOLDER = re.compile(r"^(?:\.\.\.|<[^>]+>|[A-Z][A-Z0-9_]*(?:\.\w+)?)$")  # ..., <x>, SPEC, N, OUT_DIR, SPEC.yaml
REQUIRED_MISSING = ("the following arguments are required", "one of the arguments")


@dataclass(frozen=True)
class Span:
    page: Path
    line: int
    text: str  # whitespace collapsed to single spaces

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: `{self.text}`"


def _prose(text: str) -> str:
    """The page with fenced blocks blanked, so line numbers stay those of the file."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = FENCE.match(line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and marker and line.strip() == marker.group(1) and marker.group(1)[0] == fence[0] \
                and len(marker.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            lines.append(line)
            continue
        lines.append("")
    return "\n".join(lines)


def code_spans(page: Path, text: str | None = None) -> list[Span]:
    prose = _prose(page.read_text(encoding="utf-8") if text is None else text)
    return [Span(page, prose.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()))
            for m in CODE_SPAN.finditer(prose) if m.group(2).strip()]


SPANS = [span for page in PAGES for span in code_spans(page)]


# --- commands -------------------------------------------------------------------------------------------------


class _ParseError(Exception):
    pass


def _raise(self: argparse.ArgumentParser, message: str) -> None:
    raise _ParseError(message)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _dummy(action: argparse.Action) -> str:
    """A value ``action`` accepts, for a placeholder (or a missing value) in the docs."""
    if action.choices:
        return str(next(iter(action.choices)))
    return {int: "1", float: "0.5"}.get(action.type, "placeholder")


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _fill_placeholders(tokens: list[str]) -> list[str]:
    """Replace placeholders by values the parser accepts: after an option, a value for that option (its first
    choice, 1 for an int); ``...`` elsewhere stands for "more arguments" and is dropped; an upper-case word or
    ``<x>`` elsewhere is a positional argument. An option the span ends on without its value gets a dummy one."""
    parser, pending, argv = build_parser(), None, []
    for token in tokens:
        if PLACEHOLDER.match(token):
            if pending is not None:
                argv.append(_dummy(pending))
            elif token != "...":
                argv.append("placeholder")
            pending = None
            continue
        argv.append(token)
        if token.startswith("-"):
            action = parser._option_string_actions.get(token)
            pending = action if action is not None and "=" not in token and _takes_value(action) else None
        elif pending is not None:
            pending = None
        elif token in _subparsers(parser):
            parser = _subparsers(parser)[token]
    if pending is not None:
        argv.append(_dummy(pending))
    return argv


def _argv_variants(command: str) -> list[list[str]]:
    """The argument lists a command span stands for: brackets of optional parts dropped, ``A|B`` expanded."""
    tokens = [t.strip("[]") for t in command.split()]
    choices = [t.split("|") if "|" in t else [t] for t in tokens if t]
    return [_fill_placeholders(list(variant)) for variant in itertools.product(*choices)]


def command_problem(command: str) -> str | None:
    """Why argparse rejects ``command`` (the words after ``optkit``), or None. Nothing runs: parsing only."""
    for argv in _argv_variants(command):
        try:
            with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
                patch.setattr(argparse.ArgumentParser, "error", _raise)
                build_parser().parse_args(argv)
        except _ParseError as exc:
            if not str(exc).startswith(REQUIRED_MISSING):
                return f"{' '.join(argv)!r}: {exc}"
        except SystemExit as exc:  # --help prints and exits 0
            if exc.code not in (0, None):
                return f"{' '.join(argv)!r}: exit {exc.code}"
    return None


def command_of(span: Span) -> str | None:
    """The words after ``optkit`` when ``span`` is an optkit command line."""
    if COMMAND.match(span.text):
        return span.text.split(None, 1)[1]
    module = MODULE_CLI.search(span.text)
    return module.group(1) if module and module.group(1) else None


COMMANDS = [(span, command) for span in SPANS if (command := command_of(span)) is not None]


# --- Python names ---------------------------------------------------------------------------------------------


def resolve(dotted: str) -> Any:
    """The object ``dotted`` names, importing submodules as needed; LookupError says which part is missing."""
    parts = dotted.split(".")
    obj: Any = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif isinstance(obj, ModuleType) and hasattr(obj, "__path__") \
                and importlib.util.find_spec(f"{obj.__name__}.{part}") is not None:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            raise LookupError(f"{'.'.join(parts[:i])} has no attribute {part!r}")
    return obj


def _model_attribute_exists(name: str) -> bool:
    """On the class, or assigned in ``Model.__init__`` (``self.inference_session = None``)."""
    return hasattr(Model, name) or re.search(rf"\bself\.{name}\b\s*[:=]", inspect.getsource(Model.__init__)) is not None


def _parameters_named(arguments: str) -> tuple[list[int], list[str]] | None:
    """For ``(a, b=1, ...)``: (the positional arguments, the keyword names) of a call; for a signature summary
    ``(a, *, b=None)``, ([], every parameter name). None when the text is not Python (``(n=5 GiB)``)."""
    try:
        call = ast.parse(f"f{arguments}", mode="eval").body
    except SyntaxError:
        try:
            header = ast.parse(f"def f{arguments}: pass").body[0]
        except SyntaxError:
            return None
        names = header.args.posonlyargs + header.args.args + header.args.kwonlyargs
        return [], [a.arg for a in names]
    assert isinstance(call, ast.Call)
    positional = [a for a in call.args if not isinstance(a, ast.Starred)
                  and not (isinstance(a, ast.Constant) and a.value is Ellipsis)]
    return [0] * len(positional), [k.arg for k in call.keywords if k.arg is not None]


def call_problem(target: Any, arguments: str, *, method: bool) -> str | None:
    """Why ``target`` cannot take the arguments a span shows it with, or None."""
    named = _parameters_named(arguments)
    if named is None:
        return None
    positional, keywords = named
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: the name was checked
        return None
    params = signature.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        keywords = []  # **kwargs takes any name; positional arity is still checked
    try:
        signature.bind_partial(*([None] if method else []), *positional, **dict.fromkeys(keywords))
    except TypeError as exc:
        return f"{exc} (accepts {signature})"
    return None


def _is_model_attribute(text: str) -> bool:
    match = MODEL_ATTRIBUTE.match(text)
    return match is not None and match.group(1) not in FILE_SUFFIXES


def python_problems(span: Span) -> list[str]:
    problems = []
    names = OPTKIT_NAME.findall(span.text)
    imported = FROM_IMPORT.match(span.text)
    if imported:
        names += [f"{imported.group(1)}.{n.strip()}" for n in imported.group(2).split(",") if n.strip()]
    for name in names:
        try:
            resolve(name)
        except (LookupError, ImportError) as exc:
            problems.append(f"{name}: {exc}")
    call = WHOLE_CALL.match(span.text)
    if call and not problems:
        owner, _, attribute = call.group(1).partition(".")
        if owner == "optkit":
            problem = call_problem(resolve(call.group(1)), call.group(2), method=False)
        else:
            target = getattr(Model, attribute, None) if "." not in attribute else None
            problem = call_problem(target, call.group(2), method=True) if callable(target) else None
        if problem:
            problems.append(problem)
    if _is_model_attribute(span.text):
        attribute = MODEL_ATTRIBUTE.match(span.text).group(1)
        if not _model_attribute_exists(attribute):
            problems.append(f"optkit.model.Model has no attribute {attribute!r}")
    return problems


PYTHON_SPANS = [span for span in SPANS if OPTKIT_NAME.search(span.text) or FROM_IMPORT.match(span.text)
                or _is_model_attribute(span.text)]

# `CheckpointError`, `AdapterConfigWarning`: an exception named alone is a builtin or a class optkit defines.
EXCEPTION_NAME = re.compile(r"[A-Z]\w*(?:Error|Warning|Exception)")
EXCEPTION_SPANS = [span for span in SPANS if EXCEPTION_NAME.fullmatch(span.text)]


def defined_classes() -> set[str]:
    files = [f for folder in ("optkit", "plugins", "examples") for f in (ROOT / folder).rglob("*.py")]
    return {m for f in files for m in re.findall(r"^\s*class\s+(\w+)", f.read_text(encoding="utf-8"), re.M)}


def exception_problem(name: str, classes: set[str]) -> str | None:
    import builtins

    return None if hasattr(builtins, name) or name in classes else f"{name}: no such exception in optkit or Python"


# --- repository paths -----------------------------------------------------------------------------------------


def path_problems(span: Span) -> list[str]:
    problems = []
    for path_text, names in PATH.findall(span.text):
        # `tests/fixtures/open_llama/<case>/`: the part before a placeholder must exist
        concrete = re.split(r"[<{*]", path_text)[0]
        path = ROOT / concrete
        if not path.exists():
            problems.append(f"{concrete}: no such file or folder")
            continue
        if concrete == path_text and path_text.endswith("/") and not path.is_dir():
            problems.append(f"{path_text}: not a folder")
        source = path.read_text(encoding="utf-8") if path.is_file() else ""
        for name in filter(None, names.split("::")):
            if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b", source, re.M):
                problems.append(f"{path_text}: defines no {name!r}")
        tokens = span.text.split()
        if path.is_file() and path_text in tokens:
            for flag in tokens[tokens.index(path_text) + 1:]:
                flag = flag.split("=")[0]
                if flag.startswith("--") and flag not in source:
                    problems.append(f"{path_text} has no option {flag}")
    return problems


PATH_SPANS = [span for span in SPANS if PATH.search(span.text)]


# --- bare flags -----------------------------------------------------------------------------------------------

BARE_FLAG = re.compile(r"^--[a-z][\w-]*(?:[ =]\S.*)?$")  # `--device-map`, `--corpus library`, `--a 3 --b 1`
SCRIPT_FOLDERS = ("benchmarks", "examples", "optkit", "plugins", "tests/oracles")


def _cli_options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions).union(*(_cli_options(p) for p in _subparsers(parser).values()))


def _script_text() -> str:
    """Every script a prose flag may belong to (benchmarks, example trainers, fixture makers): flags are strings
    in their argparse calls, or words in a shell script."""
    files = [f for folder in SCRIPT_FOLDERS for ext in ("py", "sh") for f in sorted((ROOT / folder).rglob(f"*.{ext}"))]
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def bare_flag_problems(span: Span, options: set[str], scripts: str) -> list[str]:
    """A span that is only a flag (with values) names an option of some optkit command or of a repository script."""
    flags = [token.split("=")[0] for token in span.text.split() if token.startswith("--")]
    return [f"{flag}: no optkit command or repository script has this option" for flag in flags
            if flag not in options and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", scripts)]


FLAG_SPANS = [span for span in SPANS if BARE_FLAG.match(span.text)]


# --- the checks -----------------------------------------------------------------------------------------------


def _report(failures: list[str], kind: str) -> str:
    return f"{len(failures)} {kind} in the docs do not exist (fix the doc, or the code it promises):\n" + \
        "\n".join(failures)


def test_every_documented_command_parses() -> None:
    failures = [f"{span.where}: {problem}" for span, command in COMMANDS
                if (problem := command_problem(command)) is not None]
    assert not failures, _report(failures, "commands")


def test_every_documented_python_name_exists() -> None:
    failures = [f"{span.where}: {problem}" for span in PYTHON_SPANS for problem in python_problems(span)]
    assert not failures, _report(failures, "Python names")


def test_every_documented_exception_exists() -> None:
    classes = defined_classes()
    failures = [f"{span.where}: {problem}" for span in EXCEPTION_SPANS
                if (problem := exception_problem(span.text, classes)) is not None]
    assert not failures, _report(failures, "exceptions")


def test_every_documented_path_exists() -> None:
    failures = [f"{span.where}: {problem}" for span in PATH_SPANS for problem in path_problems(span)]
    assert not failures, _report(failures, "paths")


def test_every_documented_bare_flag_exists() -> None:
    options, scripts = _cli_options(build_parser()), _script_text()
    failures = [f"{span.where}: {problem}" for span in FLAG_SPANS
                for problem in bare_flag_problems(span, options, scripts)]
    assert not failures, _report(failures, "flags")


def test_the_docs_give_each_check_something_to_check() -> None:
    """A broken extractor must not pass by finding nothing: the docs hold dozens of spans of each kind."""
    assert len(SPANS) > 1000
    assert len(COMMANDS) >= 30 and len(PYTHON_SPANS) >= 80 and len(PATH_SPANS) >= 60 and len(FLAG_SPANS) >= 40
    assert len(EXCEPTION_SPANS) >= 20


# --- the checkers catch what they are for ---------------------------------------------------------------------


def test_spans_skip_fenced_blocks_and_keep_line_numbers() -> None:
    text = "a `one`\n```bash\noptkit `not-a-span`\n```\n  ~~~\n`nor this`\n  ~~~\nb ``two `x` two``\n`multi\nline`\n"
    spans = code_spans(ROOT / "README.md", text)
    assert [(s.line, s.text) for s in spans] == [(1, "one"), (8, "two `x` two"), (9, "multi line")]


@pytest.mark.parametrize("command", [
    "plan opt-66b --max-memory 0=80GiB", "run --device-map ... -v", "info [--device cuda --dtype float16]",
    "spec show NAME|FILE", "train --lora-r", "train --tp-size N", "run --help", "--debug run ...",
    "bench --preset opt-125m --variants sdpa/onednn sdpa/torch --batch 1 8", "spec validate",
])
def test_documented_command_forms_parse(command: str) -> None:
    assert command_problem(command) is None


@pytest.mark.parametrize(("command", "named"), [
    ("run --no-such-flag", "--no-such-flag"), ("frobnicate", "frobnicate"), ("plan opt-66b --dtype float64", "float64"),
    ("train --lora-r two", "two"), ("spec shows x", "shows"), ("plugins [--jsn]", "--jsn"),
])
def test_a_wrong_command_is_caught(command: str, named: str) -> None:
    problem = command_problem(command)
    assert problem is not None and named in problem


@pytest.mark.parametrize(("text", "named"), [
    ("optkit.no_such_function", "no_such_function"), ("optkit.inference.nope(model)", "nope"),
    ("optkit.from_pretrained(path, no_such_kwarg=1)", "no_such_kwarg"),
    ("optkit.load_spec(a, b, c, d, e, f, g)", "too many positional"), ("model.no_such_method()", "no_such_method"),
    ("model.save_adapter(dir, bogus=True)", "bogus"), ("from optkit.testing import NoSuchSuite", "NoSuchSuite"),
    ("optkit.plan(model, *, wrong_name=None)", "wrong_name"),
])
def test_a_wrong_python_name_is_caught(text: str, named: str) -> None:
    problems = python_problems(Span(ROOT / "README.md", 1, text))
    assert problems and named in problems[0]


@pytest.mark.parametrize("text", [
    "optkit.from_pretrained(..., device_map=...)", "model.device_map", "model.inference_session = None",
    "optkit.build(spec, *, dtype=None, device=None, registry=None, target_device=None, **component_overrides)",
    "model.py", "python -m optkit.parallel.memory_table",
])
def test_a_right_python_name_passes(text: str) -> None:
    assert python_problems(Span(ROOT / "README.md", 1, text)) == []


@pytest.mark.parametrize(("text", "named"), [
    ("tests/test_no_such_file.py", "test_no_such_file"), ("tests/test_docs_references.py::test_nope", "test_nope"),
    ("optkit/cli.py/", "not a folder"), ("python benchmarks/profile_decode.py --no-such-option", "--no-such-option"),
])
def test_a_wrong_path_is_caught(text: str, named: str) -> None:
    problems = path_problems(Span(ROOT / "README.md", 1, text))
    assert problems and named in problems[0]


@pytest.mark.parametrize(("text", "unknown"), [
    ("--max-memory 0=80GiB", []), ("--corpus library", []), ("--device-mapp auto", ["--device-mapp"]),
    ("--memory --no-such-one", ["--no-such-one"]),
])
def test_a_bare_flag_must_be_some_option(text: str, unknown: list[str]) -> None:
    found = bare_flag_problems(Span(ROOT / "README.md", 1, text), _cli_options(build_parser()), _script_text())
    assert [problem.split(":")[0] for problem in found] == unknown


def test_an_exception_must_be_defined() -> None:
    classes = defined_classes()
    assert exception_problem("CheckpointError", classes) is None and exception_problem("KeyError", classes) is None
    assert "CheckpointEror" in (exception_problem("CheckpointEror", classes) or "")


def test_a_right_path_passes() -> None:
    span = Span(ROOT / "README.md", 1, "tests/test_docs_references.py::test_a_right_path_passes")
    assert path_problems(span) == [] and path_problems(Span(ROOT / "README.md", 1, "tests/fixtures/<case>/")) == []
