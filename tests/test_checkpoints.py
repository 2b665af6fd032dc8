"""Hugging Face checkpoints: every key layout loads to the same model; saves load in transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import optkit
from optkit.errors import CheckpointError, CheckpointNotFoundError, InputError, SpecValidationError
from tests.helpers import VARIANTS, batch, hf_model

transformers = pytest.importorskip("transformers")


def write_checkpoint(directory, config: dict, state: dict, fmt: str = "safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(directory / "model.safetensors"))
    elif fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif fmt == "sharded":
        keys = sorted(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for i, part in enumerate(halves, 1):
            name = f"model-0000{i}-of-00002.safetensors"
            save_file({k: state[k] for k in part}, str(directory / name))
            weight_map.update({k: name for k in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    hf = hf_model(**VARIANTS["pre_ln"])
    directory = tmp_path_factory.mktemp("ref")
    hf.save_pretrained(directory)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    return hf, json.loads((directory / "config.json").read_text()), state


LAYOUTS = {
    "prefixed_with_head": lambda s: s,
    "prefixed_no_head": lambda s: {k: v for k, v in s.items() if k != "lm_head.weight"},
    "bare_no_head": lambda s: {k.removeprefix("model."): v for k, v in s.items() if k != "lm_head.weight"},
    "bare_with_head_and_extras": lambda s: {**{k.removeprefix("model."): v for k, v in s.items()},
                                            "decoder.version": torch.tensor([3.0])},
}


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_key_layouts_and_formats_load_identically(tmp_path, reference, layout, fmt):
    hf, config, state = reference
    directory = write_checkpoint(tmp_path / "ckpt", config, LAYOUTS[layout](state), fmt)
    model = optkit.from_pretrained(directory)
    ids, mask = batch(seed=1)
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - hf(ids, attention_mask=mask).logits)[mask.bool()].abs().max() <= 1e-5
    assert model.head.weight is model.decoder.embed_tokens.weight  # tied


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projected", "untied", "no_bias_no_affine", "removed_final_ln"])
@pytest.mark.parametrize("head", ["causal_lm", "base", "sequence_classification", "question_answering"])
def test_save_pretrained_loads_in_transformers(tmp_path, variant, head):
    torch.manual_seed(3)
    hf = hf_model(head, **VARIANTS[variant])
    hf.save_pretrained(tmp_path / "in")
    model = optkit.from_pretrained(tmp_path / "in", head=head)
    model.save_pretrained(tmp_path / "out")
    from tests.helpers import HF_CLASSES

    reloaded = getattr(transformers, HF_CLASSES[head]).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids, mask = batch(seed=2)
    with torch.no_grad():
        a, b = reloaded(ids, attention_mask=mask), hf(ids, attention_mask=mask)
    first = {"causal_lm": "logits", "base": "last_hidden_state", "sequence_classification": "logits",
             "question_answering": "start_logits"}[head]
    diff = getattr(a, first) - getattr(b, first)
    assert (diff.abs().max() if head == "sequence_classification" else diff[mask.bool()].abs().max()) == 0
    roundtrip = optkit.from_pretrained(tmp_path / "out", head=head)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), roundtrip.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_save_pretrained_of_built_model_and_dtype(tmp_path):
    model = optkit.build("opt-tiny", dtype=torch.float16)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["architectures"] == ["OPTForCausalLM"]
    assert "lm_head.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))  # tied: written once
    auto = optkit.from_pretrained(tmp_path / "m", dtype="auto")
    assert auto.dtype == torch.float16
    assert optkit.from_pretrained(tmp_path / "m").dtype == torch.float32


def test_sharded_save(tmp_path):
    model = optkit.build("opt-tiny")
    from optkit.checkpoints import save_pretrained

    save_pretrained(model, tmp_path / "s", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path / "s").eval()
    ids = torch.randint(3, 512, (1, 7))
    with torch.no_grad():
        assert (hf(ids).logits - model.eval()(ids).logits).abs().max() <= 1e-5


def test_missing_unexpected_and_misshaped_listed_in_one_error(tmp_path, reference):
    _, config, state = reference
    broken = dict(state)
    del broken["model.decoder.layers.0.fc1.bias"]
    broken["model.decoder.layers.1.self_attn.q_proj.weight"] = torch.zeros(5, 5)
    broken["model.decoder.extra_thing"] = torch.zeros(1)
    directory = write_checkpoint(tmp_path / "b", config, broken)
    with pytest.raises(CheckpointError) as info:
        optkit.from_pretrained(directory)
    message = str(info.value)
    assert "does not fit the model its config.json describes" in message
    # named as the file names them (grep-able), not by optkit's module paths (decoder.layers.0.mlp.fc1)
    assert "missing (1): model.decoder.layers.0.fc1.bias" in message
    assert "unexpected (1): model.decoder.extra_thing" in message
    assert ("mis-shaped (1): model.decoder.layers.1.self_attn.q_proj.weight (checkpoint [5, 5], model [32, 32])"
            in message)


def test_head_weights_missing_are_initialized_with_a_warning(tmp_path, reference):
    _, config, state = reference
    directory = write_checkpoint(tmp_path / "c", config, state)
    with pytest.warns(UserWarning, match=r"no weights for the sequence_classification head \(score.weight\)"):
        model = optkit.from_pretrained(directory, head="sequence_classification", num_labels=4)
    assert model.head.weight.shape == (4, 32) and model.head.weight.is_meta is False
    base = optkit.from_pretrained(directory, head="base")  # lm_head.weight belongs to another head: ignored
    assert not any(p.is_meta for p in base.parameters())


def test_pickle_checkpoints_never_unpickle_objects(tmp_path, reference):
    _, config, _ = reference
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    torch.save({"model.decoder.embed_tokens.weight": torch.zeros(1), "payload": object.__new__(Exploit)},
               directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        optkit.from_pretrained(directory)
    assert not Exploit.ran


class Exploit:
    ran = False

    def __reduce__(self):
        return (setattr, (Exploit, "ran", True))


def test_not_found_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        optkit.from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        optkit.from_pretrained(tmp_path / "file")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointNotFoundError, match="'acme/opt-nothing' is not a local directory and is not in the Hugging Face cache"):
        optkit.from_pretrained("acme/opt-nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        optkit.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(CheckpointError, match="no weights in .*expected model.safetensors.*found config.json"):
        optkit.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'; optkit loads .*'opt'.* checkpoints"):
        optkit.from_pretrained(empty)


def test_hub_cache_resolves_offline(tmp_path, monkeypatch, reference):
    """A Hub id found in huggingface_hub's cache loads without network."""
    _, config, state = reference
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--opt-tiny" / "snapshots" / ("0" * 40)
    write_checkpoint(snapshot, config, state)
    (cache / "models--acme--opt-tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--opt-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    from optkit.checkpoints import resolve_checkpoint_dir

    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: real(repo_id, cache_dir=str(cache), **kw))
    assert resolve_checkpoint_dir("acme/opt-tiny") == snapshot
    model = optkit.from_pretrained("acme/opt-tiny")
    assert model.spec.decoder.hidden_size == 32


