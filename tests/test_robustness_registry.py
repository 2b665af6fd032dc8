"""The registry, the builder and set_backend against what a third-party plugin author gets wrong.

Every probe ends in one optkit error naming the thing at fault (an unknown kind asked of the registry, a
registration whose flags have the wrong type, capabilities torch cannot match, a component whose forward
optkit cannot call), or in a model that is left exactly as it was -- never a bare KeyError / TypeError
and never a plugin that silently overrides or silently never runs.
"""

from __future__ import annotations

import types
import warnings

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import nn

import optkit
from optkit.errors import ComponentError, InputError, PluginLoadError, SpecValidationError, UnknownComponentError
from optkit.interfaces import MLP, AttentionKernel, DecoderBlock
from optkit.registration import Capabilities, Provider, Registry
from optkit.testing import add_plugin, fresh_registry

ACME = Provider("acme", "acme-kernels", "1.0")


@pytest.fixture(scope="module")
def registry() -> Registry:
    """optkit's own components; every test that adds one removes it again."""
    return fresh_registry()


def plugin_module(name: str, hook) -> types.ModuleType:
    module = types.ModuleType(name)
    module.optkit_register = optkit.hookimpl(hook)
    return module


# -- the registry asked about a kind that does not exist ---------------------------------------------------
@pytest.mark.parametrize("kind", ["attn", ["attention"], 3])
@pytest.mark.parametrize("ask", [
    lambda registry, kind: registry.names(kind),
    lambda registry, kind: registry.registrations(kind),
    lambda registry, kind: registry.get(kind, "sdpa"),
    lambda registry, kind: registry.register(kind, "x", lambda params, ctx: None),
], ids=["names", "registrations", "get", "register"])
def test_an_unknown_kind_is_an_unknown_component_error_naming_the_kinds(registry, ask, kind):
    with pytest.raises(UnknownComponentError) as info:
        ask(registry, kind)
    assert str(info.value).startswith(f"unknown component kind {kind!r} (kinds: token_embedding,")


def test_membership_of_an_unhashable_kind_is_false_not_a_type_error(registry):
    assert (["attention"], "sdpa") not in registry
    assert ("attn", "sdpa") not in registry and ("attention", "sdpa") in registry


# -- registrations whose flags have the wrong type -----------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "shown"), [
    ({"override": "no"}, "override='no'"),
    ({"override": 1}, "override=1"),
    ({"description": 5}, "description=5"),
])
def test_override_and_description_of_the_wrong_type_are_refused(registry, kwargs, shown):
    original = registry.get("attention", "sdpa")
    with pytest.raises(ComponentError) as info:
        registry.register("attention", "sdpa", lambda params, ctx: None, **kwargs)
    assert str(info.value).startswith("attention 'sdpa': override must be True or False and description a string")
    assert shown in str(info.value)
    assert registry.get("attention", "sdpa") is original  # the truthy "no" overrode nothing


@pytest.mark.parametrize(("field", "value"), [
    ("dtypes", {"fp16"}), ("dtypes", {"half"}), ("dtypes", {"int8"}), ("dtypes", {"torch.float16"}),
    ("devices", {"gpu"}), ("devices", {"cuda:0"}), ("devices", {"CUDA"}),
])
def test_capabilities_torch_would_never_match_are_refused(field, value):
    name = next(iter(value))
    with pytest.raises(ValidationError, match=f"'{name}' is not a "):
        Capabilities(**{field: value})


def test_capabilities_torch_spells_are_kept():
    caps = Capabilities(devices=frozenset({"cpu", "meta", "hpu"}), dtypes=frozenset({"float64", "bfloat16"}))
    assert caps.devices == {"cpu", "meta", "hpu"} and caps.dtypes == {"float64", "bfloat16"}


def test_a_hook_with_misspelt_capabilities_is_a_broken_plugin_that_leaves_nothing_behind(registry):
    def hook(registry):
        registry.register("attention", "acme_fast", lambda params, ctx: None)
        registry.register("attention", "acme_half", lambda params, ctx: None,
                          capabilities=Capabilities(dtypes=frozenset({"fp16"})))

    with pytest.raises(PluginLoadError) as info:
        add_plugin(plugin_module("acme_caps", hook), registry, provider=ACME)
    message = str(info.value)
    assert message.startswith('the optkit_register hook of plugin "acme" raised: ValidationError')
    assert "'fp16' is not a floating-point torch dtype name" in message
    assert ("attention", "acme_fast") not in registry


