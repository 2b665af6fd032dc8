"""Plugins cannot take optkit down (issue 13, section 4; issue 20's loader items).

A plugin that exits, interrupts or raises anything while importing or in its hook, that registers a
name another plugin has, or that forgets ``@optkit.hookimpl`` is isolated: listed as broken with the
error, a PluginLoadWarning naming it, everything else working. A factory that fails or returns the
wrong thing is one ComponentError at build time naming the component, the plugin and the problem.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import optkit
from optkit.errors import BackendUnavailableError, ComponentError, PluginLoadError, PluginLoadWarning
from optkit.interfaces import MLP, AttentionKernel, AttentionResult, TokenEmbedding
from optkit.plugins import load_entry_points
from optkit.registration import Capabilities, Provider, Registry
from optkit.spec import load_spec
from optkit.testing import add_plugin, fresh_registry, temporary_plugin
from tests.helpers.plugins import PLUGIN_ENV as ENV
from tests.helpers.plugins import FakeDist, FakeEntryPoint

KEEP_WORKING = "; the other plugins keep working. Set OPTKIT_STRICT_PLUGINS=1 to make this fatal."
ACME = Provider("acme", "acme-kernels", "1.0")

GOOD = """
import optkit

@optkit.hookimpl
def optkit_register(registry):
    registry.register("mlp", "{name}", lambda params, ctx: None)
"""




@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """plugin(module, source) writes tmp_path/<module>.py and returns an entry point (distribution acme-<module>)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def make(module: str, source: str) -> FakeEntryPoint:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        written.append(module)
        importlib.invalidate_caches()
        return FakeEntryPoint(module, module, FakeDist(f"acme-{module}"))

    yield make
    for module in written:
        sys.modules.pop(module, None)


def load(registry: Registry, *eps: FakeEntryPoint) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_entry_points(registry, eps=list(eps))
    return [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]


def status(registry: Registry, name: str) -> tuple[str, str, list[tuple[str, str]]]:
    (record,) = [p for p in registry.plugins if p.name == name]
    return record.status, record.reason, record.components


# -- BaseExceptions at import and in the hook ---------------------------------------------------------
@pytest.mark.parametrize(("source", "reason"), [
    ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ("raise KeyboardInterrupt('not the user')\n", "KeyboardInterrupt: not the user"),
    ("class Custom(BaseException):\n    pass\nraise Custom('odd')\n", "Custom: odd"),
    ("raise GeneratorExit()\n", "GeneratorExit"),
])
def test_a_plugin_that_exits_while_importing_is_isolated(plugin, source, reason):
    registry = Registry(autoload=False)
    messages = load(registry, plugin("okx_import", source), plugin("okx_fine", GOOD.format(name="fine")))
    assert messages == [f'error importing optkit plugin "okx_import" (acme-okx_import): {reason}' + KEEP_WORKING]
    assert status(registry, "okx_import") == ("broken", reason, [])
    assert registry.names("mlp") == ["fine"]


HOOK_EXITS = """
import sys
import optkit

@optkit.hookimpl
def optkit_register(registry):
    registry.register("mlp", "half", lambda params, ctx: None)
    registry.register("attention", "eager", lambda params, ctx: None, override=True)
    {action}
"""


@pytest.mark.parametrize(("action", "reason"), [
    ("sys.exit(3)", "SystemExit: 3"),
    ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    ("raise SystemExit('bye')", "SystemExit: bye"),
])
def test_a_hook_that_exits_is_isolated_and_rolled_back(plugin, action, reason):
    registry = fresh_registry()
    eager = registry.get("attention", "eager")
    messages = load(registry, plugin("okx_hook", HOOK_EXITS.format(action=action)))
    assert messages == [f'the optkit_register hook of plugin "okx_hook" raised: {reason}' + KEEP_WORKING]
    assert status(registry, "okx_hook") == ("broken", reason, [])
    assert ("mlp", "half") not in registry
    assert registry.get("attention", "eager") is eager  # the override is undone too


