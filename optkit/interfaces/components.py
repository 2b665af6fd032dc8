"""Interfaces of the parameter-owning components: embeddings, norm, MLP, linear, head.

Must a plugin subclass? For ``token_embedding``, ``positional_embedding``, ``mlp``, ``block`` and ``head``,
yes: ``BuildContext.create`` checks ``isinstance`` against these ABCs (they are ``nn.Module`` subclasses).
``norm`` and ``linear`` registrations return *factories* (``NormFactory``, ``LinearFactory``); the modules
those make are checked to be ``nn.Module`` s of the right width, and subclassing ``Norm`` is recommended.

Weights: the core never initialises a plugin's parameters. A factory creates them initialised (optkit's own
use ``normal(0, ctx.decoder.init_std)`` for matrices, zeros for biases, ones for norm weights), in float32
and on no particular device: ``optkit.build`` runs factories under ``torch.device(device)`` and casts the
model to its dtype afterwards; ``from_pretrained`` builds on "meta" and fills every parameter from the
checkpoint. Parameter names are checkpoint keys. docs/writing-a-plugin.md, "Components of the other kinds".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


class TokenEmbedding(nn.Module, ABC):
    """Token ids ``(batch, length)`` -> vectors ``(batch, length, embedding_dim)`` in the model's dtype.

    ``weight`` ``(vocab_size, embedding_dim)`` is the matrix a tied LM head reuses; ``embedding_dim``
    must equal the spec's ``embed_dim`` (checked at build). Subclass it (checked with ``isinstance``).
    """

    weight: nn.Parameter
    embedding_dim: int

    @abstractmethod
    def forward(self, input_ids: Tensor) -> Tensor: ...

    def embed_inputs(self, inputs_embeds: Tensor) -> Tensor:
        """Post-processing applied to user ``inputs_embeds`` (none by default)."""
        return inputs_embeds


class PositionalEmbedding(nn.Module, ABC):
    """Positions enter either added to the hidden states or rotated into q/k.

    ``position_ids`` ``(batch, length)`` are 0-based positions of real tokens, including the cache offset
    (-1 for padding slots, as transformers computes them from the attention mask). Subclass it (checked
    with ``isinstance``) and override ``additive`` and/or ``rotate``; the defaults add and rotate nothing.
    """

    max_positions: int | None = None

    @property
    def position_range(self) -> tuple[int, int] | None:
        """The valid ``position_ids`` (inclusive), when a lookup table limits them; None: any.

        The model checks user-given positions against it, so an out-of-range id fails with the fix
        instead of an IndexError inside the table.
        """
        return None

    def additive(self, position_ids: Tensor) -> Tensor | None:
        """Vectors ``(batch, length, hidden_size)`` (or broadcastable to it) added to the token embeddings
        after ``project_in``, or None. The core casts them to the hidden states' dtype."""
        return None

    def rotate(self, query: Tensor, key: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Position-dependent transform of q/k ``(batch, heads, length, head_dim)`` before they enter the
        KV cache (identity by default); return both in their shapes and dtype."""
        return query, key


class DecoderBlock(nn.Module, ABC):
    """One layer of the decoder stack: how a family arranges attention, MLP, norms and residuals.

    OPT's block (``sequential``: attention then MLP, each with a residual, norms before or after)
    is one implementation; a family with another structure (parallel residual, grouped-query
    attention, a mixture of experts) registers its own ``block`` and builds its sub-components
    through the ``BuildContext`` it receives, with no edit to the core. The block stores its keys and
    values in ``cache`` under ``layer_idx`` and reports how many key/value heads it stores.
    """

    @property
    @abstractmethod
    def kv_heads(self) -> int:
        """Key/value heads this block writes into the KV cache (caches are shaped by it)."""

    @abstractmethod
    def forward(self, x: Tensor, *, mask: Any, positional: PositionalEmbedding, position_ids: Tensor,
                cache: Any, layer_idx: int, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """``x`` (batch, length, hidden) -> (new hidden states, attention weights or None)."""


class Norm(nn.Module, ABC):
    """``(..., dim) -> (..., dim)`` in the input dtype. Made by a ``NormFactory`` (the ``norm`` registration
    returns the factory); subclassing is recommended, not checked (an ``nn.Module`` of the right width is)."""

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor: ...


class MLP(nn.Module, ABC):
    """``(batch, length, hidden_size) -> (batch, length, hidden_size)`` in the input dtype, called by each block
    after the attention residual. Subclass it (checked with ``isinstance``); build the projections with
    ``ctx.linear`` so the spec's ``linear`` (int8, oneDNN, ...) applies to them, and hold no state between calls."""

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor: ...


class LinearFactory(Protocol):
    """Builds one projection. Quantized backends (int8) plug in here.

    The layer it returns is an ``nn.Module`` computing ``x W^T + b`` on ``(..., in_features)`` with
    ``in_features`` / ``out_features`` attributes equal to the arguments (checked when ``ctx.linear`` builds
    it; adapters and tensor parallelism read them). No base class is required.
    """

    def __call__(self, in_features: int, out_features: int, *, bias: bool) -> nn.Module: ...


@runtime_checkable
class HeadMatmul(Protocol):
    """Optional: a linear factory that also multiplies by a weight it does not own.

    The tied LM head's weight is the token embedding's, not a projection's; a backend with its own
    kernel (oneDNN's packed GEMV) offers it here so the head, the largest product of a decode step,
    uses it too. ``matmul_cache()`` makes the per-head state ``matmul`` may keep (a packed copy).
    """

    def matmul_cache(self) -> Any: ...

    def matmul(self, x: Tensor, weight: Tensor, cache: Any) -> Tensor: ...


class StackableLinear(nn.Linear):
    """Optional base of a linear class whose instances may be stacked into one by ``optkit.inference``.

    Built as ``cls(in_features, sum(outs), bias=...)`` and given the stacked weights, it must compute
    the stacked outputs (plain ``nn.Linear`` does). Inference then computes q, k and v with one GEMM.
    """

    def weights_changed(self) -> None:
        """The weight's storage was replaced in place (moved into a stacked buffer): drop derived copies."""


class NormFactory(Protocol):
    """What a ``norm`` registration returns: called once per norm with ``dim`` (the hidden size)."""

    def __call__(self, dim: int) -> Norm: ...


@dataclass
class HeadInputs:
    """What a head may need besides the final hidden states."""

    input_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    labels: Tensor | None = None
    start_positions: Tensor | None = None
    end_positions: Tensor | None = None
    logits_to_keep: int | Tensor = 0


class Head(nn.Module, ABC):
    """Final hidden states -> task outputs (a dict of ModelOutput fields).

    ``checkpoint_prefix`` is the module name transformers uses for this head's
    weights (``lm_head``, ``score``, ``qa_outputs``), or "" for none.
    """

    checkpoint_prefix: str = ""
    tied: bool = False  # True: the head's weight IS the token embedding's (saved once, re-shared on load)

    @abstractmethod
    def forward(self, hidden_states: Tensor, inputs: HeadInputs) -> dict[str, Any]: ...

    def tie_weights(self, token_embedding: TokenEmbedding) -> None:
        """Re-share weights with the token embedding after loading (no-op by default)."""