# -- a component whose forward optkit cannot call --------------------------------------------------------
class TwoArgumentKernel(AttentionKernel):
    name = "two"

    def forward(self, query, key):
        return query


class KernelWithoutDropout(AttentionKernel):
    name = "nodrop"

    def forward(self, query, key, value, mask, *, scale):
        return query


class AnyArgumentsKernel(AttentionKernel):
    name = "any"

    def forward(self, *args, **kwargs):
        raise NotImplementedError


class ArgumentlessMLP(MLP):
    def forward(self):
        raise NotImplementedError


class BlockWithoutWeights(DecoderBlock):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 1)

    @property
    def kv_heads(self) -> int:
        return 1

    def forward(self, x, *, mask, positional, position_ids, cache, layer_idx):
        return x, None


@pytest.mark.parametrize(("kind", "module", "own", "problem"), [
    ("attention", TwoArgumentKernel, "(query, key)", "too many positional arguments"),
    ("attention", KernelWithoutDropout, "(query, key, value, mask, *, scale)",
     "got an unexpected keyword argument 'dropout_p'"),
    ("mlp", ArgumentlessMLP, "()", "too many positional arguments"),
    ("block", BlockWithoutWeights, "(x, *, mask, positional, position_ids, cache, layer_idx)",
     "got an unexpected keyword argument 'need_weights'"),
])
def test_a_forward_optkit_cannot_call_is_one_error_at_build_time(registry, kind, module, own, problem):
    with registry.providing(ACME):
        registry.register(kind, "acme_odd", lambda params, ctx: module())
    try:
        with pytest.raises(ComponentError) as info:
            optkit.build("opt-tiny", registry=registry, device="meta", **{kind: "acme_odd"})
    finally:
        registry.unregister(kind, "acme_odd")
    message = str(info.value)
    assert message.startswith(f"{kind} 'acme_odd' from plugin 'acme' (acme-kernels 1.0) returned {module.__name__} "
                              f"whose forward{own} cannot be called as optkit calls an optkit.interfaces.")
    assert problem in message


def test_a_forward_that_takes_anything_is_not_refused(registry):
    registry.register("attention", "acme_any", lambda params, ctx: AnyArgumentsKernel())
    try:
        model = optkit.build("opt-tiny", registry=registry, device="meta", attention="acme_any")
    finally:
        registry.unregister("attention", "acme_any")
    assert isinstance(model.decoder.layers[0].self_attn.kernel, AnyArgumentsKernel)


# -- set_backend leaves the model as it was when it refuses --------------------------------------------------
@pytest.mark.parametrize(("attention", "error", "shown"), [
    ("nope", SpecValidationError, "decoder.attention: unknown attention 'nope'"),
    ({"name": "sdpa", "params": {"window": 4}}, SpecValidationError, "decoder.attention.params.window"),
    ("acme_two", ComponentError, "attention 'acme_two' from plugin 'acme' (acme-kernels 1.0) returned"),
])
def test_a_refused_set_backend_leaves_the_model_unchanged(registry, attention, error, shown):
    model = optkit.build("opt-tiny", registry=registry, attention="eager")
    kernels = [kernel for _, kernel in model.attention_kernels()]
    spec = model.spec
    with registry.providing(ACME):
        registry.register("attention", "acme_two", lambda params, ctx: TwoArgumentKernel())
    try:
        with pytest.raises(error) as info:
            optkit.set_backend(model, attention=attention)
    finally:
        registry.unregister("attention", "acme_two")
    assert shown in str(info.value)
    assert model.spec is spec and [kernel for _, kernel in model.attention_kernels()] == kernels


# -- plugin hooks that register badly ---------------------------------------------------------------------
def test_a_hook_that_registers_one_name_twice_is_disabled_and_rolled_back(registry):
    def hook(registry):
        registry.register("attention", "acme_twice", lambda params, ctx: None)
        registry.register("attention", "acme_twice", lambda params, ctx: 1)

    with warnings.catch_warnings(), pytest.raises(PluginLoadError) as info:
        add_plugin(plugin_module("acme_twice", hook), registry, provider=ACME)
    assert str(info.value).startswith('optkit plugin "acme" (acme-kernels) is disabled: DuplicateComponentError: '
                                      "attention 'acme_twice' is registered twice")
    assert ("attention", "acme_twice") not in registry


# -- build / set_backend given something else than a registry or a model ------------------------------------
@pytest.mark.parametrize("call", [
    lambda: optkit.build("opt-tiny", registry="optkit"),
    lambda: optkit.build("opt-tiny", registry={"attention": {}}),
], ids=["str", "dict"])
def test_a_registry_that_is_no_registry_is_an_input_error(call):
    with pytest.raises(InputError, match=r"^registry must be an optkit Registry \(optkit.registry, or "):
        call()


