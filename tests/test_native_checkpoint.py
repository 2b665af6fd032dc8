"""optkit's own checkpoint format, and plugin overrides that users can see (issue 21, points 1 and 2).

The example plugin examples/extra_components_plugin (a GeGLU MLP, a scaled RMSNorm, sinusoidal
positions: nothing transformers' OPT has) is used two ways: registered in-process for the fast checks,
and pip-installed into a throw-away venv, as a user would, for the end-to-end run: build from YAML,
train with a checkpoint and a resume, save, reload in a fresh process with equal logits, and the
error when the plugin is blocked.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import torch

import optkit
from optkit.checkpoint_files import STAGING_PREFIX
from optkit.cli import main as cli_main
from optkit.errors import CheckpointError, InputError, SpecValidationError
from optkit.checkpoints import check_savable
from optkit.native_checkpoint import SPEC_NAME, read_spec, resolve_format
from optkit.plugins import load_entry_points
from optkit.registration import Registry
from optkit.spec import spec_from_yaml
from optkit.testing import fresh_registry, temporary_plugin
from optkit import training
from optkit.training import TRAINER_STATE, train, train_bpe
from tests.helpers.models import EXAMPLES, load_example_plugin
from tests.helpers.plugins import FakeDist, FakeEntryPoint
from tests.helpers.venv import PluginVenv, install_example, last_json

PLUGIN_DIR = EXAMPLES / "extra_components_plugin"
SPEC_YAML = """# a tiny model built from the example plugin's components (plus optkit's attention)
extends: opt-tiny
decoder:
  mlp: {name: geglu, params: {approximate: true}}
  norm: {name: scaled_rmsnorm, params: {eps: 1.0e-6, scale: 1.5}}
  positional_embedding: sinusoidal
"""
GEGLU_REFUSAL = "decoder.mlp: 'geglu' has no OPT equivalent (needs 'ffn')"
TRAIN = dict(batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, eval_every=1000, eval_fraction=0.25, log_every=1000)


def documents(count: int = 8) -> list[str]:
    return [f"# module {i}\n" + "".join(f"def f_{i}_{j}(x):\n    return x + {j}\n" for j in range(4))
            for i in range(count)]


@pytest.fixture(scope="module")
def extra():
    """The example plugin's module, imported from the checkout (not installed)."""
    return load_example_plugin("extra_components_plugin/optkit_extra_components", "optkit_extra_components")


@pytest.fixture
def with_extra(extra):
    with temporary_plugin(extra) as added:
        yield added


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "extra.yaml"
    path.write_text(SPEC_YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(documents(), vocab_size=300)


def plugin_model(seed: int = 0) -> optkit.Model:
    """The model of SPEC_YAML, built from the YAML text (the example plugin must be registered)."""
    torch.manual_seed(seed)
    return optkit.build(spec_from_yaml(SPEC_YAML)).eval()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith((STAGING_PREFIX, ".staging")))


# -- saving: which format ----------------------------------------------------------------------------
def test_a_model_with_plugin_components_is_saved_in_optkit_format_and_reloads_exactly(tmp_path, with_extra):
    model = plugin_model()
    ids = torch.randint(3, 512, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
    assert resolve_format(model) == check_savable(model) == "optkit"
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", SPEC_NAME]
    manifest = json.loads((tmp_path / "config.json").read_text())
    assert manifest["model_type"] == "optkit" and manifest["optkit_format_version"] == 1
    assert manifest["torch_dtype"] == "float32"
    (entry,) = [p for p in manifest["plugins"] if p["plugin"] == "optkit_extra_components"]
    assert sorted(entry["components"]) == ["mlp:geglu", "norm:scaled_rmsnorm", "positional_embedding:sinusoidal"]
    assert optkit.load_spec(tmp_path / SPEC_NAME) == model.spec
    reloaded = optkit.from_pretrained(tmp_path)
    assert reloaded.spec == model.spec
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, want)
    spread = optkit.from_pretrained(tmp_path, device_map="auto")  # the unit-by-unit loader reads it too
    with torch.no_grad():
        assert torch.equal(spread(ids).logits, want)


def test_dtype_auto_reads_the_manifest(tmp_path, with_extra):
    model = plugin_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert optkit.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert optkit.from_pretrained(tmp_path).dtype == torch.float32


