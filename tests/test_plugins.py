"""optkit.plugins: entry-point loading, isolation of broken plugins, environment switches."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest

from optkit.errors import DuplicateComponentError, PluginLoadError, PluginLoadWarning
from optkit.plugins import load_entry_points
from optkit.registration import Provider, Registry
from tests.helpers.plugins import PLUGIN_ENV as ENV
from tests.helpers.plugins import FakeDist, FakeEntryPoint
KEEP_WORKING = "; the other plugins keep working. Set OPTKIT_STRICT_PLUGINS=1 to make this fatal."

GOOD = """
import optkit

def toy(params, ctx):
    return "{name}"

@optkit.hookimpl
def optkit_register(registry):
    registry.register("attention", "{name}", toy)
"""




@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def registry() -> Registry:
    return Registry(autoload=False)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """plugin(module, source, dist=...) writes tmp_path/<module>.py and returns an entry point for it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def make(module: str, source: str, dist: str | None = None, version: str = "1.0", name: str | None = None):
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        written.append(module)
        importlib.invalidate_caches()
        return FakeEntryPoint(name or module, module, FakeDist(dist, version) if dist else None)

    yield make
    for module in written:
        sys.modules.pop(module, None)


def good(plugin, module, **kw):
    return plugin(module, GOOD.format(name=module), **kw)


def record(registry: Registry, name: str):
    (found,) = [p for p in registry.plugins if p.name == name]
    return found


def test_good_plugin(registry, plugin):
    load_entry_points(registry, eps=[good(plugin, "okit_good", dist="optkit-good", version="0.3")])
    entry = registry.get("attention", "okit_good")
    assert entry.factory(None, None) == "okit_good"
    assert entry.provider == Provider("okit_good", "optkit-good", "0.3")
    assert [(p.name, p.distribution, p.version, p.status, p.reason, p.components) for p in registry.plugins] == [
        ("okit_good", "optkit-good", "0.3", "ok", "", [("attention", "okit_good")])]


def test_plain_entry_point_without_distribution(registry, plugin):
    good(plugin, "okit_plain")
    ep = EntryPoint(name="plain", value="okit_plain", group="optkit")
    load_entry_points(registry, eps=[ep])
    assert registry.get("attention", "okit_plain").provider == Provider("plain", "?", "?")
    assert record(registry, "plain").status == "ok"


def test_plugin_that_fails_to_import(registry, plugin):
    eps = [
        plugin("okit_broken", "raise ImportError('triton is not installed')", dist="optkit-broken"),
        good(plugin, "okit_fine", dist="optkit-fine"),
    ]
    with pytest.warns(PluginLoadWarning) as warned:
        load_entry_points(registry, eps=eps)
    assert [str(w.message) for w in warned] == [
        'error importing optkit plugin "okit_broken" (optkit-broken): ImportError: triton is not installed'
        + KEEP_WORKING]
    broken = record(registry, "okit_broken")
    assert (broken.status, broken.reason, broken.components) == (
        "broken", "ImportError: triton is not installed", [])
    assert record(registry, "okit_fine").status == "ok"
    assert registry.names("attention") == ["okit_fine"]


def test_hook_that_raises_is_rolled_back(registry, plugin):
    source = """
    import optkit

    def half(params, ctx):
        return None

    @optkit.hookimpl
    def optkit_register(registry):
        registry.register("attention", "half_a", half)
        registry.register("mlp", "half_b", half)
        raise RuntimeError("boom")
    """
    eps = [good(plugin, "okit_before"), plugin("okit_raiser", source, dist="optkit-raiser")]
    with pytest.warns(PluginLoadWarning) as warned:
        load_entry_points(registry, eps=eps)
    assert [str(w.message) for w in warned] == [
        'the optkit_register hook of plugin "okit_raiser" raised: RuntimeError: boom' + KEEP_WORKING]
    raiser = record(registry, "okit_raiser")
    assert (raiser.status, raiser.reason, raiser.components) == ("broken", "RuntimeError: boom", [])
    assert registry.names("attention") == ["okit_before"]
    assert registry.names("mlp") == []


def test_strict_mode_makes_a_broken_plugin_fatal(registry, plugin, monkeypatch):
    monkeypatch.setenv("OPTKIT_STRICT_PLUGINS", "1")
    ep = plugin("okit_strict", "raise ImportError('triton is not installed')", dist="optkit-strict")
    with pytest.raises(PluginLoadError) as info:
        load_entry_points(registry, eps=[ep])
    assert str(info.value) == ('error importing optkit plugin "okit_strict" (optkit-strict): ImportError: triton is '
                               'not installed (OPTKIT_STRICT_PLUGINS is set)')
    assert isinstance(info.value.__cause__, ImportError)
    assert record(registry, "okit_strict").status == "broken"


