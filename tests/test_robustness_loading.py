"""Adversarial inputs to loading, saving, adapters and placement: each one loads the right weights or is refused
with one optkit error that names the thing at fault (never a bare torch/Python error, never wrong weights).

Every case here was a defect found by an audit; the existing robustness tests cover the others.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import optkit
from optkit.adapters import (add_adapters, load_adapters, merge_adapters, merge_and_unload, save_adapters,
                             unload_adapters, unmerge_adapters)
from optkit.checkpoints import save_pretrained
from optkit.errors import CheckpointError, InputError
from optkit.placement import dispatch, parse_size

IDS = torch.tensor([[2, 5, 7, 9, 11]])
DISK_LAYER_1 = {"": "cpu", "decoder.layers.1": "disk"}


def tiny(seed: int = 0, **decoder: object) -> optkit.Model:
    torch.manual_seed(seed)
    return optkit.build({"extends": "opt-tiny", "decoder": {"init_std": 0.2, **decoder}}).eval()


def logits(model: optkit.Model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(tiny(), tmp_path_factory.mktemp("audit") / "ckpt")


def edited(checkpoint: Path, tmp_path: Path, *, config: dict | None = None, tensors=None) -> Path:
    """A copy of ``checkpoint`` with config fields replaced and/or its tensors rewritten by ``tensors(dict)``."""
    directory = Path(shutil.copytree(checkpoint, tmp_path / "edited"))
    if config:
        data = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**data, **config}))
    if tensors is not None:
        state = load_file(directory / "model.safetensors")
        save_file(tensors(state), directory / "model.safetensors", metadata={"format": "pt"})
    return directory


# -- the LM head -------------------------------------------------------------------------------------------------
def test_an_untied_checkpoint_without_lm_head_loads_a_fresh_head_with_a_warning(checkpoint, tmp_path):
    """Was: NotImplementedError "Cannot copy out of meta tensor" (the fresh head copied the meta embedding)."""
    directory = edited(checkpoint, tmp_path, config={"tie_word_embeddings": False})
    with pytest.warns(UserWarning, match=r"no weights for the causal_lm head \(lm_head.weight\)"):
        model = optkit.from_pretrained(directory)
    head, embedding = model.head.weight, model.decoder.embed_tokens.weight
    assert not head.is_meta and head.data_ptr() != embedding.data_ptr() and torch.isfinite(head).all()
    assert 0.1 < head.std().item() < 0.3  # optkit's init (init_std=0.2), not uninitialised memory
    assert torch.equal(embedding, load_file(checkpoint / "model.safetensors")["model.decoder.embed_tokens.weight"])
    assert torch.isfinite(logits(model)).all()
    with pytest.warns(UserWarning, match="lm_head.weight"):
        placed = optkit.from_pretrained(directory, device_map=DISK_LAYER_1, offload_folder=tmp_path / "off")
    assert not placed.head.weight.is_meta


def test_a_tied_checkpoint_whose_lm_head_differs_from_the_embedding_is_refused(checkpoint, tmp_path):
    """Was: loaded silently, the stored head dropped (transformers picks one by load order)."""
    def with_head(state):
        return {**state, "lm_head.weight": torch.randn_like(state["model.decoder.embed_tokens.weight"])}

    directory = edited(checkpoint, tmp_path, tensors=with_head)
    with pytest.raises(CheckpointError, match=r"lm_head.weight differs from model.decoder.embed_tokens.weight") as e:
        optkit.from_pretrained(directory)
    assert "tie_word_embeddings" in str(e.value)


def test_a_tied_checkpoint_whose_lm_head_equals_the_embedding_loads(checkpoint, tmp_path):
    def with_head(state):
        return {**state, "lm_head.weight": state["model.decoder.embed_tokens.weight"].clone()}

    directory = edited(checkpoint, tmp_path, tensors=with_head)
    assert torch.equal(logits(optkit.from_pretrained(directory)), logits(optkit.from_pretrained(checkpoint)))


# -- from_pretrained's arguments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [None, 5, ["ckpt"]])
def test_a_checkpoint_that_is_not_a_path_is_named(path):
    """Was: TypeError from pathlib."""
    with pytest.raises(InputError, match="directory path or a Hub id") as e:
        optkit.from_pretrained(path)
    assert type(path).__name__ in str(e.value)


def test_a_device_torch_cannot_parse_is_named(checkpoint):
    """Was: RuntimeError "Expected one of cpu, cuda, ... device type"."""
    with pytest.raises(InputError, match="device='banana' is not a torch device"):
        optkit.from_pretrained(checkpoint, device="banana")


@pytest.mark.parametrize("num_labels", [0, -1, "3", True])
def test_a_bad_num_labels_is_named_not_replaced(checkpoint, num_labels):
    """Was: 0 silently became 2 labels."""
    with pytest.raises(InputError, match=f"num_labels={num_labels!r}"):
        optkit.from_pretrained(checkpoint, head="sequence_classification", num_labels=num_labels)


# -- saving ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../outside.txt", "/tmp/absolute.txt", "", ".optkit-tmp-1/x"])
def test_extra_files_cannot_leave_the_checkpoint_directory(tmp_path, name):
    """Was: written (and an existing file moved aside) outside the checkpoint directory."""
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's")
    with pytest.raises(InputError, match="extra_files: .* is not a relative path inside"):
        save_pretrained(tiny(), tmp_path / "ckpt", extra_files={name: lambda path: path.write_text("x")})
    assert outside.read_text() == "the user's" and not (tmp_path / "ckpt" / "config.json").exists()


def test_extra_files_naming_the_config_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="'config.json' is a file of the checkpoint itself"):
        save_pretrained(tiny(), tmp_path / "ckpt", extra_files={"config.json": lambda path: path.write_text("{}")})


@pytest.mark.parametrize("size", [0, -1, "5GB", 1.5, True])
def test_a_bad_max_shard_bytes_is_named(tmp_path, size):
    """Was: TypeError for a string; 0 and negatives wrote one shard per tensor."""
    with pytest.raises(InputError, match=r"max_shard_bytes=.*positive number of bytes"):
        save_pretrained(tiny(), tmp_path / "ckpt", max_shard_bytes=size)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("format", ["auto", "transformers", "optkit"])
def test_a_model_with_added_adapters_is_not_saved_over_a_checkpoint(tmp_path, merged, format):
    """Was: saved with keys such as q_proj.base.weight that neither optkit nor transformers loads, replacing
    the checkpoint that was in the directory."""
    directory = save_pretrained(tiny(), tmp_path / "ckpt")
    before = (directory / "model.safetensors").read_bytes()
    model = tiny(seed=1)
    add_adapters(model, r=2)
    if merged:
        merge_adapters(model)
    with pytest.raises(InputError, match=r"LoRA adapter\(s\) default .*merge_and_unload\(model\)"):
        save_pretrained(model, directory, format=format)
    assert (directory / "model.safetensors").read_bytes() == before
    unload_adapters(model) if merged else merge_and_unload(model)  # a plain model again: it saves and reloads
    assert torch.equal(logits(optkit.from_pretrained(save_pretrained(model, directory, format=format))), logits(model))


def test_a_spec_with_an_adapters_block_is_saved_in_optkits_format_and_reloads(tmp_path):
    """Was: format "auto" picked transformers' format and wrote keys it cannot load."""
    torch.manual_seed(0)
    model = optkit.build({"extends": "opt-tiny", "adapters": {"r": 2, "target_modules": ["q_proj"]}}).eval()
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter)
    directory = save_pretrained(model, tmp_path / "ckpt")
    assert (directory / "optkit-spec.yaml").is_file()
    assert torch.equal(logits(optkit.from_pretrained(directory)), logits(model))
    with pytest.raises(InputError, match=r"LoRA adapter\(s\) default, which transformers' format cannot hold"):
        save_pretrained(model, tmp_path / "hf", format="transformers")


