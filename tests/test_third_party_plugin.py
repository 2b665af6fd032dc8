"""Third-party plugins end to end, and the conformance kit that plugin authors run.

The example plugin (examples/third_party_attention_plugin) is pip-installed into a
throw-away virtual environment that sees this environment's packages (torch, optkit),
and is then used exactly as a user would: `optkit plugins`, `from_pretrained(...,
attention="chunked")`, a YAML spec, the OPTKIT_BLOCK_PLUGINS switch and its own tests. Those tests
are marked ``slow`` (run by default and in CI; ``-m "not slow"`` skips the install locally).

The second half proves the kit catches real bugs: deliberately broken kernels must fail
`check_attention_backend`, each with the property that names its bug.
"""

from __future__ import annotations

import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import optkit
from optkit.errors import DuplicateComponentError, PluginLoadError
from optkit.interfaces import AttentionKernel, AttentionMask, AttentionResult
from optkit.registration import Capabilities, Provider
from optkit.testing import (
    AttentionBackendSuite,
    ConformanceError,
    check_attention_backend,
    fresh_registry,
    temporary_component,
    temporary_plugin,
)
from optkit.testing.fixtures import isolated_registry, register_component  # noqa: F401 - pytest fixtures
from tests.helpers.venv import PluginVenv, install_example, last_json, outer_site_dirs

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = ROOT / "examples" / "third_party_attention_plugin"


# -- a virtual environment with the example plugin installed -----------------------------------------
@pytest.fixture(scope="module")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory) -> PluginVenv:
    return install_example(PLUGIN_SOURCE, tmp_path_factory.mktemp("third_party_plugin"))


SCRIPT = """
import contextlib, io, json, sys
import torch, optkit
from optkit.cli import main

out = {"optkit_file": optkit.__file__, "sys_path": sys.path}

def cli(*args):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(list(args))
    return buffer.getvalue()

out["plugins_text"] = cli("plugins")
out["plugins_json"] = json.loads(cli("plugins", "--json"))
out["imported_by_optkit"] = sorted(m for m in ("pytest", "hypothesis", "optkit.testing") if m in sys.modules)
import optkit_chunked_attention
out["plugin_file"] = optkit_chunked_attention.__file__

workdir = sys.argv[1]
torch.manual_seed(0)
optkit.build("opt-tiny").save_pretrained(workdir + "/ckpt")
eager = optkit.from_pretrained(workdir + "/ckpt")
chunked = optkit.from_pretrained(workdir + "/ckpt", attention="chunked")
ids = torch.randint(3, 512, (3, 12))
mask = torch.ones_like(ids)
for row, pads in enumerate((0, 4, 11)):
    mask[row, :pads] = 0
    ids[row, :pads] = 1
with torch.no_grad():
    want, got = (m(ids, attention_mask=mask).logits for m in (eager, chunked))
real = mask.bool()
out["from_pretrained"] = {
    "backend": chunked.attention_backend,
    "max_diff_at_real_tokens": float((got - want).abs()[real].max()),
    "finite": bool(torch.isfinite(got).all()),
}

spec = optkit.load_spec(workdir + "/chunked.yaml")
model = optkit.build(spec)
out["yaml"] = {
    "attention": spec.decoder.attention.model_dump(),
    "chunk_sizes": sorted({layer.self_attn.kernel.chunk_size for layer in model.decoder.layers}),
}
try:
    optkit.load_spec(workdir + "/bad.yaml")
except optkit.SpecValidationError as exc:
    out["bad_yaml"] = str(exc)
print(json.dumps(out))
"""

BLOCKED = """
import json, optkit
optkit.registry.ensure_loaded()
out = {"plugins": {p.name: p.status for p in optkit.registry.plugins}}
try:
    optkit.registry.get("attention", "chunked")
except optkit.UnknownComponentError as exc:
    out["get"] = str(exc)
try:
    optkit.build("opt-tiny", attention="chunked")
except optkit.SpecValidationError as exc:
    out["build"] = str(exc)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(plugin_venv: PluginVenv, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Everything a user does with the installed plugin, in one interpreter of the venv."""
    work = tmp_path_factory.mktemp("work")
    (work / "chunked.yaml").write_text(textwrap.dedent("""\
        extends: opt-tiny
        decoder:
          attention: {name: chunked, params: {chunk_size: 16}}
        """), encoding="utf-8")
    (work / "bad.yaml").write_text("extends: opt-tiny\ndecoder:\n  attention: {name: chunked, params: {chunk: 16}}\n",
                                   encoding="utf-8")
    return last_json(plugin_venv.run("-c", SCRIPT, str(work)))


