"""Small optkit models, checkpoints and example plugins that several test modules build the same way."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import optkit
from optkit.formats.open_llama import spec_from_config
from tests.helpers.tokenizer_files import build_tiny_bpe

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# -- OPT with a real tokenizer ----------------------------------------------------------------------
TEXT_MODEL_MAX_POSITIONS = 64


def make_text_model_dir(directory: Path) -> Path:
    """A tiny tokenizer (800 ids) and a random optkit model that fits it, saved together like a checkpoint."""
    build_tiny_bpe(directory)
    torch.manual_seed(0)  # init_std 0.2: random weights that do not repeat one token forever
    spec = {"extends": "opt-tiny",
            "decoder": {"vocab_size": 800, "max_positions": TEXT_MODEL_MAX_POSITIONS, "init_std": 0.2}}
    optkit.build(spec, dtype=torch.float32).save_pretrained(directory)
    return directory


# -- Open-Llama -------------------------------------------------------------------------------------
OPEN_LLAMA_TINY: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=32, initializer_range=0.15, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_open_llama(*, attention: str = "eager", head: str = "causal_lm", seed: int = 0,
                    **config: Any) -> optkit.Model:
    """A random tiny Open-Llama built from a transformers-style config through the format, with
    non-trivial norms (all-ones norms would hide a norm that is skipped)."""
    spec = spec_from_config({**OPEN_LLAMA_TINY, **config}, head=head).with_components(attention=attention)
    torch.manual_seed(seed)
    model = optkit.build(spec).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


# -- example plugins --------------------------------------------------------------------------------
def load_example_plugin(relative_path: str, module_name: str) -> ModuleType:
    """Import an example plugin's single-file package (``examples/<relative_path>/__init__.py``) from
    the checkout, whether or not it is pip-installed, without putting anything on ``sys.path``."""
    init = EXAMPLES / relative_path / "__init__.py"
    spec = importlib.util.spec_from_file_location(module_name, init)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no example plugin at {init}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_hash(model: nn.Module) -> str:
    """A digest of every tensor that is not an adapter's (bit-exact: any change to the base shows)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_A." not in name and ".lora_B." not in name:
            digest.update(name.replace(".base.", ".").encode())
            digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
