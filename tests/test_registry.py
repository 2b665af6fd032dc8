"""optkit.registration (the global instance is `optkit.registry`): registration, lookup, error messages,
capabilities and `auto` selection."""

from __future__ import annotations

import importlib
import types
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict

import optkit
import optkit.registration

from optkit.errors import BackendUnavailableError, ComponentError, DuplicateComponentError, UnknownComponentError
from optkit.registration import AUTO_KINDS, KINDS, Capabilities, NoParams, PluginRecord, Provider, Registry

from optkit.spec import parse_yaml

ROOT = Path(__file__).resolve().parents[1]

CUDA_HALF = Capabilities(devices=frozenset({"cuda"}), dtypes=frozenset({"float16", "bfloat16"}))


def eager(params, ctx):
    return "eager"


def sdpa(params, ctx):
    return "sdpa"


def flash(params, ctx):
    return "flash"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = 1


@pytest.fixture
def registry() -> Registry:
    return Registry(autoload=False)


@pytest.fixture
def attention(registry: Registry) -> Registry:
    registry.register("attention", "eager", eager)
    registry.register("attention", "sdpa", sdpa)
    return registry


def test_register_get_names(registry):
    entry = registry.register("attention", "sdpa", sdpa, params=Params, description="fused")
    registry.register("attention", "eager", eager)
    assert registry.get("attention", "sdpa") is entry
    assert (entry.kind, entry.name, entry.factory, entry.params, entry.description) == (
        "attention", "sdpa", sdpa, Params, "fused")
    assert entry.capabilities == Capabilities()
    assert entry.provider == Provider("<direct>", "?", "?")
    assert registry.names("attention") == ["eager", "sdpa"]
    assert registry.names("mlp") == []
    assert ("attention", "sdpa") in registry and ("mlp", "sdpa") not in registry
    assert [r.name for r in registry.registrations()] == ["eager", "sdpa"]


def test_fresh_registry_is_empty_and_loads_nothing(registry):
    assert all(registry.names(kind) == [] for kind in KINDS)
    assert registry.plugins == []


def test_unregister(attention):
    attention.unregister("attention", "sdpa")
    attention.unregister("attention", "never-registered")
    assert attention.names("attention") == ["eager"]


def test_unknown_name(attention):
    with pytest.raises(UnknownComponentError) as info:
        attention.get("attention", "flsh")
    assert str(info.value) == (
        "unknown attention 'flsh' (available: eager, sdpa); did you mean 'flash'? "
        "'flash' is provided by optkit[flash]: install it with `pip install 'optkit[flash]'`")
    assert isinstance(info.value, KeyError)


def test_unknown_name_far_from_everything(attention):
    with pytest.raises(UnknownComponentError, match=r"^unknown attention 'zzz' \(available: eager, sdpa\)$"):
        attention.get("attention", "zzz")


def test_unknown_name_did_you_mean(attention):
    with pytest.raises(UnknownComponentError) as info:
        attention.get("attention", "sdp")
    assert str(info.value) == "unknown attention 'sdp' (available: eager, sdpa); did you mean 'sdpa'?"


def test_unknown_catalogued_name_gives_install_hint(attention):
    with pytest.raises(UnknownComponentError) as info:
        attention.get("attention", "flash")
    assert str(info.value) == (
        "unknown attention 'flash' (available: eager, sdpa); "
        "'flash' is provided by optkit[flash]: install it with `pip install 'optkit[flash]'`")


def test_unknown_name_with_nothing_registered(registry):
    with pytest.raises(UnknownComponentError, match=r"^unknown mlp 'ffn' \(available: none\)$"):
        registry.get("mlp", "ffn")


def test_unknown_name_lists_broken_plugins(attention):
    attention.plugins.append(PluginRecord("fa", "optkit-flash", "0.1", "broken", "ImportError: no flash_attn"))
    with pytest.raises(UnknownComponentError) as info:
        attention.get("attention", "zzz")
    assert str(info.value) == ("unknown attention 'zzz' (available: eager, sdpa); "
                               "broken plugins: fa (ImportError: no flash_attn)")


def test_unknown_kind(registry):
    message = ("unknown component kind 'attn' (kinds: token_embedding, positional_embedding, attention, mlp, "
               "norm, linear, kv_cache, block, head)")
    with pytest.raises(UnknownComponentError) as info:
        registry.register("attn", "x", eager)
    assert str(info.value) == message
    with pytest.raises(UnknownComponentError) as info:
        registry.get("attn", "x")
    assert str(info.value) == message