def test_strict_mode_turns_an_exit_into_a_plugin_load_error(plugin, monkeypatch):
    monkeypatch.setenv("OPTKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError) as info:
        load_entry_points(Registry(autoload=False), eps=[plugin("okx_strict", "import sys\nsys.exit(3)\n")])
    assert str(info.value) == ('error importing optkit plugin "okx_strict" (acme-okx_strict): SystemExit: 3 '
                               "(OPTKIT_STRICT_PLUGINS is set)")
    assert isinstance(info.value.__cause__, SystemExit)


def test_a_real_ctrl_c_while_plugins_load_still_interrupts(plugin):
    """The user's own SIGINT (not a KeyboardInterrupt the plugin raised) goes through, and nothing
    half-registered stays behind."""
    source = """
    import os, signal, time
    import optkit

    @optkit.hookimpl
    def optkit_register(registry):
        registry.register("mlp", "interrupted", lambda params, ctx: None)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    """
    registry = Registry(autoload=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        load_entry_points(registry, eps=[plugin("okx_ctrl_c", source)])
    assert ("mlp", "interrupted") not in registry
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the watch is gone again


def test_a_made_up_keyboard_interrupt_in_a_thread_is_isolated(plugin):
    """Ctrl-C reaches only the main thread: in another thread every KeyboardInterrupt is the plugin's."""
    registry, messages = Registry(autoload=False), []
    ep = plugin("okx_thread", "raise KeyboardInterrupt('from a thread')\n")
    worker = threading.Thread(target=lambda: messages.extend(load(registry, ep)))
    worker.start()
    worker.join()
    assert status(registry, "okx_thread") == ("broken", "KeyboardInterrupt: from a thread", [])


# -- duplicates: the later plugin is disabled, nothing else ----------------------------------------
def test_a_third_party_plugin_that_registers_a_first_party_name_is_disabled(plugin):
    registry = fresh_registry()
    eager = registry.get("attention", "eager")
    source = """
    import optkit

    @optkit.hookimpl
    def optkit_register(registry):
        registry.register("mlp", "okx_extra", lambda params, ctx: None)
        registry.register("attention", "eager", lambda params, ctx: None)
    """
    (message,) = load(registry, plugin("okx_dup", source))
    assert message == (
        'optkit plugin "okx_dup" (acme-okx_dup) is disabled: DuplicateComponentError: attention \'eager\' is '
        "registered twice: by plugin 'eager' (optkit " + optkit.__version__ + ") and by plugin 'okx_dup' "
        "(acme-okx_dup 1.0). Uninstall or block one of them (OPTKIT_BLOCK_PLUGINS), or register with "
        "override=True" + KEEP_WORKING)
    assert status(registry, "okx_dup")[0] == "broken"
    assert registry.get("attention", "eager") is eager and ("mlp", "okx_extra") not in registry
    model = optkit.build("opt-tiny", registry=registry)  # builds that do not use the clash keep working
    assert model.attention_backend == "eager"


# -- the @optkit.hookimpl marker ------------------------------------------------------------------
UNMARKED = """
def optkit_register(registry):
    registry.register("mlp", "never", lambda params, ctx: None)
"""


def test_a_hook_without_the_marker_is_reported_not_silently_ok(plugin):
    registry = Registry(autoload=False)
    messages = load(registry, plugin("okx_unmarked", UNMARKED), plugin("okx_empty", "x = 1\n"))
    assert messages == [
        'optkit plugin "okx_empty" (acme-okx_empty) registers nothing: TypeError: it defines no @optkit.hookimpl '
        "optkit_register(registry) function" + KEEP_WORKING,
        'optkit plugin "okx_unmarked" (acme-okx_unmarked) registers nothing: TypeError: its optkit_register '
        "function is not marked @optkit.hookimpl" + KEEP_WORKING]
    assert status(registry, "okx_unmarked") == (
        "broken", "TypeError: its optkit_register function is not marked @optkit.hookimpl", [])
    assert registry.names("mlp") == []


def test_add_plugin_checks_exactly_what_the_loader_checks():
    module = types.ModuleType("okx_module")
    exec(textwrap.dedent(UNMARKED), module.__dict__)
    registry = Registry(autoload=False)
    with pytest.raises(PluginLoadError, match=r'^optkit plugin "okx_module" \(<temporary>\) registers nothing: '
                                              r"TypeError: its optkit_register function is not marked"):
        add_plugin(module, registry)
    assert registry.names("mlp") == []


def test_add_plugin_rolls_back_overrides_and_temporary_plugin_restores_them():
    registry = fresh_registry()
    eager = registry.get("attention", "eager")
    failing, overriding = types.ModuleType("okx_failing"), types.ModuleType("okx_overriding")
    exec(textwrap.dedent(HOOK_EXITS.format(action="raise RuntimeError('late')")), failing.__dict__)
    exec(textwrap.dedent(HOOK_EXITS.format(action="pass")), overriding.__dict__)
    with pytest.raises(PluginLoadError, match=r'^the optkit_register hook of plugin "okx_failing" raised: '
                                              r"RuntimeError: late$"):
        add_plugin(failing, registry)
    assert registry.get("attention", "eager") is eager and ("mlp", "half") not in registry
    with temporary_plugin(overriding, registry=registry) as added:
        assert added == [("mlp", "half")]
        assert registry.get("attention", "eager").provider.plugin == "okx_overriding"
    assert registry.get("attention", "eager").factory is eager.factory
    assert ("mlp", "half") not in registry


# -- factories: one ComponentError at build time ------------------------------------------------------
class Kernel(AttentionKernel):
    name = "acme_attention"

    def forward(self, query, key, value, mask, *, scale, dropout_p=0.0, need_weights=False):
        return AttentionResult(value, None)


class KernelWithWeights(Kernel):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))


