"""The bundled model (optkit/default_model, built by examples/train_tiny.py) on CPU in fp32.

Why: it is what runs when the Hub is out of reach, so its text must stay what it was when it
was trained (golden greedy continuations), it must still model held-out Python (perplexity
bound), on every attention backend usable here, and transformers must read the very same files
and agree token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import optkit
from optkit.training import eval_windows, perplexity

MODEL_DIR = Path(optkit.__file__).parent / "default_model"
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(),
                                reason="optkit/default_model/ does not exist yet: run python examples/train_tiny.py")

NEW_TOKENS = 24
# Greedy continuations produced once by the trained model (decoded new tokens, special tokens skipped).
GOLDEN = {
    'def fibonacci(n):': '\n    """\n    Return a list of strings of strings.\n    """\n    if not isinstance(n, str):\n        return',
    '    def __init__(self': ', name):\n    def __init__(self, name):\n        self.name = name\n    def __repr__(self',
    'class Stack:\n    """': '\n    A class for a class, class, class, class,\n    class, class, class, class, class,',
}
HELDOUT_WINDOW = 256
HELDOUT_PERPLEXITY = 40.059  # measured on heldout.txt (8 windows) when the model was bundled
HELDOUT_BOUND = HELDOUT_PERPLEXITY * 1.05


def usable_backends() -> list[str]:
    return [name for name in optkit.registry.names("attention")
            if optkit.registry.get("attention", name).unavailable_reasons("cpu", torch.float32) == []]


BACKENDS = usable_backends()


@pytest.fixture(scope="module")
def tokenizer():
    from optkit.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module", params=BACKENDS)
def model(request):
    torch.manual_seed(0)
    return optkit.from_pretrained(MODEL_DIR, attention=request.param, dtype=torch.float32)


def greedy(model, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """Prompt + plain greedy ids from optkit's generate (stops at the model's EOS, like transformers): the
    weights' own continuation, with the repetition settings of the bundled generation_config.json turned off."""
    from optkit.generation import generate

    return generate(model, input_ids, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0,
                    no_repeat_ngram_size=0)


@torch.no_grad()
def plain_greedy(model, input_ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    """The obvious loop: a full forward per token, no cache; the reference for generate."""
    ids = input_ids
    for _ in range(new_tokens):
        next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        if int(next_id) == model.spec.tokens.eos_token_id:
            break
    return ids


def encode(tokenizer, prompt: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(prompt)])


def test_bundled_files_are_small_fp16_and_documented():
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["model_type"] == "opt"
    from safetensors import safe_open

    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 21e6, f"default_model is {total / 1e6:.1f} MB (budget: a wheel of at most 25 MB)"
    readme = (MODEL_DIR / "README.md").read_text()
    assert "PSF" in readme and "perplexity" in readme
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "heldout.txt"):
        assert (MODEL_DIR / name).is_file(), name


@pytest.mark.parametrize("prompt", list(GOLDEN))
def test_golden_greedy_continuation(model, tokenizer, prompt):
    prompt_ids = encode(tokenizer, prompt)
    output = greedy(model, prompt_ids)
    text = tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    assert text == GOLDEN[prompt], f"{model.attention_backend}: {text!r}"


def test_generate_matches_a_plain_greedy_loop(model, tokenizer):
    for prompt in GOLDEN:
        prompt_ids = encode(tokenizer, prompt)
        assert greedy(model, prompt_ids).tolist() == plain_greedy(model, prompt_ids).tolist(), prompt


def test_heldout_perplexity_below_recorded_bound(model, tokenizer):
    text = (MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")
    stream = torch.tensor(tokenizer.encode(text))
    windows = eval_windows(stream, seq_len=HELDOUT_WINDOW, max_windows=1000)
    assert windows.shape[0] >= 4
    measured = perplexity(model, windows)
    assert measured < HELDOUT_BOUND, f"{model.attention_backend}: perplexity {measured:.3f}"


def test_transformers_reads_the_bundled_files_and_agrees(tokenizer):
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.OPTForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    hf_tokenizer = transformers.GPT2Tokenizer.from_pretrained(MODEL_DIR)
    ours = optkit.from_pretrained(MODEL_DIR, dtype=torch.float32)
    for prompt in GOLDEN:
        hf_ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        assert hf_ids[0, 0].item() == 2  # OPT's </s> is prepended
        assert hf_ids.tolist() == encode(tokenizer, prompt).tolist()
        with torch.no_grad():
            expected = hf_model.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), max_new_tokens=NEW_TOKENS,
                                         do_sample=False, pad_token_id=hf_tokenizer.pad_token_id)
            torch.testing.assert_close(ours(hf_ids).logits, hf_model(hf_ids).logits, rtol=1e-4, atol=1e-4)
        # both follow the bundled generation_config.json (repetition settings included)
        assert ours.generate(hf_ids, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == expected.tolist(), prompt


INT8_MARGIN = 1.10  # LLM.int8 may cost a little perplexity; stated margin over the fp32 bound


@pytest.mark.skipif(bool(optkit.registry.get("linear", "int8").unavailable_reasons("cpu", torch.float32)),
                    reason="bitsandbytes int8 cannot run on this machine")
def test_int8_heldout_perplexity_within_margin(tokenizer):
    model = optkit.from_pretrained(MODEL_DIR, linear="int8", dtype=torch.float32)
    assert type(model.decoder.layers[0].self_attn.q_proj).__name__ != "Linear"  # really quantized
    text = (MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")
    windows = eval_windows(torch.tensor(tokenizer.encode(text)), seq_len=HELDOUT_WINDOW, max_windows=1000)
    measured = perplexity(model, windows)
    assert measured < HELDOUT_BOUND * INT8_MARGIN, f"int8: perplexity {measured:.3f}"
