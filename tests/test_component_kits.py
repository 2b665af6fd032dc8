"""The conformance kits of the non-attention kinds (optkit.testing.component_kits).

Every first-party implementation passes its kit; each kit rejects deliberately broken
implementations with the property that names the bug; factories' products are checked
against their interface when the model is built.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import optkit
from optkit.errors import ComponentError, InputError, SpecValidationError, UnknownComponentError
from optkit.interfaces import (
    MLP,
    AttentionKernel,
    AttentionMask,
    AttentionResult,
    KVCache,
    Norm,
    PositionalEmbedding,
    TokenEmbedding,
)
from optkit.plugins import PluginRecord
from optkit.registration import Capabilities
from optkit.testing import (
    COMPONENT_KINDS,
    ComponentConformanceError,
    ComponentSuite,
    ConformanceError,
    check_attention_backend,
    check_component,
    check_kv_cache,
    check_mlp,
    fresh_registry,
    temporary_component,
)

EXAMPLES = 4
FIRST_PARTY = [(r.kind, r.name) for r in optkit.registry.registrations() if r.kind in COMPONENT_KINDS
               and r.provider.distribution == "optkit"]


# -- every first-party implementation passes --------------------------------------------------------
@pytest.mark.parametrize("kind,name", FIRST_PARTY, ids=[f"{k}-{n}" for k, n in FIRST_PARTY])
def test_first_party_component_passes_its_kit(kind, name):
    report = check_component(kind, name, max_examples=EXAMPLES)
    assert report.failed == []
    assert {"builds", "shapes", "no_hidden_state"} <= set(report.passed), str(report)


def test_first_party_references_are_checked_not_skipped():
    for kind, name in [("mlp", "ffn"), ("norm", "layernorm"), ("positional_embedding", "learned"),
                       ("token_embedding", "learned"), ("linear", "torch"), ("kv_cache", "dynamic"),
                       ("kv_cache", "static")]:
        report = check_component(kind, name, max_examples=EXAMPLES, only=["equivalence"])
        assert report.passed == ["equivalence"], str(report)
    gelu = check_mlp("ffn", params={"activation": "gelu"}, max_examples=EXAMPLES, only=["equivalence"])
    assert gelu.passed == ["equivalence"]


@pytest.mark.skipif(bool(optkit.registry.get("linear", "onednn").unavailable_reasons("cpu", torch.float32)),
                    reason="oneDNN linear not usable here")
def test_onednn_linear_equals_torch_linear():
    assert check_component("linear", "onednn", reference="torch", max_examples=EXAMPLES,
                           only=["equivalence"]).passed == ["equivalence"]


class TestStaticCacheSuite(ComponentSuite):
    """The pytest form of the kits, on a first-party cache."""

    kind = "kv_cache"
    component = "static"
    max_examples = EXAMPLES


class TestLayerNormSuite(ComponentSuite):
    kind = "norm"
    component = "layernorm"
    max_examples = EXAMPLES


# -- planted bugs ---------------------------------------------------------------------------------
def _ffn_linears(ctx) -> tuple[nn.Module, nn.Module]:
    d = ctx.decoder
    return ctx.linear(d.hidden_size, d.ffn_dim, bias=d.bias), ctx.linear(d.ffn_dim, d.hidden_size, bias=d.bias)


class RememberingMLP(MLP):
    """Adds the mean of the previous input: a hidden state between calls."""

    def __init__(self, ctx):
        super().__init__()
        self.fc1, self.fc2 = _ffn_linears(ctx)
        self.register_buffer("last", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc2(F.relu(self.fc1(x))) + self.last
        self.last.copy_(x.detach().mean())
        return out


class DetachedWeightMLP(MLP):
    """fc2's weight never trains."""

    def __init__(self, ctx):
        super().__init__()
        self.fc1, self.fc2 = _ffn_linears(ctx)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(self.fc1(x)), self.fc2.weight.detach(), self.fc2.bias)