class WideMLP(MLP):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2 * width)

    def forward(self, x):
        return self.fc(x)


class NarrowEmbedding(TokenEmbedding):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab, 3))
        self.embedding_dim = 3

    def forward(self, input_ids):
        return self.weight[input_ids]


def raises(params, ctx):
    raise RuntimeError("cannot allocate the lookup table")


def exits(params, ctx):
    sys.exit(4)


@pytest.mark.parametrize(("kind", "factory", "problem"), [
    ("attention", raises, "failed to build: RuntimeError: cannot allocate the lookup table"),
    ("attention", exits, "failed to build: SystemExit: 4"),
    ("attention", lambda params, ctx: None, "returned None (NoneType), not an optkit.interfaces.AttentionKernel"),
    ("attention", lambda params, ctx: "sdpa", "returned 'sdpa' (str), not an optkit.interfaces.AttentionKernel"),
    ("attention", lambda params, ctx: nn.Identity(), "returned Identity() (Identity), not an "
                                                     "optkit.interfaces.AttentionKernel"),
    ("attention", lambda params, ctx: KernelWithWeights(), "returned an attention kernel with parameters; a kernel "
                                                           "computes only (weights belong to the block)"),
    ("mlp", lambda params, ctx: WideMLP(ctx.decoder.hidden_size),
     "built an MLP that maps 64 features (decoder.hidden_size) to shape (1, 1, 128) for an input of shape "
     "(1, 1, 64); an mlp must return hidden_size features"),
    ("mlp", lambda params, ctx: torch.nn.ReLU(), "returned ReLU() (ReLU), not an optkit.interfaces.MLP"),
    ("token_embedding", lambda params, ctx: NarrowEmbedding(ctx.decoder.vocab_size),
     "built a token embedding 3 wide, but the spec needs 64 (decoder.word_embed_proj_dim or hidden_size)"),
    ("norm", lambda params, ctx: 1e-5, "returned 1e-05 (float), which is not callable; a norm factory returns a "
                                       "factory of norm modules"),
    ("head", lambda params, ctx: nn.Linear(64, 512), "returned Linear(in_features=64, out_features=512, bias=True) "
                                                     "(Linear), not an optkit.interfaces.Head"),
])
def test_a_broken_factory_is_one_error_at_build_time(kind, factory, problem):
    registry = fresh_registry()
    with registry.providing(ACME):
        registry.register(kind, "acme_broken", factory)
    with pytest.raises(ComponentError) as info:
        optkit.build("opt-tiny", registry=registry, **{kind: "acme_broken"})
    assert str(info.value).startswith(f"{kind} 'acme_broken' from plugin 'acme' (acme-kernels 1.0) {problem}")


