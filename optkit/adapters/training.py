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

from optkit.adapters.attach import adapter_names, adapter_parameters
from optkit.adapters.peft_format import CONFIG_FILE, _replace, save_adapters
from optkit.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn

ADAPTER_STATE = "adapter"  # the trainer state's key for the adapter tensors (by parameter name)


def has_adapters(model: nn.Module) -> bool:
    return bool(adapter_names(model))


def is_adapter_checkpoint(out_dir: Path) -> bool:
    """Whether ``out_dir`` looks like a LoRA run's checkpoint (its PEFT config is written before the state)."""
    return (out_dir / CONFIG_FILE).is_file()


def save_adapter_checkpoint(model: nn.Module, payload: dict[str, Any], out_dir: Path, state_file: str) -> None:
    """PEFT's files for every adapter, then the trainer state (with the adapter tensors) as one atomic write."""
    save_adapters(model, out_dir)  # type: ignore[arg-type]  # any optkit Model
    tensors = {name: param.detach().to("cpu").clone() for name, param in adapter_parameters(model).items()}
    state = {**payload, ADAPTER_STATE: tensors}
    _replace(out_dir / state_file, lambda path: torch.save(state, path))


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
    with torch.no_grad():
        for name, param in held.items():
            param.copy_(stored[name])
    return True
