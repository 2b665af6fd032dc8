"""docs/hooks.md documents the plugin API exactly as the code defines it, and tests use it.

Signatures are rendered from ``inspect.signature`` and must appear verbatim in the docs:
a renamed parameter, a new default or a new hook fails here until the docs follow. Each
hook, registration method and component kind must also be exercised by some test.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from optkit.context import BuildContext
from optkit.interfaces import (
    MLP,
    AttentionKernel,
    AttentionMask,
    DecoderBlock,
    Head,
    KVCache,
    KVCacheFactory,
    LinearFactory,
    Norm,
    NormFactory,
    PositionalEmbedding,
    TokenEmbedding,
)
from optkit.plugins import PLUGIN_API, HookSpecs
from optkit.registration import KINDS, Capabilities, Registry

ROOT = Path(__file__).resolve().parents[1]
HOOKS = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
TUTORIAL = (ROOT / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
EXAMPLE = ROOT / "examples" / "third_party_attention_plugin"
TESTS = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "tests").glob("*.py"))
                  if p.name != Path(__file__).name)

REGISTRATION_METHODS = ("register", "unregister", "providing")
# What a factory of each kind returns, and the methods the core calls on it.
KIND_INTERFACES: dict[str, list[Callable[..., Any]]] = {
    "token_embedding": [TokenEmbedding.forward, TokenEmbedding.embed_inputs],
    "positional_embedding": [PositionalEmbedding.additive, PositionalEmbedding.rotate],
    "attention": [AttentionKernel.forward],
    "mlp": [MLP.forward],
    "norm": [NormFactory.__call__, Norm.forward],
    "linear": [LinearFactory.__call__],
    "kv_cache": [KVCacheFactory.__call__, KVCache.get_seq_length, KVCache.attended_length, KVCache.update,
                 KVCache.reorder],
    "block": [DecoderBlock.forward, DecoderBlock.kv_heads.fget],
    "head": [Head.forward],
}


def _default(value: Any) -> str:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, frozenset):  # a set's repr order changes between runs
        return "frozenset({" + ", ".join(repr(v) for v in sorted(value)) + "})"
    return repr(value)


def _annotation(annotation: Any) -> str:
    if not isinstance(annotation, str):
        return inspect.formatannotation(annotation)
    quoted = re.fullmatch(r"""(['"])(.*)\1""", annotation)  # `registry: "Registry"` under future annotations
    return quoted.group(2) if quoted else annotation


def _parameter(p: inspect.Parameter) -> str:
    text = ("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
    if p.annotation is not p.empty:
        text += f": {_annotation(p.annotation)}"
    if p.default is not p.empty:
        text += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
    return text


def render(func: Callable[..., Any], name: str | None = None) -> str:
    """``name(params) -> return`` as written in the docs, without ``self``."""
    sig = inspect.signature(func)
    parts: list[str] = []
    star = False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
        star = star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        parts.append(_parameter(p))
    result = "" if sig.return_annotation is sig.empty else f" -> {_annotation(sig.return_annotation)}"
    return f"{name or func.__name__}({', '.join(parts)}){result}"


def qualified(func: Callable[..., Any]) -> str:
    return render(func, func.__qualname__)


def hookspecs() -> list[Callable[..., Any]]:
    return [f for name, f in vars(HookSpecs).items() if callable(f) and not name.startswith("_")]


def test_there_is_a_hook_to_document():
    assert [f.__name__ for f in hookspecs()] == ["optkit_register"]


@pytest.mark.parametrize("hook", hookspecs(), ids=lambda f: f.__name__)
def test_every_hookspec_is_documented_and_tested(hook):
    assert render(hook) in HOOKS, f"docs/hooks.md lacks `{render(hook)}`"
    assert hook.__name__ in TESTS


@pytest.mark.parametrize("method", REGISTRATION_METHODS)
def test_registration_methods_are_documented_and_tested(method):
    func = getattr(Registry, method)
    assert qualified(func) in HOOKS, f"docs/hooks.md lacks `{qualified(func)}`"
    assert re.search(rf"\.{method}\(", TESTS), f"no test calls Registry.{method}"


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_documented_with_its_interface_and_tested(kind):
    assert set(KIND_INTERFACES) == set(KINDS), "a new component kind: add its interface to KIND_INTERFACES"
    assert f"| `{kind}` |" in HOOKS, f"docs/hooks.md has no table row for kind `{kind}`"
    for func in KIND_INTERFACES[kind]:
        assert qualified(func) in HOOKS, f"docs/hooks.md lacks `{qualified(func)}`"
    assert f'"{kind}"' in TESTS or f"'{kind}'" in TESTS, f"no test names the kind {kind!r}"


def test_capabilities_fields_are_documented():
    for name, info in Capabilities.model_fields.items():
        line = f"{name}: {_annotation(info.annotation)} = {_default(info.default)}"
        assert line in HOOKS, f"docs/hooks.md lacks the Capabilities field `{line}`"


def test_build_context_is_documented():
    for f in dataclasses.fields(BuildContext):
        assert f"{f.name}: {_annotation(f.type)}" in HOOKS, f"docs/hooks.md lacks BuildContext.{f.name}"
    for name, member in vars(BuildContext).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            assert f"BuildContext.{name}" in HOOKS
        elif inspect.isfunction(member):
            assert qualified(member) in HOOKS, f"docs/hooks.md lacks `{qualified(member)}`"


def test_attention_mask_is_documented():
    for f in dataclasses.fields(AttentionMask):
        assert f"{f.name}: {_annotation(f.type)}" in HOOKS, f"docs/hooks.md lacks AttentionMask.{f.name}"
    for name in ("allowed", "additive"):
        assert qualified(getattr(AttentionMask, name)) in HOOKS
    for name in ("has_padding", "is_plain_causal", "sees_every_key", "query_has_keys", "has_empty_rows", "device"):
        assert f"`{name}`" in HOOKS, f"docs/hooks.md does not mention AttentionMask.{name}"


def test_plugin_api_version_is_documented():
    assert f"OPTKIT_PLUGIN_API = {PLUGIN_API}" in HOOKS
    assert f"OPTKIT_PLUGIN_API = {PLUGIN_API}" in TUTORIAL


@pytest.mark.parametrize("path", ["pyproject.toml", "optkit_chunked_attention/__init__.py"])
def test_tutorial_shows_the_example_plugin_verbatim(path):
    text = (EXAMPLE / path).read_text(encoding="utf-8")
    assert text.strip() in TUTORIAL, f"docs/writing-a-plugin.md no longer matches examples/.../{path}"


def test_docs_link_each_other_and_the_index_lists_them():
    assert "](hooks.md" in TUTORIAL and "](writing-a-plugin.md" in HOOKS
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert [page for page in ("hooks.md", "writing-a-plugin.md") if f"]({page})" not in index] == []