def test_set_backend_on_something_else_than_a_model_is_an_input_error(registry):
    with pytest.raises(InputError, match=r"^set_backend expects an optkit Model .* got Linear\(in_features=1"):
        optkit.set_backend(nn.Linear(1, 1), attention="sdpa")
    model = optkit.build("opt-tiny", registry=registry, device="meta")
    with pytest.raises(InputError, match=r"^registry must be an optkit Registry .* got \[\] \(list\)$"):
        optkit.set_backend(model, attention="sdpa", registry=[])


# -- a third-party component that crashes says how to get past it ------------------------------------------
def crashes(params, ctx):
    raise RuntimeError("kernel table missing")


def test_a_crashing_third_party_factory_names_the_way_around_it(registry):
    with registry.providing(ACME):
        registry.register("attention", "acme_crash", crashes)
    registry.register("attention", "direct_crash", crashes)
    try:
        with pytest.raises(ComponentError) as third_party:
            optkit.build("opt-tiny", registry=registry, device="meta", attention="acme_crash")
        with pytest.raises(ComponentError) as direct:
            optkit.build("opt-tiny", registry=registry, device="meta", attention="direct_crash")
    finally:
        registry.unregister("attention", "acme_crash")
        registry.unregister("attention", "direct_crash")
    assert str(third_party.value) == (
        "attention 'acme_crash' from plugin 'acme' (acme-kernels 1.0) failed to build: RuntimeError: kernel table "
        "missing; report it to the authors of acme-kernels, and meanwhile name another attention in the spec "
        "(optkit info lists them) or block the plugin with OPTKIT_BLOCK_PLUGINS=acme")
    assert str(direct.value).endswith("failed to build: RuntimeError: kernel table missing")


# -- a params model whose validator has a bug ----------------------------------------------------------------
class BuggyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: int = 4

    @field_validator("window")
    @classmethod
    def _window(cls, value: int) -> int:
        raise RuntimeError("plugin bug in its validator")


def test_a_params_validator_that_crashes_is_a_spec_problem_naming_the_plugin(registry):
    with registry.providing(ACME):
        registry.register("attention", "acme_buggy", lambda params, ctx: None, params=BuggyParams)
    spec = {"name": "acme_buggy", "params": {"window": 3}}
    try:
        with pytest.raises(SpecValidationError) as from_spec:
            optkit.load_spec("opt-tiny", registry=registry, decoder={"attention": spec})
        with pytest.raises(SpecValidationError) as with_bad_field:  # the path that reads names despite other errors
            optkit.load_spec("opt-tiny", registry=registry, decoder={"attention": spec, "num_heads": "x"})
    finally:
        registry.unregister("attention", "acme_buggy")
    problem = ("decoder.attention.params: the params model BuggyParams of attention 'acme_buggy' (plugin 'acme' "
               "(acme-kernels 1.0)) raised RuntimeError: plugin bug in its validator; fix or block that plugin")
    assert from_spec.value.problems == [problem]
    assert problem in with_bad_field.value.problems



# -- a name that a blocked or disabled plugin may provide -----------------------------------------------------
def test_an_unknown_name_lists_the_plugins_that_were_not_loaded(monkeypatch, tmp_path):
    from optkit.plugins import load_entry_points
    from tests.helpers.plugins import PLUGIN_ENV, FakeDist, FakeEntryPoint

    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "acme_windowed.py").write_text(
        "import optkit\n\n@optkit.hookimpl\ndef optkit_register(registry):\n"
        "    registry.register('attention', 'windowed', lambda params, ctx: None)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OPTKIT_LOAD_PLUGINS", "nothing_else")
    registry = fresh_registry()
    load_entry_points(registry, eps=[FakeEntryPoint("acme_kernels", "acme_windowed", FakeDist("acme-kernels"))])
    assert ("attention", "windowed") not in registry
    with pytest.raises(SpecValidationError) as info:
        optkit.load_spec("opt-tiny", registry=registry, decoder={"attention": "windowed"})
    (problem,) = info.value.problems
    assert problem.startswith("decoder.attention: unknown attention 'windowed' (available: eager, flash, sdpa")
    assert problem.endswith("; plugins not loaded, one may provide it: acme_kernels (not listed in "
                            "OPTKIT_LOAD_PLUGINS) (`optkit plugins` lists them)")