def test_duplicate_names_both_providers(registry):
    with registry.providing(Provider("fast", "optkit-fast", "1.0")):
        registry.register("attention", "sdpa", sdpa)
    with registry.providing(Provider("faster", "optkit-faster", "2.0")):
        with pytest.raises(DuplicateComponentError) as info:
            registry.register("attention", "sdpa", eager)
    assert str(info.value) == (
        "attention 'sdpa' is registered twice: by plugin 'fast' (optkit-fast 1.0) and by plugin 'faster' "
        "(optkit-faster 2.0). Uninstall or block one of them (OPTKIT_BLOCK_PLUGINS), or register with "
        "override=True.")
    assert registry.get("attention", "sdpa").factory is sdpa


def test_same_factory_twice_is_not_a_duplicate(registry):
    registry.register("attention", "sdpa", sdpa)
    registry.register("attention", "sdpa", sdpa, description="again")
    assert registry.get("attention", "sdpa").description == "again"


def test_override(registry):
    registry.register("attention", "sdpa", sdpa)
    with registry.providing(Provider("patch", "optkit-patch", "0.2")):
        entry = registry.register("attention", "sdpa", eager, override=True)
    assert registry.get("attention", "sdpa") is entry
    assert entry.factory is eager and entry.provider == Provider("patch", "optkit-patch", "0.2")


def test_providing_restores_previous_provider(registry):
    outer, inner = Provider("outer"), Provider("inner")
    with registry.providing(outer):
        with registry.providing(inner):
            registry.register("mlp", "a", eager)
        registry.register("mlp", "b", eager)
    registry.register("mlp", "c", eager)
    assert [r.provider.plugin for r in registry.registrations("mlp")] == ["inner", "outer", "<direct>"]
    assert str(outer) == "plugin 'outer' (? ?)"


def test_registration_recorded_on_its_plugin(registry):
    record = PluginRecord("mine", "optkit-mine", "1.0")
    registry.plugins.append(record)
    with registry.providing(Provider("mine", "optkit-mine", "1.0")):
        registry.register("norm", "rms", eager)
    assert record.components == [("norm", "rms")]


def test_params_model_must_forbid_extra(registry):
    class Loose(BaseModel):
        width: int = 1

    with pytest.raises(ComponentError) as info:
        registry.register("mlp", "loose", eager, params=Loose)
    assert str(info.value) == "mlp 'loose': params model Loose must set extra='forbid'"
    assert ("mlp", "loose") not in registry


def test_params_must_be_a_pydantic_model(registry):
    with pytest.raises(ComponentError) as info:
        registry.register("mlp", "dict", eager, params=dict)
    assert str(info.value) == "mlp 'dict': params must be a pydantic BaseModel subclass, got <class 'dict'>"


def test_default_params_model_forbids_extra(registry):
    entry = registry.register("mlp", "plain", eager)
    assert entry.params is NoParams
    assert NoParams.model_config["extra"] == "forbid"


def test_unavailable_reasons(registry):
    entry = registry.register("attention", "flash", flash, capabilities=CUDA_HALF)
    assert entry.unavailable_reasons("cpu", torch.float32) == [
        "device cpu (supported: cuda)",
        "dtype float32 (supported: bfloat16, float16)",
    ]
    assert entry.unavailable_reasons(torch.device("cuda", 0), torch.float32) == [
        "dtype float32 (supported: bfloat16, float16)"]
    assert entry.unavailable_reasons("cuda:1", torch.bfloat16) == []


def test_unavailable_reasons_include_the_check(registry):
    def needs_sm80(device, dtype):
        return ["needs compute capability >= 8.0"] if device.type == "cuda" else []

    entry = registry.register("attention", "flash", flash, capabilities=CUDA_HALF, check=needs_sm80)
    assert entry.unavailable_reasons("cuda", torch.float16) == ["needs compute capability >= 8.0"]
    assert entry.unavailable_reasons("cpu", torch.float16) == ["device cpu (supported: cuda)"]


def test_capabilities_reject_unknown_fields():
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs are not permitted"):
        Capabilities(gpus=True)


def test_require_usable(attention):
    attention.register("attention", "flash", flash, capabilities=CUDA_HALF)
    assert attention.require_usable("attention", "eager", "cpu", torch.float32).name == "eager"
    assert attention.require_usable("attention", "flash", "cuda", torch.float16).name == "flash"
    with pytest.raises(BackendUnavailableError) as info:
        attention.require_usable("attention", "flash", torch.device("cpu"), torch.float32)
    assert str(info.value) == ("attention 'flash' cannot run on cpu with float32: device cpu (supported: cuda); "
                               "dtype float32 (supported: bfloat16, float16)")


def test_require_usable_unknown_name(attention):
    with pytest.raises(UnknownComponentError, match=r"^unknown attention 'sdp' .*did you mean 'sdpa'\?$"):
        attention.require_usable("attention", "sdp", "cpu", torch.float32)