def test_format_transformers_is_refused_with_the_reason_and_writes_nothing(tmp_path, with_extra):
    model = plugin_model()
    with pytest.raises(SpecValidationError) as info:
        model.save_pretrained(tmp_path, format="transformers")
    assert GEGLU_REFUSAL in str(info.value)
    with pytest.raises(SpecValidationError, match="'geglu' has no OPT equivalent"):
        check_savable(model, "transformers")
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=r"^format='onnx': save_pretrained's format is 'auto' \(transformers' when "
                       r"the model has a transformers equivalent, else optkit's own\), 'transformers' or 'optkit'$"):
        model.save_pretrained(tmp_path, format="onnx")


def test_plain_opt_keeps_transformers_format_and_can_ask_for_optkits(tmp_path):
    torch.manual_seed(0)
    model = optkit.build("opt-tiny").eval()
    assert resolve_format(model) == "transformers"
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "opt" and not (tmp_path / SPEC_NAME).exists()
    model.save_pretrained(tmp_path, format="optkit")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "optkit"
    ids = torch.randint(3, 512, (1, 7))
    with torch.no_grad():
        assert torch.equal(optkit.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    model.save_pretrained(tmp_path)  # back to transformers' format: the spec file goes with the old checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_tokenizer_files_travel_with_the_weights(tmp_path, with_extra, tokenizer):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    plugin_model().save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer_dir)
    assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has none of tokenizer.json"):
        plugin_model().save_pretrained(tmp_path / "ckpt", tokenizer=tmp_path / "empty")
    with pytest.raises(InputError, match="is not a directory of tokenizer files"):
        plugin_model().save_pretrained(tmp_path / "ckpt", tokenizer=tmp_path / "nothing-here")


def test_a_failed_save_leaves_no_staging_folder(tmp_path, with_extra):
    def broken(path: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device"):
        plugin_model().save_pretrained(tmp_path, extra_files={"trainer_state.pt": broken})
    assert leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []


# -- loading: the plugins the manifest names ---------------------------------------------------------
def test_a_missing_plugin_is_named_with_its_package(tmp_path, extra, monkeypatch):
    with temporary_plugin(extra):
        plugin_model().save_pretrained(tmp_path)
    manifest_path = tmp_path / "config.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["plugins"]:  # as an installed plugin records itself (the venv test has the real one)
        if entry["plugin"] == "optkit_extra_components":
            entry.update(plugin="extra_components", distribution="optkit-extra-components", version="0.1.0")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(tmp_path)
    needs = (f"{tmp_path} is an optkit checkpoint whose model needs components that no loaded plugin provides: "
             "positional_embedding 'sinusoidal', mlp 'geglu', norm 'scaled_rmsnorm', provided by plugin "
             "'extra_components' of the package optkit-extra-components 0.1.0, which is ")
    assert str(info.value) == (needs + "not installed. To load it, install optkit-extra-components "
                               "(pip install optkit-extra-components)")

    monkeypatch.setenv("OPTKIT_BLOCK_PLUGINS", "extra_components")  # installed, but blocked
    registry = fresh_registry()
    load_entry_points(registry, eps=[FakeEntryPoint("extra_components", "optkit_extra_components",
                                                    FakeDist("optkit-extra-components", "0.1.0"))])
    with pytest.raises(CheckpointError) as info:
        read_spec(tmp_path, manifest, registry=registry)
    assert str(info.value) == (needs + "installed but blocked (listed in OPTKIT_BLOCK_PLUGINS). To load it, remove "
                               "'extra_components' from OPTKIT_BLOCK_PLUGINS")
    assert read_spec(tmp_path, manifest, registry=fresh_registry(plugins=(extra,))).decoder.mlp.name == "geglu"


def test_a_component_the_manifest_does_not_name(tmp_path, extra):
    with temporary_plugin(extra):
        plugin_model().save_pretrained(tmp_path)
    manifest_path = tmp_path / "config.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["plugins"] = []
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"mlp 'geglu'.*its manifest does not say which plugin provides it"):
        optkit.from_pretrained(tmp_path)


def test_a_component_chosen_at_load_time_replaces_the_saved_one(tmp_path):
    torch.manual_seed(0)
    model = optkit.build("opt-tiny").eval()
    model.save_pretrained(tmp_path, format="optkit")
    spec_file = tmp_path / SPEC_NAME
    text = spec_file.read_text()
    assert text.count("  attention:\n    name: eager\n") == 1
    spec_file.write_text(text.replace("  attention:\n    name: eager\n", "  attention:\n    name: warp\n"))
    with pytest.raises(CheckpointError, match=r"needs components that no loaded plugin provides: attention 'warp' "
                       r"\(its manifest does not say which plugin provides it\)\. To load it, install the plugin "
                       r"that registers it; or choose another with attention=\.\.\.$"):
        optkit.from_pretrained(tmp_path)
    ids = torch.randint(3, 512, (1, 6))
    with torch.no_grad():
        assert torch.equal(optkit.from_pretrained(tmp_path, attention="eager")(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("field", "value", "error"), [
    ("optkit_format_version", 2, "is optkit format version 2, written by a newer optkit"),
    ("optkit_format_version", "1", "field 'optkit_format_version' is '1', not a positive integer"),
    ("spec_file", "../elsewhere.yaml", "field 'spec_file' is '../elsewhere.yaml'; it must name a file inside"),
    ("spec_file", "gone.yaml", "is an optkit checkpoint without its spec file gone.yaml"),
])
def test_a_damaged_manifest_is_one_checkpoint_error(tmp_path, with_extra, field, value, error):
    plugin_model().save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / "config.json").read_text())
    manifest[field] = value
    (tmp_path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=error.replace(".", r"\.")):
        optkit.from_pretrained(tmp_path)