def test_a_tokenizer_whose_save_fails_is_named_and_nothing_is_replaced(checkpoint, tmp_path):
    """Was: the tokenizer's own RuntimeError, unexplained."""
    class Broken:
        def save_pretrained(self, directory: str) -> None:
            raise RuntimeError("disk quota")

    directory = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    before = (directory / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match=r"tokenizer: Broken.save_pretrained failed \(RuntimeError: disk quota\)"):
        save_pretrained(tiny(seed=1), directory, tokenizer=Broken())
    assert (directory / "model.safetensors").read_bytes() == before


# -- adapters --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny()
    add_adapters(model, r=4, target_modules=["q_proj", "v_proj"])
    return save_adapters(model, tmp_path_factory.mktemp("audit") / "adapter")


def test_a_target_modules_string_that_is_not_a_regex_is_named(adapter, tmp_path):
    """Was: re.error from deep inside the target matching."""
    directory = Path(shutil.copytree(adapter, tmp_path / "a"))
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "(q_proj"}))
    model = tiny()
    with pytest.raises(CheckpointError, match=r"target_modules '\(q_proj' is not a valid regex") as e:
        load_adapters(model, directory)
    assert "adapter_config.json" in str(e.value) and not any("lora" in k for k in model.state_dict())


@pytest.mark.parametrize("dtype", [torch.int8, "float16", torch.bool])
def test_an_adapter_dtype_that_is_not_floating_is_named_before_the_model_changes(adapter, dtype):
    """Was: RuntimeError (requires_grad on int8) or TypeError (a string) after checks had passed."""
    model = tiny()
    with pytest.raises(InputError, match="adapter dtype must be a floating torch dtype"):
        load_adapters(model, adapter, dtype=dtype)
    with pytest.raises(InputError, match="adapter dtype must be a floating torch dtype"):
        add_adapters(model, r=2, dtype=dtype)
    assert not any("lora" in key for key in model.state_dict())