def test_strict_mode_hook_error(registry, plugin, monkeypatch):
    monkeypatch.setenv("OPTKIT_STRICT_PLUGINS", "true")
    source = """
    import optkit

    @optkit.hookimpl
    def optkit_register(registry):
        raise ValueError("bad config")
    """
    with pytest.raises(PluginLoadError) as info:
        load_entry_points(registry, eps=[plugin("okit_strict_hook", source)])
    assert str(info.value) == ('the optkit_register hook of plugin "okit_strict_hook" raised: ValueError: bad config '
                               "(OPTKIT_STRICT_PLUGINS is set)")
    assert isinstance(info.value.__cause__, ValueError)


def test_disable_autoload_keeps_first_party(registry, plugin, monkeypatch):
    monkeypatch.setenv("OPTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    eps = [good(plugin, "okit_third", dist="optkit-third"), good(plugin, "okit_first", dist="optkit")]
    load_entry_points(registry, eps=eps)
    assert registry.names("attention") == ["okit_first"]
    third = record(registry, "okit_third")
    assert (third.status, third.reason) == ("disabled", "OPTKIT_DISABLE_PLUGIN_AUTOLOAD is set")
    assert "okit_third" not in sys.modules
    assert [p.name for p in registry.plugins] == ["okit_first", "okit_third"]  # first party first


def test_allow_list(registry, plugin, monkeypatch):
    monkeypatch.setenv("OPTKIT_LOAD_PLUGINS", "okit_allowed, other")
    eps = [good(plugin, "okit_allowed", dist="acme"), good(plugin, "okit_not_allowed", dist="acme"),
           good(plugin, "okit_own", dist="optkit")]
    load_entry_points(registry, eps=eps)
    assert registry.names("attention") == ["okit_allowed", "okit_own"]
    skipped = record(registry, "okit_not_allowed")
    assert (skipped.status, skipped.reason) == ("disabled", "not listed in OPTKIT_LOAD_PLUGINS")
    assert "okit_not_allowed" not in sys.modules


def test_block_list(registry, plugin, monkeypatch):
    monkeypatch.setenv("OPTKIT_BLOCK_PLUGINS", "okit_blocked,okit_blocked_own")
    eps = [good(plugin, "okit_blocked", dist="acme"), good(plugin, "okit_kept", dist="acme"),
           good(plugin, "okit_blocked_own", dist="optkit")]
    load_entry_points(registry, eps=eps)
    assert registry.names("attention") == ["okit_kept"]
    for name in ("okit_blocked", "okit_blocked_own"):  # the block list applies to first party too
        assert (record(registry, name).status, record(registry, name).reason) == (
            "blocked", "listed in OPTKIT_BLOCK_PLUGINS")
        assert name not in sys.modules


def test_misspelled_hook_is_broken(registry, plugin):
    source = """
    import optkit

    @optkit.hookimpl
    def optkit_registr(registry):
        registry.register("attention", "typo", lambda params, ctx: None)
    """
    eps = [plugin("okit_a_typo", source, dist="optkit-typo"), good(plugin, "okit_z_after")]
    with pytest.warns(PluginLoadWarning) as warned:
        load_entry_points(registry, eps=eps)
    (message,) = [str(w.message) for w in warned]
    assert message.startswith('optkit plugin "okit_a_typo" (optkit-typo) defines an unknown hook: '
                              "PluginValidationError: unknown hook 'optkit_registr' in plugin <module 'okit_a_typo'")
    assert message.endswith(KEEP_WORKING)
    typo = record(registry, "okit_a_typo")
    assert typo.status == "broken"
    assert typo.reason.startswith("PluginValidationError: unknown hook 'optkit_registr' in plugin <module 'okit_a_typo'")
    assert registry.names("attention") == ["okit_z_after"]  # later plugins still pass check_pending


SECOND_OF_A_NAME = """
import optkit

@optkit.hookimpl
def optkit_register(registry):
    registry.register("mlp", "okit_dup_extra", lambda params, ctx: None)  # rolled back with the plugin
    registry.register("attention", "okit_dup_a", lambda params, ctx: None)
"""


def test_same_component_from_two_distributions_disables_the_second(registry, plugin):
    """The later plugin (third parties load after optkit's own) is disabled, naming both providers;
    loading finishes, so `optkit plugins` still lists everything and other names keep working."""
    eps = [good(plugin, "okit_dup_a", dist="acme-a", version="1.0", name="first"),
           plugin("okit_dup_b", SECOND_OF_A_NAME, dist="acme-b", version="2.0", name="second"),
           good(plugin, "okit_dup_third", dist="acme-c", name="third")]
    duplicate = ("attention 'okit_dup_a' is registered twice: by plugin 'first' (acme-a 1.0) and by plugin "
                 "'second' (acme-b 2.0). Uninstall or block one of them (OPTKIT_BLOCK_PLUGINS), or register with "
                 "override=True")
    with pytest.warns(PluginLoadWarning) as warned:
        load_entry_points(registry, eps=eps)
    assert [str(w.message) for w in warned] == [
        f'optkit plugin "second" (acme-b) is disabled: DuplicateComponentError: {duplicate}' + KEEP_WORKING]
    assert [(p.name, p.status, p.reason, p.components) for p in registry.plugins] == [
        ("first", "ok", "", [("attention", "okit_dup_a")]),
        ("second", "broken", f"DuplicateComponentError: {duplicate}", []),
        ("third", "ok", "", [("attention", "okit_dup_third")])]
    assert registry.get("attention", "okit_dup_a").provider.plugin == "first"
    assert registry.names("attention") == ["okit_dup_a", "okit_dup_third"]
    assert registry.names("mlp") == []


def test_same_component_from_two_distributions_is_fatal_when_strict(registry, plugin, monkeypatch):
    monkeypatch.setenv("OPTKIT_STRICT_PLUGINS", "1")
    eps = [good(plugin, "okit_dupstrict_a", dist="acme-a", name="first"),
           plugin("okit_dupstrict_b", GOOD.format(name="okit_dupstrict_a"), dist="acme-b", name="second")]
    with pytest.raises(PluginLoadError, match=r"^optkit plugin \"second\" \(acme-b\) is disabled: "
                       r"DuplicateComponentError: attention 'okit_dupstrict_a' is registered twice: by plugin "
                       r"'first' \(acme-a 1.0\) and by plugin 'second' \(acme-b 1.0\)") as info:
        load_entry_points(registry, eps=eps)
    assert isinstance(info.value.__cause__, DuplicateComponentError)


def test_entry_point_name_clash_between_distributions(registry, plugin):
    eps = [good(plugin, "okit_clash_a", dist="acme-a", name="clash"),
           good(plugin, "okit_clash_b", dist="acme-b", name="clash")]
    with pytest.warns(PluginLoadWarning) as warned:
        load_entry_points(registry, eps=eps)
    assert [str(w.message) for w in warned] == [
        "plugin name 'clash' of acme-b clashes with acme-a: ValueError: duplicate entry-point name" + KEEP_WORKING]
    assert [(p.distribution, p.status, p.reason) for p in registry.plugins] == [
        ("acme-a", "ok", ""), ("acme-b", "broken", "ValueError: duplicate entry-point name")]
    assert registry.names("attention") == ["okit_clash_a"]


def test_import_optkit_loads_no_plugins():
    code = ("import sys, optkit; "
            "print(optkit.registry._loaded, sorted(m for m in sys.modules if m in "
            "{'optkit_attention_eager', 'optkit_attention_sdpa', 'optkit_torch_components', "
            "'optkit_llama_components'}))")
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                            timeout=120)
    assert result.stdout == "False []\n"


