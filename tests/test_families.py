"""A family beyond OPT's block shape, with no core edit: grouped-query attention + parallel residual.

The block comes from examples/parallel_gqa_family (a third-party plugin, registered into a fresh
registry exactly as the entry-point loader would). Its logits are checked against a forward pass
written here from scratch in plain torch on the same weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import optkit
from optkit.testing import add_plugin, fresh_registry
from tests.helpers import load_example_plugin

HEADS, KV_HEADS, LAYERS = 4, 2, 2


@pytest.fixture(scope="module")
def registry():
    registry = fresh_registry()
    add_plugin(load_example_plugin("parallel_gqa_family/optkit_parallel_gqa", "optkit_parallel_gqa"), registry)
    return registry


def family_spec(attention: str = "eager", kv_heads: int = KV_HEADS) -> dict:
    return {
        "family": "parallel-gqa",
        "decoder": {"vocab_size": 97, "hidden_size": 32, "num_layers": LAYERS, "num_heads": HEADS, "ffn_dim": 48,
                    "max_positions": 64, "query_scaling": "scores", "attention": attention,
                    "mlp": {"name": "ffn", "params": {"activation": "gelu"}}, "init_std": 0.2,
                    "block": {"name": "parallel_gqa", "params": {"num_kv_heads": kv_heads}}},
        "head": "causal_lm",
        "tokens": {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2},
    }


def build(registry, attention: str = "eager") -> optkit.Model:
    torch.manual_seed(0)
    model = optkit.build(family_spec(attention), registry=registry).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong wiring cannot hide behind zeros
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def reference_logits(state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The family's math, by hand: learned positions (offset 2), per layer
    x + attention(ln(x)) + mlp(ln(x)) with k/v head j // (H / KV) serving query head j."""
    batch, length = ids.shape
    head_dim, group = 32 // HEADS, HEADS // KV_HEADS
    x = state["decoder.embed_tokens.weight"][ids] + state["decoder.embed_positions.weight"][torch.arange(length) + 2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        h = F.layer_norm(x, (32,), state[p + "norm.weight"], state[p + "norm.bias"], eps=1e-5)

        def proj(name: str, heads: int) -> torch.Tensor:
            y = h @ state[p + f"self_attn.{name}.weight"].T + state[p + f"self_attn.{name}.bias"]
            return y.view(batch, length, heads, head_dim)

        q, k, v = proj("q_proj", HEADS), proj("k_proj", KV_HEADS), proj("v_proj", KV_HEADS)
        out = torch.empty(batch, length, HEADS, head_dim)
        for head in range(HEADS):
            scores = q[:, :, head] @ k[:, :, head // group].transpose(1, 2) / head_dim**0.5
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out[:, :, head] = probs @ v[:, :, head // group]
        attended = out.reshape(batch, length, 32) @ state[p + "self_attn.out_proj.weight"].T \
            + state[p + "self_attn.out_proj.bias"]
        hidden = F.gelu(h @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        x = x + attended + hidden @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
    x = F.layer_norm(x, (32,), state["decoder.final_layer_norm.weight"], state["decoder.final_layer_norm.bias"],
                     eps=1e-5)
    return x @ state["decoder.embed_tokens.weight"].T


def test_the_block_is_what_the_spec_asks_for(registry):
    model = build(registry)
    layer = model.decoder.layers[0]
    assert type(layer).__name__ == "ParallelBlock" and layer.kv_heads == KV_HEADS
    assert layer.self_attn.k_proj.weight.shape == (KV_HEADS * 8, 32)
    assert ("block", "parallel_gqa") not in optkit.registry  # only this registry has it


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_logits_equal_a_hand_written_forward(registry, attention):
    model = build(registry, attention)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).logits
    expected = reference_logits({k: v.float() for k, v in model.state_dict().items()}, ids)
    assert float((got - expected).abs().max()) <= 1e-5


def test_the_cache_holds_only_the_key_value_heads_and_decoding_matches(registry):
    model = build(registry)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(1, max_length=16, kind="static")
    assert cache.keys[0].shape == (1, KV_HEADS, 16, 8)
    generated = model.generate(ids, max_new_tokens=8, min_new_tokens=8)
    state = {k: v.float() for k, v in model.state_dict().items()}
    expected = ids
    for _ in range(8):  # greedy by hand, recomputing the whole sequence each time
        expected = torch.cat([expected, reference_logits(state, expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)


def test_backend_swap_and_training_work_on_the_new_block(registry):
    model = build(registry)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    optkit.set_backend(model, attention="sdpa")
    assert model.attention_backend == "sdpa"
    with torch.no_grad():
        assert float((model(ids).logits - before).abs().max()) <= 1e-5
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.decoder.layers[0].self_attn.k_proj.weight.grad is not None


def test_a_bad_block_parameter_is_an_optkit_error_naming_it(registry):
    with pytest.raises(optkit.OptkitError, match="num_kv_heads"):
        optkit.build(family_spec(kv_heads=3), registry=registry)