def test_a_broken_cache_factory_is_one_error_when_a_cache_is_made():
    registry = fresh_registry()
    with registry.providing(ACME):
        registry.register("kv_cache", "acme_cache", lambda params, ctx: "dynamic")
    model = optkit.build("opt-tiny", kv_cache="acme_cache", registry=registry)
    with pytest.raises(ComponentError) as info:
        model.new_cache(batch_size=1)
    assert str(info.value) == (
        "kv_cache 'acme_cache' from plugin 'acme' (acme-kernels 1.0) returned 'dynamic' (str), which is not "
        'callable; a kv_cache factory returns a factory of kv_cache modules (see docs/hooks.md, "Component kinds")')


def test_a_factory_with_the_wrong_signature_is_refused_when_registered():
    registry = Registry(autoload=False)
    with pytest.raises(ComponentError) as info:
        registry.register("attention", "acme_sig", lambda params: Kernel())
    assert str(info.value) == ("attention 'acme_sig': factory <lambda>(params) cannot be called as "
                               "factory(params, ctx): too many positional arguments")
    with pytest.raises(ComponentError, match=r"^mlp 'acme_none': factory must be callable as factory\(params, ctx\), "
                                             r"got None$"):
        registry.register("mlp", "acme_none", None)


def test_a_wrong_signature_in_a_hook_makes_the_plugin_broken(plugin):
    registry = Registry(autoload=False)
    source = """
    import optkit

    @optkit.hookimpl
    def optkit_register(registry):
        registry.register("mlp", "okx_sig", lambda: None)
    """
    (message,) = load(registry, plugin("okx_sig", source))
    assert message.startswith('the optkit_register hook of plugin "okx_sig" raised: ComponentError: mlp '
                              "'okx_sig': factory <lambda>() cannot be called as factory(params, ctx)")


# -- availability checks -------------------------------------------------------------------------------
def test_a_check_that_crashes_makes_its_component_unavailable_not_optkit():
    registry = fresh_registry()

    def check(device, dtype):
        raise SystemExit("check exploded")

    with registry.providing(ACME):
        entry = registry.register("attention", "acme_checked", lambda params, ctx: Kernel(), check=check,
                                  auto_priority=100)
        registry.register("attention", "acme_odd", lambda params, ctx: Kernel(), check=lambda d, t: "no")
    assert entry.unavailable_reasons("cpu", torch.float32) == [
        "its availability check (plugin 'acme' (acme-kernels 1.0)) raised SystemExit: check exploded"]
    assert registry.get("attention", "acme_odd").unavailable_reasons("cpu", torch.float32) == [
        "its availability check (plugin 'acme' (acme-kernels 1.0)) returned 'no', not a list of reasons"]
    assert registry.select_auto("attention", "cpu", torch.float32).name == "sdpa"  # skipped, not crashed
    with pytest.raises(BackendUnavailableError, match="check exploded"):
        optkit.build("opt-tiny", attention="acme_checked", registry=registry)


# -- auto priority ----------------------------------------------------------------------------------
def test_a_third_party_backend_declares_its_auto_priority():
    registry = fresh_registry()
    with registry.providing(ACME):
        registry.register("attention", "acme_fast", lambda params, ctx: Kernel(), auto_priority=50)
        registry.register("attention", "sdpa_clone", lambda params, ctx: Kernel(), auto_priority=5)
    assert registry.select_auto("attention", "cpu", torch.float32).name == "acme_fast"
    assert registry.auto_priority(registry.get("attention", "sdpa_clone")) == 5
    with registry.providing(ACME):  # a catalogued name keeps registry.yaml's priority (sdpa: 10)
        entry = registry.register("attention", "sdpa", lambda params, ctx: Kernel(), auto_priority=99,
                                  override=True)
    assert registry.auto_priority(entry) == 10


