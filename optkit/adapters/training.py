"""Checkpoints of a LoRA run (``optkit.training.train`` on a model with adapters): the adapter, not the model.

A checkpoint directory then holds PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` (kilobytes
to megabytes; ``PeftModel.from_pretrained`` and ``optkit.from_pretrained(base, adapter=DIR)`` read them) and
``trainer_state.pt``. The trainer state also carries its own copy of the adapter tensors and is written last
(whole, then renamed into place), so an interrupted save leaves a state whose step, optimizer and adapter
agree: resuming reads everything from it. The frozen base is never written; a resumed run must be given
the same base model and adapter settings again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from optkit.adapters.attach import active_adapter, adapter_names, adapter_parameters, lora_modules, merged_adapter
from optkit.adapters.peft_format import CONFIG_FILE, _replace, save_adapters
from optkit.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from torch import nn

ADAPTER_STATE = "adapter"  # the trainer state's key for the adapter tensors (by parameter name)
ADAPTER_SETTINGS = "adapter_settings"  # {name: [r, alpha, dropout, use_rslora]}: what the shapes cannot tell


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_names(model))


def check_trainable(model: nn.Module) -> None:
    """Refuse, before anything is written, a run whose optimizer would get no gradient at all.

    Without this, training a model whose adapter was loaded for inference, is merged or is switched off (or a
    model frozen by hand) fails deep in autograd ("element 0 of tensors does not require grad"). An adapter that
    requires grad but is not the active one gets no gradient either, so the active adapter is what counts.
    """
    names = adapter_names(model)
    if not names:
        if not any(param.requires_grad for param in model.parameters()):
            raise InputError("no parameter of this model requires grad, so training would change nothing; unfreeze "
                             "it (model.requires_grad_(True)) or add adapters to train (model.add_adapter(r=8))")
        return
    adapters = adapter_parameters(model)
    base = next((name for name, param in model.named_parameters() if param.requires_grad and name not in adapters), None)
    if base is not None:
        raise InputError(f"{base[:200]} requires grad, but a run with LoRA adapters checkpoints only the adapters "
                         "(PEFT's files), so what it learns would be lost at save and resume; freeze it "
                         "(requires_grad_(False)), or take the adapters off (merge_and_unload) to train the whole model")
    merged, active = merged_adapter(model), active_adapter(model)
    if merged is not None:
        raise InputError(f"adapter '{merged}' is merged into the weights, so its A and B take no part in forward and "
                         "would get no gradient; call unmerge_adapters(model) (model.unmerge_adapters()) before training")
    if active is None:
        raise InputError(f"no adapter is active (the base runs alone), so training would change nothing; call "
                         f"set_adapter(model, '{names[0]}') (adapters: {', '.join(names)})")
    if not any(param.requires_grad for param in adapter_parameters(model, active).values()):
        raise InputError(f"adapter '{active}' does not require grad (load_adapters loads for inference unless "
                         f"trainable=True), so training would change nothing; load it with trainable=True, or call "
                         f"requires_grad_(True) on adapter_parameters(model, '{active}').values()")


def is_adapter_checkpoint(out_dir: Path) -> bool:
    """Whether ``out_dir`` looks like a LoRA run's checkpoint (its PEFT config is written before the state)."""
    return (out_dir / CONFIG_FILE).is_file()


def save_adapter_checkpoint(model: nn.Module, payload: dict[str, Any], out_dir: Path, state_file: str) -> None:
    """PEFT's files for every adapter, then the trainer state (with the adapter tensors) as one atomic write."""
    save_adapters(model, out_dir)  # type: ignore[arg-type]  # any optkit Model
    tensors = {name: param.detach().to("cpu").clone() for name, param in adapter_parameters(model).items()}
    state = {**payload, ADAPTER_STATE: tensors, ADAPTER_SETTINGS: adapter_settings(model)}
    _replace(out_dir / state_file, lambda path: torch.save(state, path))


def adapter_settings(model: nn.Module) -> dict[str, list[Any]]:
    """Each adapter's ``[r, alpha, dropout, use_rslora]`` as plain numbers (``weights_only`` loads them)."""
    found: dict[str, list[Any]] = {}
    for module in lora_modules(model).values():
        for name, s in module.settings.items():
            found.setdefault(name, [s.r, float(s.alpha), float(s.dropout), s.use_rslora])
    return found


def _check_same_settings(model: nn.Module, saved: dict[str, Any], out_dir: Path) -> None:
    """A resumed adapter with another alpha, dropout or rsLoRA would silently compute another function
    (and be saved with the new config); the shapes match, so only the stored settings can tell."""
    stored, held = saved.get(ADAPTER_SETTINGS), adapter_settings(model)
    if stored is None:  # a checkpoint from before the settings were stored
        return
    for name in held:
        if list(stored.get(name, [])) != held[name]:
            keys = ("r", "alpha", "dropout", "use_rslora")
            was = ", ".join(f"{k}={v}" for k, v in zip(keys, stored.get(name, [])))
            now = ", ".join(f"{k}={v}" for k, v in zip(keys, held[name]))
            raise CheckpointError(f"{out_dir}: adapter '{name}' was trained with {was or 'no such adapter'}, but this "
                                  f"model's has {now}; resume with the same adapter settings, or pass resume=False "
                                  "(--no-resume) to start over")


def restore_adapter(model: nn.Module, saved: dict[str, Any], out_dir: Path) -> bool:
    """Load a LoRA checkpoint's adapter into ``model`` (True), or say nothing is to be done here (False: a
    full-model checkpoint for a model without adapters). A mismatch either way is a CheckpointError."""
    stored = saved.get(ADAPTER_STATE)
    held = adapter_parameters(model)
    if stored is None and not held:
        return False
    if stored is None:
        raise CheckpointError(f"{out_dir} holds a full-model checkpoint, but this model has LoRA adapters "
                              f"({', '.join(adapter_names(model))}); train into another out_dir, or pass "
                              "resume=False (--no-resume) to start over here")
    if not held:
        raise CheckpointError(f"{out_dir} holds a LoRA adapter checkpoint, but this model has no adapters; resume "
                              "with the same adapter settings (adapters={...} / --lora-r ...), or pass resume=False "
                              "(--no-resume) to start over")
    mismatched = sorted(set(stored) ^ set(held)) or [name for name in held if stored[name].shape != held[name].shape]
    if mismatched:
        raise CheckpointError(f"{out_dir}: the saved adapter does not fit this model's adapters (first difference: "
                              f"{mismatched[0][:200]}); resume with the same rank, targets and adapter names, or "
                              "pass resume=False (--no-resume)")
    _check_same_settings(model, saved, out_dir)
    with torch.no_grad():
        for name, param in held.items():
            param.copy_(stored[name])
    return True