def test_config_fields_map_to_spec(tmp_path):
    from optkit.checkpoints import hf_config_from_spec, spec_from_hf_config

    hf = hf_model(**VARIANTS["post_ln_projected"], activation_function="gelu", dropout=0.2, layerdrop=0.1)
    spec = spec_from_hf_config(hf.config.to_dict())
    d = spec.decoder
    assert (d.norm_position, d.final_norm, d.word_embed_proj_dim, d.dropout, d.layerdrop) == ("post", False, 16, 0.2, 0.1)
    assert d.mlp.params == {"activation": "gelu"}
    back = hf_config_from_spec(spec)
    for key in ("do_layer_norm_before", "word_embed_proj_dim", "activation_function", "dropout", "layerdrop", "ffn_dim"):
        assert back[key] == getattr(hf.config, key), key
    with pytest.raises(SpecValidationError, match="decoder.mlp.params.activation"):
        spec_from_hf_config({**hf.config.to_dict(), "activation_function": "swiglu"})


def test_input_errors(tmp_path):
    model = optkit.build("opt-tiny")
    with pytest.raises(InputError, match=r"token id 512 is out of range for this model's vocabulary of 512 \(valid ids: 0..511\)"):
        model(torch.tensor([[5, 512]]))
    with pytest.raises(InputError, match="token id -1 is out of range"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(InputError, match="sequence of 129 tokens exceeds the model's maximum of 128 positions"):
        model(torch.randint(3, 512, (1, 129)))
    with pytest.raises(InputError, match=r"position_ids contain 128, outside this model's positions -1..127"):
        model(torch.tensor([[5, 6]]), position_ids=torch.tensor([[126, 128]]))
    with pytest.raises(InputError, match="position_ids contain -2"):
        model(torch.tensor([[5, 6]]), position_ids=torch.tensor([[-2, 0]]))
    assert model(torch.tensor([[1, 6]]), position_ids=torch.tensor([[-1, 127]])).logits.shape == (1, 2, 512)
    with pytest.raises(InputError, match="pass exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(InputError, match="cannot return attention weights; switch with optkit.set_backend"):
        optkit.build("opt-tiny", attention="sdpa")(torch.tensor([[5, 6]]), output_attentions=True)


def test_progress_reports_each_weight_file(tmp_path, capsys):
    model = optkit.build("opt-tiny")
    from optkit.checkpoints import save_pretrained

    save_pretrained(model, tmp_path / "s", max_shard_bytes=100_000)
    optkit.from_pretrained(tmp_path / "s", progress=True)
    err = capsys.readouterr().err
    shards = len(set(json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert err.count("optkit: reading weights") == shards and f"{shards}/{shards}" in err
    optkit.from_pretrained(tmp_path / "s", progress=False)
    assert capsys.readouterr().err == ""


def test_from_transformers_shares_weights_and_computes_the_same_logits():
    hf = hf_model(seed=4)
    model = optkit.from_transformers(hf, attention="sdpa")
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((hf(ids).logits - model(ids).logits).abs().max()) <= 1e-5
    q_hf, q_ok = hf.model.decoder.layers[0].self_attn.q_proj.weight, model.decoder.layers[0].self_attn.q_proj.weight
    assert q_ok.data_ptr() == q_hf.data_ptr()  # same device and dtype: shared, not copied
    half = optkit.from_transformers(hf, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and q_hf.dtype == torch.float32
    with pytest.raises(optkit.CheckpointError, match="missing"):
        broken = hf_model(seed=4)
        del broken.model.decoder.layers[0].self_attn.k_proj
        optkit.from_transformers(broken)