@pytest.mark.parametrize(("kind", "priority"), [("mlp", 5), ("attention", 1.5), ("attention", True)])
def test_auto_priority_only_for_auto_kinds_and_only_ints(kind, priority):
    with pytest.raises(ComponentError, match=r"auto_priority must be an int, and only for the kinds that accept "
                                             r"'auto' \(attention, linear, kv_cache\)"):
        Registry(autoload=False).register(kind, "acme", lambda params, ctx: None, auto_priority=priority)


# -- capabilities where they matter ----------------------------------------------------------------
def test_attention_dropout_needs_a_kernel_that_supports_dropout():
    registry = fresh_registry()
    with registry.providing(ACME):
        registry.register("attention", "acme_nodrop", lambda params, ctx: Kernel(),
                          capabilities=Capabilities(dropout=False))
    spec = load_spec("opt-tiny", decoder={"attention_dropout": 0.1}, registry=registry)
    with pytest.raises(BackendUnavailableError) as info:
        optkit.build(spec, attention="acme_nodrop", registry=registry)
    assert str(info.value) == (
        "attention 'acme_nodrop' (plugin 'acme' (acme-kernels 1.0)) cannot be used here: it does not support "
        "dropout, which decoder.attention_dropout=0.1 applies in training mode (a freshly built model is in "
        "training mode); set it to 0, or load weights for inference (optkit.from_pretrained). Components of this "
        "kind that can: eager, flash, sdpa, xformers")
    assert optkit.build(spec, attention="acme_nodrop", registry=registry, device="meta")  # loading: no training
    assert optkit.build("opt-tiny", attention="acme_nodrop", registry=registry)  # no dropout: fine


# -- end to end: installed plugins that misbehave ------------------------------------------------------
MISBEHAVING = {
    "okx_exit_at_import": "import sys\nsys.exit(3)\n",
    "okx_exit_in_hook": "import sys, optkit\n\n@optkit.hookimpl\ndef optkit_register(registry):\n    sys.exit(3)\n",
    "okx_takes_eager": ("import optkit\n\n@optkit.hookimpl\ndef optkit_register(registry):\n"
                        "    registry.register('attention', 'eager', lambda params, ctx: None)\n"),
    "okx_unmarked": UNMARKED,
}


@pytest.fixture(scope="module")
def misbehaving_site(tmp_path_factory) -> Path:
    """A directory with installed-looking plugins (a dist-info with entry points) that misbehave."""
    site = tmp_path_factory.mktemp("misbehaving_site")
    for module, source in MISBEHAVING.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = site / "okx_misbehaving-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: okx-misbehaving\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[optkit]\n" + "".join(f"{module} = {module}\n" for module in MISBEHAVING), encoding="utf-8")
    return site


def run_python(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` run in ``site``: Python looks for modules and distributions in the working
    directory of a ``-c`` command, so the plugins there are found like installed ones."""
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=site,
                          timeout=300)


def test_optkit_plugins_and_build_survive_misbehaving_installed_plugins(misbehaving_site):
    result = run_python(misbehaving_site, "import sys; from optkit.cli import main; sys.exit(main(['plugins']))")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "okx_exit_at_import (okx-misbehaving 1.0) [broken: SystemExit: 3]" in lines
    assert "okx_exit_in_hook (okx-misbehaving 1.0) [broken: SystemExit: 3]" in lines
    assert any(line.startswith("okx_takes_eager (okx-misbehaving 1.0) [broken: DuplicateComponentError: attention "
                               "'eager' is registered twice: by plugin 'eager' (optkit") for line in lines)
    assert ("okx_unmarked (okx-misbehaving 1.0) [broken: TypeError: its optkit_register function is not marked "
            "@optkit.hookimpl]") in lines
    assert "eager (optkit " + optkit.__version__ + ") [ok]" in lines
    code = ("import optkit, torch; m = optkit.build('opt-tiny').eval(); "
            "print(m.attention_backend, tuple(m(torch.tensor([[5, 6]])).logits.shape))")
    result = run_python(misbehaving_site, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "eager (1, 2, 512)\n"
    assert result.stderr.count("PluginLoadWarning") == 4