def test_installed_first_party_entry_points(registry):
    load_entry_points(registry)
    assert [(p.name, p.distribution, p.status) for p in registry.plugins] == [
        ("eager", "optkit", "ok"), ("flash", "optkit", "ok"), ("int8", "optkit", "ok"),
        ("llama_components", "optkit", "ok"), ("onednn", "optkit", "ok"), ("sdpa", "optkit", "ok"),
        ("torch_components", "optkit", "ok"), ("xformers", "optkit", "ok")]
    assert {(r.kind, r.name) for r in registry.registrations()} == {
        ("attention", "eager"), ("attention", "sdpa"), ("attention", "flash"), ("attention", "xformers"),
        ("linear", "torch"), ("linear", "int8"), ("linear", "nf4"), ("linear", "fp4"), ("linear", "onednn"),
        ("norm", "layernorm"), ("norm", "rmsnorm"),
        ("mlp", "ffn"), ("mlp", "gated"),
        ("token_embedding", "learned"), ("token_embedding", "stable"),
        ("positional_embedding", "learned"), ("positional_embedding", "rotary"),
        ("kv_cache", "dynamic"), ("kv_cache", "static"),
        ("block", "sequential"), ("head", "base"), ("head", "causal_lm"), ("head", "sequence_classification"), ("head", "question_answering"),
    }
    assert all(r.provider.distribution == "optkit" for r in registry.registrations())


def test_global_registry_loads_on_first_use():
    fresh = Registry(autoload=True)
    assert fresh._loaded is False and fresh.plugins == []
    assert fresh.names("attention") == ["eager", "flash", "sdpa", "xformers"]
    assert fresh._loaded is True