# -- training ----------------------------------------------------------------------------------------
def test_train_checkpoints_and_resumes_a_plugin_model_exactly(tmp_path, with_extra, tokenizer, monkeypatch):
    corpus = documents()
    straight = train(plugin_model(), corpus, out_dir=tmp_path / "straight", steps=4, save_every=2,
                     tokenizer=tokenizer, **TRAIN)
    real_step = training._train_step

    def crash_at_step_3(*args, **kwargs):
        if args[-1] == 3:  # the step index: the checkpoint of step 2 is written
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "_train_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(plugin_model(), corpus, out_dir=tmp_path / "resumed", steps=4, save_every=2, tokenizer=tokenizer,
              **TRAIN)
    monkeypatch.setattr(training, "_train_step", real_step)
    resumed = train(plugin_model(seed=1), corpus, out_dir=tmp_path / "resumed", steps=4, save_every=2,
                    tokenizer=tokenizer, **TRAIN)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    out = tmp_path / "resumed"
    assert json.loads((out / "config.json").read_text())["model_type"] == "optkit"
    assert (out / TRAINER_STATE).is_file() and (out / SPEC_NAME).is_file() and leftovers(out) == []
    reloaded = optkit.from_pretrained(out)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_train_refuses_an_unsavable_model_before_its_first_step(tmp_path, tokenizer):
    model = optkit.build("opt-tiny", device="meta")
    with pytest.raises(InputError, match=r"save_pretrained cannot save this model: \d+ tensor\(s\) are on the meta"):
        train(model, documents(), out_dir=tmp_path, steps=2, tokenizer=tokenizer, **TRAIN)
    assert list(tmp_path.iterdir()) == []  # not a step, not a file, no staging folder


# -- override=True on one of optkit's names ----------------------------------------------------------
FIRST_PARTY_PLUGIN = """
import optkit

@optkit.hookimpl
def optkit_register(registry):
    registry.register("mlp", "ffn", lambda params, ctx: "optkit's ffn")
    registry.register("mlp", "other", lambda params, ctx: "optkit's other")
"""
OVERRIDING_PLUGIN = """
import optkit

@optkit.hookimpl
def optkit_register(registry):
    registry.register("mlp", "ffn", lambda params, ctx: "acme's ffn", override=True)
"""