@pytest.mark.slow  # a pip install into a fresh virtual environment
def test_venv_sees_this_optkit_and_its_own_copy_of_the_plugin(installed, plugin_venv):
    site_dirs = [p for p in installed["sys_path"] if p.endswith("-packages")]
    venv_dir, outer = site_dirs[0], outer_site_dirs()
    assert Path(venv_dir).is_relative_to(plugin_venv.python.parent.parent)
    assert site_dirs[1:1 + len(outer)] == outer  # this environment's packages, ahead of the base interpreter's
    assert Path(installed["optkit_file"]) == Path(optkit.__file__)
    assert Path(installed["plugin_file"]).is_relative_to(plugin_venv.python.parent.parent)
    assert installed["imported_by_optkit"] == []  # the kit's pytest/hypothesis are never pulled in


@pytest.mark.slow  # a pip install into a fresh virtual environment
def test_optkit_plugins_lists_it(installed):
    assert "chunked (optkit-chunked-attention 0.1.0) [ok]\n    attention: chunked\n" in installed["plugins_text"]
    (record,) = [p for p in installed["plugins_json"] if p["name"] == "chunked"]
    assert record == {"name": "chunked", "distribution": "optkit-chunked-attention", "version": "0.1.0",
                      "status": "ok", "reason": "", "components": ["attention:chunked"], "unusable": {},
                      "overrides": {}}


@pytest.mark.slow  # a pip install into a fresh virtual environment
def test_from_pretrained_with_the_plugin_equals_eager(installed):
    result = installed["from_pretrained"]
    assert result["backend"] == "chunked" and result["finite"]
    assert result["max_diff_at_real_tokens"] <= 1e-5


@pytest.mark.slow  # a pip install into a fresh virtual environment
def test_yaml_spec_chooses_it_with_params(installed):
    assert installed["yaml"] == {"attention": {"name": "chunked", "params": {"chunk_size": 16}},
                                 "chunk_sizes": [16]}
    assert "decoder.attention.params.chunk: unknown field" in installed["bad_yaml"]


@pytest.mark.slow  # a pip install into a fresh virtual environment
def test_block_plugins_makes_it_unknown(plugin_venv):
    result = last_json(plugin_venv.run("-c", BLOCKED, env={"OPTKIT_BLOCK_PLUGINS": "chunked"}))
    assert result["plugins"]["chunked"] == "blocked"
    assert result["get"] == ("unknown attention 'chunked': it is provided by plugin 'chunked' (optkit-chunked-attention "
                             "0.1.0), which is blocked (listed in OPTKIT_BLOCK_PLUGINS); remove it from "
                             "OPTKIT_BLOCK_PLUGINS to use it"), result["get"]
    assert "decoder.attention: unknown attention 'chunked': it is provided by plugin 'chunked'" in result["build"]
    assert "did you mean" not in result["build"]


@pytest.mark.slow  # a pip install into a fresh virtual environment
def test_the_plugins_own_tests_pass_in_the_venv(plugin_venv):
    done = plugin_venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=plugin_venv.source,
                           env={"OPTKIT_CONFORMANCE_EXAMPLES": "20"})
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
    assert "1 skipped" not in done.stdout  # installed, so the entry-point test runs too