def test_select_auto_by_catalogue_priority(attention):
    # registry.yaml: flash 30 > sdpa 10 > eager 0
    assert attention.select_auto("attention", "cpu", torch.float32).name == "sdpa"
    attention.register("attention", "flash", flash, capabilities=CUDA_HALF)
    assert attention.select_auto("attention", "cuda", torch.float16).name == "flash"
    assert attention.select_auto("attention", "cuda", torch.float32).name == "sdpa"
    assert attention.select_auto("attention", "cpu", torch.float16).name == "sdpa"


def test_select_auto_skips_unusable_and_explains(registry):
    registry.register("attention", "eager", eager, capabilities=Capabilities(devices=frozenset({"mps"})))
    registry.register("attention", "sdpa", sdpa, check=lambda device, dtype: ["sdpa is switched off"])
    registry.register("attention", "flash", flash, capabilities=CUDA_HALF)
    with pytest.raises(BackendUnavailableError) as info:
        registry.select_auto("attention", "cpu", torch.float32)
    assert str(info.value) == (
        "no usable attention for cpu/float32: "
        "flash: device cpu (supported: cuda); dtype float32 (supported: bfloat16, float16) | "
        "sdpa: sdpa is switched off | "
        "eager: device cpu (supported: mps)")
    assert registry.select_auto("attention", "mps", torch.float32).name == "eager"


def test_auto_check_makes_auto_pass_over_a_usable_component_that_a_spec_can_still_name(registry):
    registry.register("attention", "sdpa", sdpa)
    registry.register("attention", "flash", flash, auto_check=lambda device, dtype: ["sdpa runs the same kernels"])
    assert registry.select_auto("attention", "cpu", torch.float32).name == "sdpa"
    assert registry.get("attention", "flash").unavailable_reasons("cpu", torch.float32) == []  # naming it works
    assert registry.get("attention", "flash").auto_reasons("cpu", torch.float32) == ["sdpa runs the same kernels"]
    alone = Registry(autoload=False)
    alone.register("attention", "flash", flash, auto_check=lambda device, dtype: ["sdpa runs the same kernels"])
    with pytest.raises(BackendUnavailableError, match=r"^no usable attention for cpu/float32: flash: sdpa runs the "):
        alone.select_auto("attention", "cpu", torch.float32)
    broken = Registry(autoload=False)  # a crashing auto_check is a reason, never optkit's crash
    broken.register("attention", "flash", flash, auto_check=lambda device, dtype: 1 / 0)
    assert "ZeroDivisionError" in broken.get("attention", "flash").auto_reasons("cpu", torch.float32)[0]
    with pytest.raises(ComponentError, match=r"attention 'x': auto_check must be a function"):
        broken.register("attention", "x", flash, auto_check="no")


def test_select_auto_uncatalogued_kind(registry):
    registry.register("kv_cache", "static", eager)
    registry.register("kv_cache", "dynamic", sdpa)
    registry.register("kv_cache", "paged", flash)  # not in the catalogue: priority 0, like static
    assert registry.select_auto("kv_cache", "cpu", torch.float32).name == "dynamic"
    with pytest.raises(BackendUnavailableError, match=r"^no usable linear for cpu/float32"):
        registry.select_auto("linear", "cpu", torch.float32)


# -- one name per thing ----------------------------------------------------------------------------
def test_the_module_and_the_global_instance_have_different_names():
    assert isinstance(optkit.registration, types.ModuleType)
    assert isinstance(optkit.registry, Registry) and optkit.Registry is optkit.registration.Registry
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("optkit.registry")  # the instance is no module


def test_kinds_and_auto_kinds_are_defined_once():
    from optkit import builder, spec

    assert spec.DECODER_COMPONENTS + ("head",) == KINDS
    assert builder.AUTO_KINDS is AUTO_KINDS and set(AUTO_KINDS) <= set(KINDS)
    assert spec.AUTO == optkit.registration.AUTO == "auto"


def test_the_packaged_registry_yaml_is_a_real_copy_of_the_top_level_one():
    """optkit/registry.yaml is what installs with the package; it must be a file (a symlink breaks in
    checkouts without symlink support) with exactly the top-level file's bytes."""
    packaged = ROOT / "optkit" / "registry.yaml"
    assert packaged.is_file() and not packaged.is_symlink()
    assert packaged.read_bytes() == (ROOT / "registry.yaml").read_bytes(), (
        "optkit/registry.yaml differs from registry.yaml: edit the top-level file, then "
        "`cp registry.yaml optkit/registry.yaml`")
    assert files("optkit").joinpath("registry.yaml").read_bytes() == packaged.read_bytes()
    assert parse_yaml(packaged.read_text(encoding="utf-8"))["api_version"] == 1  # no duplicate keys, no odd nesting