def test_saving_adapters_where_a_file_is_names_the_path_and_keeps_the_file(tmp_path):
    """Was: FileExistsError / NotADirectoryError."""
    model = tiny()
    add_adapters(model, r=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("the user's")
    for target in (blocker, blocker / "inside"):
        with pytest.raises(CheckpointError, match=f"cannot save adapter 'default' into {target}"):
            save_adapters(model, target)
    assert blocker.read_text() == "the user's"


# -- placement -------------------------------------------------------------------------------------------------------
def test_merging_into_or_out_of_streamed_layers_is_refused_and_changes_nothing(adapter, tmp_path):
    """Was: the merge went into the streamed layer's meta placeholder (lost), so the model ran without the
    adapter there; unmerging a model dispatched after its merge applied the adapter twice. Silently."""
    reference = tiny()
    load_adapters(reference, adapter)
    expected = logits(reference)
    model = dispatch(tiny(), DISK_LAYER_1, offload_folder=tmp_path / "a")
    load_adapters(model, adapter)
    for change in (merge_adapters, merge_and_unload):
        with pytest.raises(InputError, match=r"into decoder.layers.1.self_attn.q_proj: its weights are not in memory"):
            change(model)
        assert torch.allclose(logits(model), expected, atol=1e-6)
    merge_adapters(reference)
    dispatch(reference, DISK_LAYER_1, offload_folder=tmp_path / "b")
    with pytest.raises(InputError, match=r"unmerge adapter 'default' from decoder.layers.1.self_attn.q_proj"):
        unmerge_adapters(reference)
    assert torch.allclose(logits(reference), expected, atol=1e-6)


def test_a_second_model_cannot_overwrite_the_offload_files_a_loaded_model_streams_from(tmp_path):
    """Was: the second load rewrote offload_folder/decoder.layers.1.safetensors and the first model then
    computed with the second model's weights, silently."""
    first_ckpt = save_pretrained(tiny(seed=0), tmp_path / "first")
    second_ckpt = save_pretrained(tiny(seed=1), tmp_path / "second")
    expected = logits(optkit.from_pretrained(first_ckpt))
    first = optkit.from_pretrained(first_ckpt, device_map=DISK_LAYER_1, offload_folder=tmp_path / "off")
    with pytest.raises(InputError, match=r"off': decoder.layers.1.safetensors belongs to a model that is still loaded"):
        optkit.from_pretrained(second_ckpt, device_map=DISK_LAYER_1, offload_folder=tmp_path / "off")
    with pytest.raises(InputError, match="decoder.layers.1.safetensors belongs to a model that is still loaded"):
        dispatch(tiny(seed=1), DISK_LAYER_1, offload_folder=tmp_path / "off")
    assert torch.allclose(logits(first), expected, atol=1e-6)
    del first
    gc.collect()
    second = optkit.from_pretrained(second_ckpt, device_map=DISK_LAYER_1, offload_folder=tmp_path / "off")
    assert torch.allclose(logits(second), logits(optkit.from_pretrained(second_ckpt)), atol=1e-6)


def test_a_model_nobody_references_releases_its_offload_files(tmp_path):
    first = dispatch(tiny(), DISK_LAYER_1, offload_folder=tmp_path)
    first = None  # noqa: F841 - a reference cycle (hooks) keeps it until collected: the check collects
    second = dispatch(tiny(seed=1), DISK_LAYER_1, offload_folder=tmp_path)
    assert torch.allclose(logits(second), logits(tiny(seed=1)), atol=1e-6)


@pytest.mark.parametrize("content", [b"the user's notes", b""])
def test_an_offload_folder_file_optkit_did_not_write_is_never_overwritten(tmp_path, content):
    mine = tmp_path / "decoder.layers.1.safetensors"
    mine.write_bytes(content)
    model = tiny()
    with pytest.raises(InputError, match="already holds decoder.layers.1.safetensors, which optkit did not write"):
        dispatch(model, DISK_LAYER_1, offload_folder=tmp_path)
    assert mine.read_bytes() == content and not model.decoder.layers[1].mlp.fc1.weight.is_meta


@pytest.mark.parametrize("size", [math.nan, math.inf, "9" * 400 + "GB"])
def test_a_max_memory_that_is_not_finite_is_named(size):
    """Was: ValueError / OverflowError from int()."""
    with pytest.raises(InputError, match=r"max_memory\['cpu'\]: .* is not a size"):
        parse_size(size, what="max_memory['cpu']")
    with pytest.raises(InputError, match=r"max_memory\['cpu'\]"):
        dispatch(tiny(), "auto", max_memory={"cpu": size})