# -- the kit catches broken kernels -------------------------------------------------------------------
class Kernel(AttentionKernel):
    """A correct softmax kernel whose subclasses each break one thing."""

    name = "buggy"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *, scale: float,
                dropout_p: float = 0.0, need_weights: bool = False) -> AttentionResult:
        if need_weights:
            raise NotImplementedError("no attention weights")
        scores = self.scores(query, key, scale).masked_fill(~self.allowed(mask, query.device), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        probs = self.empty_rows(probs, mask).to(query.dtype)
        if dropout_p > 0.0:
            probs = self.dropout(probs, dropout_p)
        return AttentionResult(self.output(torch.matmul(probs, value)), None)

    def scores(self, query: Tensor, key: Tensor, scale: float) -> Tensor:
        return torch.matmul(query, key.transpose(-1, -2)) * scale

    def allowed(self, mask: AttentionMask, device: torch.device) -> Tensor:
        return mask.allowed(device)

    def empty_rows(self, probs: Tensor, mask: AttentionMask) -> Tensor:
        return probs.nan_to_num(0.0)  # fully masked rows: softmax of all -inf is NaN

    def dropout(self, probs: Tensor, p: float) -> Tensor:
        return F.dropout(probs, p=p, training=True)

    def output(self, out: Tensor) -> Tensor:
        return out


class NoCausalMask(Kernel):
    def allowed(self, mask: AttentionMask, device: torch.device) -> Tensor:
        if mask.key_padding is None:
            return torch.ones(1, 1, 1, mask.kv_len, dtype=torch.bool, device=device)
        return mask.key_padding.to(device)[:, None, None, :]


class NaNOnEmptyRows(Kernel):
    def empty_rows(self, probs: Tensor, mask: AttentionMask) -> Tensor:
        return probs


class IgnoresScale(Kernel):
    def scores(self, query: Tensor, key: Tensor, scale: float) -> Tensor:
        return torch.matmul(query, key.transpose(-1, -2))


class SilentlyNoDropout(Kernel):
    def dropout(self, probs: Tensor, p: float) -> Tensor:
        return probs


class DetachedOutput(Kernel):
    def output(self, out: Tensor) -> Tensor:
        return out.detach()


class ForgetsToCastBack(Kernel):
    def output(self, out: Tensor) -> Tensor:
        return out.float()


class MisnamedKernel(Kernel):
    name = "something-else"


BUGS = {  # kernel, declared capabilities, the properties that must fail (and only those)
    "no_causal_mask": (NoCausalMask, Capabilities(), {
        "equals_eager", "reduced_precision", "fully_masked_rows", "gradients", "dropout", "model_logits",
        "set_backend"}),
    "nan_on_empty_rows": (NaNOnEmptyRows, Capabilities(), {
        "equals_eager", "reduced_precision", "fully_masked_rows", "gradients", "dropout", "model_logits",
        "set_backend"}),
    # OPT's q scale (head_dim**-0.5 = a power of two here) reaches the kernel, so the model checks catch it too
    "ignores_scale": (IgnoresScale, Capabilities(), {"equals_eager", "reduced_precision", "gradients", "model_logits",
                                                     "set_backend"}),
    "silent_dropout": (SilentlyNoDropout, Capabilities(dropout=False), {"dropout"}),
    "ignored_dropout": (SilentlyNoDropout, Capabilities(dropout=True), {"dropout"}),
    "detached_output": (DetachedOutput, Capabilities(), {"gradients"}),
    "float32_output": (ForgetsToCastBack, Capabilities(), {"reduced_precision"}),
    "misnamed": (MisnamedKernel, Capabilities(), {"registration", "set_backend"}),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_broken_kernel_fails_the_kit_naming_the_property(bug):
    kernel, capabilities, expected = BUGS[bug]
    with temporary_component("attention", "buggy", lambda params, ctx: kernel(), capabilities=capabilities):
        with pytest.raises(ConformanceError) as caught:
            check_attention_backend("buggy", max_examples=10, shrink=False)
    report = caught.value.report
    assert set(report.failed) == expected, str(report)
    message = str(caught.value)
    assert message.startswith(f"attention backend 'buggy' fails {len(expected)} of 10 conformance properties:")
    for prop in expected:
        assert f"\n  - {prop}: " in message


def test_failure_messages_say_what_is_wrong():
    with temporary_component("attention", "buggy", lambda params, ctx: NaNOnEmptyRows()):
        with pytest.raises(ConformanceError, match=r"fully_masked_rows: \d+ NaN/inf values in bfloat16 with fully"):
            check_attention_backend("buggy", only=["fully_masked_rows"])
    with temporary_component("attention", "buggy", lambda params, ctx: SilentlyNoDropout(),
                             capabilities=Capabilities(dropout=False)):
        with pytest.raises(ConformanceError, match="declares dropout=False but accepted dropout_p=0.5"):
            check_attention_backend("buggy", only=["dropout"])
    with temporary_component("attention", "buggy", lambda params, ctx: IgnoresScale()):
        with pytest.raises(ConformanceError, match=r"equals_eager: float32 output: off from eager by .* "
                                                   r"\(case: batch=1 heads=1 head_dim=8 q_len=1 kv_len=2"):
            check_attention_backend("buggy", only=["equals_eager"], max_examples=10)


def test_a_correct_kernel_passes_and_undeclared_dtypes_are_refused():
    fp32_only = Capabilities(dtypes=frozenset({"float32"}), devices=frozenset({"cpu"}), dropout=True)
    with temporary_component("attention", "buggy", lambda params, ctx: Kernel(), capabilities=fp32_only):
        report = check_attention_backend("buggy", max_examples=5)
        with pytest.raises(optkit.BackendUnavailableError, match="dtype float16 .supported: float32."):
            optkit.registry.require_usable("attention", "buggy", "cpu", torch.float16)
    assert report.failed == []
    assert report.skipped == ["reduced_precision"]
    assert "attention_weights" in report.passed and "capabilities" in report.passed


def test_first_party_backends_conform():
    for name in ("eager", "sdpa"):
        check_attention_backend(name, max_examples=5, only=["registration", "equals_eager", "fully_masked_rows"])


class TestSuiteOnSdpa(AttentionBackendSuite):
    """The pytest form of the kit, on a first-party backend."""

    backend = "sdpa"
    max_examples = 5


# -- registry helpers ---------------------------------------------------------------------------------
def test_temporary_component_undoes_itself_and_restores_what_it_overrode():
    eager = optkit.registry.get("attention", "eager")
    with temporary_component("attention", "scratch", lambda params, ctx: Kernel()) as entry:
        assert optkit.registry.get("attention", "scratch") is entry
        with pytest.raises(DuplicateComponentError):
            optkit.registry.register("attention", "scratch", lambda params, ctx: None)
    assert ("attention", "scratch") not in optkit.registry
    with temporary_component("attention", "eager", lambda params, ctx: Kernel(), override=True):
        assert optkit.registry.get("attention", "eager").factory is not eager.factory
    restored = optkit.registry.get("attention", "eager")
    assert (restored.factory, restored.provider, restored.capabilities) == (
        eager.factory, eager.provider, eager.capabilities)
    (record,) = [p for p in optkit.registry.plugins if p.name == "eager"]
    assert record.components == [("attention", "eager")]


def test_temporary_plugin_registers_a_module_and_rolls_back_a_failing_hook():
    def hook(registry):
        registry.register("attention", "scratch_a", lambda params, ctx: Kernel())
        if fail:
            raise RuntimeError("boom")

    module = types.ModuleType("scratch_plugin")
    module.optkit_register, module.OPTKIT_PLUGIN_API = optkit.hookimpl(hook), 1
    fail = False
    with temporary_plugin(module) as added:
        assert added == [("attention", "scratch_a")]
        assert optkit.registry.get("attention", "scratch_a").provider.plugin == "scratch_plugin"
    assert ("attention", "scratch_a") not in optkit.registry
    fail = True
    with pytest.raises(PluginLoadError, match="raised: RuntimeError: boom"), temporary_plugin(module):
        pass
    assert ("attention", "scratch_a") not in optkit.registry
    module.OPTKIT_PLUGIN_API = 2
    with pytest.raises(PluginLoadError, match="built for optkit plugin API 2"), temporary_plugin(module):
        pass


def test_fresh_registry_is_isolated():
    registry = fresh_registry()
    assert {"eager", "sdpa"} <= set(registry.names("attention"))
    assert {r.provider.distribution for r in registry.registrations()} == {"optkit"}
    assert registry.get("kv_cache", "dynamic").provider == Provider("torch_components", "optkit", optkit.__version__)
    registry.register("attention", "only_here", lambda params, ctx: Kernel())
    assert ("attention", "only_here") not in optkit.registry
    assert fresh_registry(first_party=False).names("attention") == []


def test_fixtures(register_component, isolated_registry):  # noqa: F811 - the fixtures imported above
    register_component("mlp", "scratch_mlp", lambda params, ctx: None, description="for one test")
    assert optkit.registry.get("mlp", "scratch_mlp").description == "for one test"
    assert ("mlp", "scratch_mlp") not in isolated_registry