def test_override_of_a_first_party_name_is_logged_and_listed(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    for module, source in (("okn_first", FIRST_PARTY_PLUGIN), ("okn_acme", OVERRIDING_PLUGIN)):
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        monkeypatch.delitem(__import__("sys").modules, module, raising=False)
    registry = Registry(autoload=False)
    eps = [FakeEntryPoint("acme_mlp", "okn_acme", FakeDist("acme-mlp", "2.1")),
           FakeEntryPoint("torch_like", "okn_first", FakeDist("optkit", "0.1.0"))]
    with caplog.at_level(logging.WARNING, logger="optkit"):
        load_entry_points(registry, eps=eps)
    warnings = [r.getMessage() for r in caplog.records if r.name == "optkit"]
    assert warnings == [
        "optkit: mlp 'ffn' of plugin 'torch_like' (optkit 0.1.0) is overridden by plugin 'acme_mlp' (acme-mlp 2.1) "
        "(override=True); models using mlp 'ffn' now run that plugin's code. `optkit plugins` shows the override; "
        "OPTKIT_BLOCK_PLUGINS=acme_mlp restores optkit's own"]
    assert registry.get("mlp", "ffn").factory(None, None) == "acme's ffn"

    monkeypatch.setattr(optkit, "registry", registry)
    assert cli_main(["plugins", "--no-usable"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["torch_like (optkit 0.1.0) [ok]",
                     "    mlp: ffn  (overridden by plugin 'acme_mlp' (acme-mlp 2.1))",
                     "    mlp: other",
                     "acme_mlp (acme-mlp 2.1) [ok]",
                     "    mlp: ffn  (overrides plugin 'torch_like' (optkit 0.1.0))"]
    assert cli_main(["plugins", "--json"]) == 0
    listed = {p["name"]: p["overrides"] for p in json.loads(capsys.readouterr().out)}
    assert listed == {"torch_like": {"mlp:ffn": "overridden by plugin 'acme_mlp' (acme-mlp 2.1)"},
                      "acme_mlp": {"mlp:ffn": "overrides plugin 'torch_like' (optkit 0.1.0)"}}


def test_no_warning_without_an_override(caplog):
    registry = Registry(autoload=False)
    with caplog.at_level(logging.WARNING, logger="optkit"):
        registry.register("mlp", "ffn", lambda params, ctx: None)
        registry.register("mlp", "gelu", lambda params, ctx: None, override=True)  # a new name: nothing replaced
    assert [r for r in caplog.records if r.name == "optkit"] == []


# -- the installed plugin, end to end ----------------------------------------------------------------
USE = """
import json, sys
import torch, optkit
from optkit.training import train, train_bpe

work, spec = sys.argv[1], sys.argv[2]
docs = [f"# module {i}\\n" + "".join(f"def f_{i}_{j}(x):\\n    return x + {j}\\n" for j in range(4)) for i in range(8)]
tok = train_bpe(docs, vocab_size=300)
settings = dict(batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, eval_every=1000, eval_fraction=0.25,
                log_every=1000, tokenizer=tok, save_every=2)
model = optkit.build(spec)
train(model, docs, out_dir=work + "/run", steps=2, **settings)
result = train(optkit.build(spec), docs, out_dir=work + "/run", steps=4, **settings)
result.model.save_pretrained(work + "/saved")
ids = torch.randint(3, 300, (2, 9))
with torch.no_grad():
    logits = result.model(ids).logits
torch.save({"ids": ids, "logits": logits}, work + "/expected.pt")
print(json.dumps({"resumed_from": result.resumed_from, "steps": result.step,
                  "manifest": json.load(open(work + "/saved/config.json"))}))
"""

RELOAD = """
import json, sys
import torch, optkit

work = sys.argv[1]
expected = torch.load(work + "/expected.pt", weights_only=True)
model = optkit.from_pretrained(work + "/saved")
with torch.no_grad():
    out = {"equal": torch.equal(model(expected["ids"]).logits, expected["logits"])}
out["mlp"] = type(model.decoder.layers[0].mlp).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def extra_venv(tmp_path_factory: pytest.TempPathFactory) -> PluginVenv:
    return install_example(PLUGIN_DIR, tmp_path_factory.mktemp("extra_components"))


@pytest.mark.slow  # a pip install into a fresh virtual environment
def test_installed_plugin_trains_saves_and_reloads_in_a_fresh_process(extra_venv, spec_file, tmp_path):
    used = last_json(extra_venv.run("-c", USE, str(tmp_path), str(spec_file)))
    assert used["resumed_from"] == 2 and used["steps"] == 4
    (entry,) = [p for p in used["manifest"]["plugins"] if p["plugin"] == "extra_components"]
    assert entry["distribution"] == "optkit-extra-components" and entry["version"] == "0.1.0"
    assert last_json(extra_venv.run("-c", RELOAD, str(tmp_path))) == {"equal": True, "mlp": "GeGLU"}