class GeluMLP(DetachedWeightMLP):
    """OPT's keys, the wrong activation: not the 'ffn' reference."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WideEpsLayerNorm(Norm):
    def __init__(self, dim: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, eps=0.5)


class Float32Norm(WideEpsLayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float())


class OffsetZeroPositions(PositionalEmbedding):
    """Learned positions without OPT's offset of 2 (loads OPT checkpoints shifted by two rows)."""

    def __init__(self, ctx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(ctx.decoder.max_positions + 2, ctx.decoder.hidden_size) * 0.02)

    def additive(self, position_ids: Tensor) -> Tensor:
        return F.embedding(position_ids.clamp(min=0), self.weight)


class PerTokenPositions(OffsetZeroPositions):
    """Forgets the batch dimension: one row of vectors for the whole batch, flattened."""

    def additive(self, position_ids: Tensor) -> Tensor:
        return F.embedding(position_ids.clamp(min=0).flatten(), self.weight)


class Float32TokenEmbedding(TokenEmbedding):
    def __init__(self, ctx):
        super().__init__()
        self.embedding_dim = ctx.decoder.embed_dim
        self.weight = nn.Parameter(torch.randn(ctx.decoder.vocab_size, self.embedding_dim))

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight).float()


class BiaslessLinear(nn.Linear):
    """Has a bias, never adds it."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class ForgetfulCache(KVCache):
    """Returns only the newest keys: attention would never see the past."""

    def __init__(self, num_layers: int):
        self.lengths = [0] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def attended_length(self, new_tokens: int) -> int:
        return self.lengths[0] + new_tokens

    def update(self, layer_idx: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.lengths[layer_idx] += key.shape[-2]
        return key, value


class WrappingCache(KVCache):
    """A ring buffer that silently overwrites the oldest tokens when full."""

    def __init__(self, num_layers: int, max_length: int):
        self.stored: list[list[Tensor]] = [[] for _ in range(num_layers)]
        self.values: list[list[Tensor]] = [[] for _ in range(num_layers)]
        self._max = max_length

    @property
    def max_length(self) -> int:
        return self._max

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return sum(k.shape[-2] for k in self.stored[layer_idx])

    def attended_length(self, new_tokens: int) -> int:
        return self.get_seq_length() + new_tokens

    def update(self, layer_idx: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        self.stored[layer_idx].append(key)
        self.values[layer_idx].append(value)
        return torch.cat(self.stored[layer_idx], -2), torch.cat(self.values[layer_idx], -2)


SHARED: dict[str, KVCache] = {}


def _shared_cache(params, ctx) -> Callable[..., KVCache]:
    """Hands every caller the same cache."""
    def make(*, num_layers: int, **_: object) -> KVCache:
        return SHARED.setdefault("cache", ForgetfulCache(num_layers))

    return make


def _torch_linear_with(layer: type[nn.Linear]) -> Callable:
    return lambda params, ctx: (lambda i, o, *, bias: layer(i, o, bias=bias))


BUGS = {  # kind, factory, reference, the properties that must fail (and only those), words the message must hold
    "mlp_keeps_state": ("mlp", lambda p, ctx: RememberingMLP(ctx), None, {"no_hidden_state"},
                        "keeps state between calls"),
    "mlp_detached_weight": ("mlp", lambda p, ctx: DetachedWeightMLP(ctx), None, {"gradients"},
                            "no gradient reaches parameter fc2.weight"),
    "mlp_wrong_activation": ("mlp", lambda p, ctx: GeluMLP(ctx), "ffn", {"equivalence"},
                             "output: off from the reference"),
    "norm_wrong_eps": ("norm", lambda p, ctx: WideEpsLayerNorm, "layernorm", {"equivalence"},
                       "off from the reference"),
    "norm_float32_output": ("norm", lambda p, ctx: Float32Norm, None, {"dtypes"},
                            "is torch.float32 for a component and inputs in torch.bfloat16"),
    "positions_without_offset": ("positional_embedding", lambda p, ctx: OffsetZeroPositions(ctx), "learned",
                                 {"equivalence"}, "additive: off from the reference"),
    "positions_lose_batch": ("positional_embedding", lambda p, ctx: PerTokenPositions(ctx), None, {"shapes"},
                             "additive has shape"),
    "token_embedding_float32": ("token_embedding", lambda p, ctx: Float32TokenEmbedding(ctx), None, {"dtypes"},
                                "output is torch.float32"),
    "linear_ignores_bias": ("linear", _torch_linear_with(BiaslessLinear), "torch", {"gradients", "equivalence"},
                            "no gradient reaches parameter bias"),
    "cache_forgets_the_past": ("kv_cache", lambda p, ctx: (lambda *, num_layers, **_: ForgetfulCache(num_layers)),
                               None, {"shapes", "dtypes", "equivalence"}, "update returned keys of shape"),
    "cache_shared_between_calls": ("kv_cache", _shared_cache, None,
                                   {"builds", "shapes", "dtypes", "no_hidden_state", "gradients", "equivalence",
                                    "capacity"}, "returned the same cache object twice"),
    "cache_wraps_when_full": ("kv_cache", lambda p, ctx: (lambda *, num_layers, max_length, **_:
                                                          WrappingCache(num_layers, max_length)),
                              None, {"capacity"}, "without an error"),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_planted_bug_fails_the_kit_naming_the_property(bug):
    kind, factory, reference, expected, words = BUGS[bug]
    SHARED.clear()
    with temporary_component(kind, "buggy", factory):
        with pytest.raises(ComponentConformanceError) as caught:
            check_component(kind, "buggy", max_examples=EXAMPLES, reference=reference, shrink=False)
    report = caught.value.report
    assert set(report.failed) == expected, str(report)
    message = str(caught.value)
    assert message.startswith(f"{kind} 'buggy' fails {len(expected)} of {len(report.results)} conformance properties")
    for prop in expected:
        assert f"\n  - {prop}: " in message
    assert words in message, message


def test_a_failure_prints_the_sizes_that_reproduce_it():
    with temporary_component("mlp", "buggy", lambda p, ctx: GeluMLP(ctx)):
        with pytest.raises(ComponentConformanceError, match=r"equivalence: .*\(sizes: batch=\d+ length=\d+ "
                                                            r"hidden_size=\d+ num_heads=\d+ ffn_dim=\d+"):
            check_mlp("buggy", reference="ffn", only=["equivalence"], max_examples=EXAMPLES)


def test_unknown_reference_and_kind_are_named():
    with pytest.raises(ComponentConformanceError, match="no reference mlp named 'swiglu' .references: ffn."):
        check_mlp("ffn", reference="swiglu", only=["equivalence"], max_examples=1)
    with pytest.raises(ValueError, match="no conformance kit for kind 'head'"):
        check_component("head", "base")


def test_a_cache_kit_runs_through_the_shortcut_and_skips_what_does_not_apply():
    report = check_kv_cache("dynamic", max_examples=2)
    assert report.failed == [] and "capacity" in report.passed
    norm = check_component("norm", "rmsnorm", max_examples=2)
    assert norm.skipped == ["equivalence"]


# -- factories' products are checked when the model is built ------------------------------------------
def test_a_linear_factory_that_builds_the_wrong_size_fails_at_build():
    with temporary_component("linear", "buggy", lambda p, ctx: (lambda i, o, *, bias: nn.Linear(o, i, bias=bias))):
        with pytest.raises(ComponentError, match=r"linear 'buggy' from plugin .* was asked for a 64 -> 128 linear but "
                                                 r"built one with in_features=128, out_features=64"):
            optkit.build("opt-tiny", linear="buggy")


def test_a_linear_factory_that_builds_no_module_fails_at_build():
    with temporary_component("linear", "buggy", lambda p, ctx: (lambda i, o, *, bias: torch.zeros(o, i))):
        with pytest.raises(ComponentError, match=r"linear 'buggy' .* built tensor\(.*\) \(Tensor\), not an nn.Module"):
            optkit.build("opt-tiny", linear="buggy")


def test_a_norm_factory_whose_norm_changes_the_width_fails_at_build():
    with temporary_component("norm", "buggy", lambda p, ctx: (lambda dim: nn.Linear(dim, dim + 1))):
        with pytest.raises(ComponentError, match=r"norm 'buggy' .* built a norm that maps 64 features \(dim=64\) to "
                                                 r"shape \(1, 1, 65\)"):
            optkit.build("opt-tiny", norm="buggy")


def test_a_norm_factory_that_raises_names_the_plugin():
    def broken(dim: int) -> nn.Module:
        raise RuntimeError("no kernel for this width")

    with temporary_component("norm", "buggy", lambda p, ctx: broken):
        with pytest.raises(ComponentError, match="norm 'buggy' from plugin .* failed to build a norm: RuntimeError: "
                                                 "no kernel for this width"):
            optkit.build("opt-tiny", norm="buggy")


def test_a_cache_factory_that_makes_no_kv_cache_fails_when_the_cache_is_made():
    model = optkit.build("opt-tiny")
    with temporary_component("kv_cache", "buggy", lambda p, ctx: (lambda **shape: {"keys": []})):
        with pytest.raises(ComponentError, match=r"kv_cache 'buggy' from plugin .* made \{'keys': \[\]\} \(dict\), "
                                                 r"not an optkit.interfaces.KVCache"):
            model.new_cache(2, kind="buggy")
    assert isinstance(model.new_cache(2, kind="static", max_length=4), KVCache)


def test_a_cache_overflow_is_an_input_error_of_the_static_cache():
    cache = optkit.build("opt-tiny").new_cache(1, max_length=2, kind="static")
    key = torch.zeros(1, 4, 3, 16)
    with pytest.raises(InputError, match="holds 2 tokens"):
        cache.update(0, key, key)


# -- the attention kit: diagnoses from what was observed (issue 21, point 5) ----------------------------
class SoftmaxKernel(AttentionKernel):
    """A correct kernel; subclasses break one thing."""

    name = "buggy"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *, scale: float,
                dropout_p: float = 0.0, need_weights: bool = False) -> AttentionResult:
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~self.allowed(mask, dropout_p).to(query.device), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
        if dropout_p > 0.0:
            probs = self.dropout(probs, dropout_p)
        return AttentionResult(torch.matmul(probs, value), None)

    def allowed(self, mask: AttentionMask, dropout_p: float) -> Tensor:
        return mask.allowed()

    def dropout(self, probs: Tensor, p: float) -> Tensor:
        return F.dropout(probs, p=p, training=True)


def _offset_mask(mask: AttentionMask, shift: int) -> AttentionMask:
    """The same mask with the queries placed ``shift`` keys earlier (a cache-offset bug)."""
    return AttentionMask(batch_size=mask.batch_size, q_len=mask.q_len, kv_len=mask.kv_len,
                         q_offset=max(mask.q_offset - shift, 0), key_padding=mask.key_padding, causal=mask.causal)


class OffsetInDropoutPath(SoftmaxKernel):
    """Correct without dropout; the dropout path ignores the cache offset."""

    def allowed(self, mask: AttentionMask, dropout_p: float) -> Tensor:
        return _offset_mask(mask, 2).allowed() if dropout_p > 0 else mask.allowed()


class OffsetEverywhere(SoftmaxKernel):
    def allowed(self, mask: AttentionMask, dropout_p: float) -> Tensor:
        return _offset_mask(mask, 1).allowed()


class UnscaledDropout(SoftmaxKernel):
    def dropout(self, probs: Tensor, p: float) -> Tensor:
        return probs * (torch.rand_like(probs) >= p)


class SixteenKeyBlocks(SoftmaxKernel):
    """Sees only the first 16-key block: right for up to 16 keys, wrong past the block boundary."""

    def allowed(self, mask: AttentionMask, dropout_p: float) -> Tensor:
        return mask.allowed() & (torch.arange(mask.kv_len) < 16)


def _dropout_failure(kernel: type[SoftmaxKernel]) -> str:
    with temporary_component("attention", "buggy", lambda p, ctx: kernel(), capabilities=Capabilities(dropout=True)):
        with pytest.raises(ConformanceError) as caught:
            check_attention_backend("buggy", only=["dropout"])
    return str(caught.value)


def test_a_mask_offset_in_the_dropout_path_is_not_blamed_on_dropout_scaling():
    message = _dropout_failure(OffsetInDropoutPath)
    assert "1/(1-p)" not in message, message
    assert "matches neither that output nor (1-p) times it" in message
    assert "compare the mask, offset and padding" in message and "case: batch=2" in message


def test_a_mask_offset_everywhere_is_reported_as_not_a_dropout_bug():
    message = _dropout_failure(OffsetEverywhere)
    assert "1/(1-p)" not in message, message
    assert "dropout cannot be judged: without dropout the kernel already differs from eager" in message
    assert "see equals_eager" in message


def test_unscaled_dropout_still_gets_the_rescaling_hint():
    message = _dropout_failure(UnscaledDropout)
    assert "equals (1-p) times it: kept probabilities must be scaled by 1/(1-p)" in message, message


def test_a_block_boundary_bug_is_reported_at_the_boundary():
    with temporary_component("attention", "buggy", lambda p, ctx: SixteenKeyBlocks()):
        with pytest.raises(ConformanceError) as caught:
            check_attention_backend("buggy", only=["equals_eager"], max_examples=20)
    message = str(caught.value)
    assert "kv_len=17 " in message and "batch=1 heads=1 head_dim=8" in message, message
    assert "padding=none" in message and "seed=0" in message


# -- a component of a plugin that is installed but not loaded (issue 21, point 4) ------------------------
def test_a_blocked_plugins_component_names_the_plugin_instead_of_a_did_you_mean(monkeypatch):
    monkeypatch.setenv("OPTKIT_BLOCK_PLUGINS", "sdpa")
    registry = fresh_registry()
    expected = ("unknown attention 'sdpa': it is provided by plugin 'sdpa' (optkit 0.1.0), which is blocked (listed in "
                "OPTKIT_BLOCK_PLUGINS); remove it from OPTKIT_BLOCK_PLUGINS to use it")
    with pytest.raises(UnknownComponentError) as caught:
        registry.get("attention", "sdpa")
    assert str(caught.value) == expected
    with pytest.raises(SpecValidationError) as caught:
        optkit.build("opt-tiny", attention="sdpa", registry=registry)
    assert f"decoder.attention: {expected}" in str(caught.value) and "did you mean" not in str(caught.value)


def test_a_not_loaded_or_broken_plugins_component_says_so():
    registry = fresh_registry()
    registry.plugins.append(PluginRecord("chunked", "optkit-chunked-attention", "0.1.0", status="disabled",
                                         reason="not listed in OPTKIT_LOAD_PLUGINS"))
    with pytest.raises(UnknownComponentError, match=r"^unknown attention 'chunked': it is provided by plugin 'chunked' "
                                                    r"\(optkit-chunked-attention 0.1.0\), which is not loaded \(not "
                                                    r"listed in OPTKIT_LOAD_PLUGINS\); add it to OPTKIT_LOAD_PLUGINS"):
        registry.get("attention", "chunked")
    registry.plugins.append(PluginRecord("geglu", "acme-mlp", "2.0", status="broken", reason="ImportError: no acme"))
    with pytest.raises(UnknownComponentError, match=r"'geglu': it is provided by plugin 'geglu' \(acme-mlp 2.0\), "
                                                    r"which is broken \(ImportError: no acme\); fix the plugin"):
        registry.get("mlp", "geglu")
    with pytest.raises(UnknownComponentError, match=r"unknown attention 'chunkd' \(available: .*\)$"):
        registry.get("attention", "chunkd")  # another name: the usual message, no plugin is blamed
