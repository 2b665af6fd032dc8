"""Task heads: base (hidden states), causal LM, sequence classification, question answering."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from optkit.errors import InputError
from optkit.interfaces import Head, HeadInputs, HeadMatmul, LinearFactory, ShardStyle, TokenEmbedding


def keep_positions(hidden: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """transformers' ``logits_to_keep``: an int keeps the last n (0 = all), a 1-D tensor selects positions."""
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
    return hidden[:, logits_to_keep]


class BaseHead(Head):
    """No head: the final hidden states (after final norm and project_out)."""

    def forward(self, hidden_states: Tensor, inputs: HeadInputs) -> dict[str, Any]:
        return {"last_hidden_state": hidden_states}

    def tp_plan(self) -> dict[str, ShardStyle]:
        """No weights: nothing to split."""
        return {}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust."""


class CausalLMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tie_word_embeddings: bool = True


class CausalLMHead(Head):
    """Logits over the vocabulary; tied to the token embedding unless told otherwise."""

    checkpoint_prefix = "lm_head"

    def __init__(self, embedding: TokenEmbedding, tied: bool, init_std: float,
                 linear_factory: LinearFactory | None = None):
        super().__init__()
        self.tied = tied
        # A linear backend may offer its own matmul (e.g. oneDNN packing): the LM head is the largest GEMV.
        self._matmul = linear_factory.matmul if isinstance(linear_factory, HeadMatmul) else None
        self._matmul_cache = linear_factory.matmul_cache() if isinstance(linear_factory, HeadMatmul) else None
        if tied:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty_like(embedding.weight))
            nn.init.normal_(self.weight, std=init_std)

    def tie_weights(self, token_embedding: TokenEmbedding) -> None:
        if self.tied:
            self.weight = token_embedding.weight

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Logits split by vocabulary rows (tied or not) and gathered for the positions returned."""
        return {"": "vocab"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: the parallel style gathers the logits."""

    def forward(self, hidden_states: Tensor, inputs: HeadInputs) -> dict[str, Any]:
        hidden = keep_positions(hidden_states, inputs.logits_to_keep)
        if self._matmul is not None:
            logits = self._matmul(hidden, self.weight, self._matmul_cache)
        else:
            logits = F.linear(hidden, self.weight)
        loss = None
        if inputs.labels is not None:
            loss = causal_lm_loss(logits, inputs.labels)
        return {"logits": logits, "loss": loss}


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross entropy in fp32; labels are the input ids, -100 is ignored."""
    if labels.shape != logits.shape[:2]:
        raise InputError(f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])} "
                         "(with logits_to_keep, compute the loss on all positions)")
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)


ProblemType = Literal["regression", "single_label_classification", "multi_label_classification"]


class SequenceClassificationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_labels: int = Field(default=2, gt=0)
    problem_type: ProblemType | None = None


class SequenceClassificationHead(Head):
    """Scores every position, pools the rightmost token that is not padding."""

    checkpoint_prefix = "score"

    def __init__(self, dim: int, num_labels: int, problem_type: str | None, pad_token_id: int | None, init_std: float):
        super().__init__()
        self.num_labels, self.problem_type, self.pad_token_id = num_labels, problem_type, pad_token_id
        self.weight = nn.Parameter(torch.empty(num_labels, dim))
        nn.init.normal_(self.weight, std=init_std)

    def tp_plan(self) -> dict[str, ShardStyle]:
        """A few labels: every tensor-parallel rank keeps the whole score matrix."""
        return {"": "replicate"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: kept whole."""

    def pool_index(self, input_ids: Tensor | None, batch: int, length: int) -> Tensor:
        if self.pad_token_id is None and batch != 1:
            raise InputError("sequence classification of batches needs a pad token; set tokens.pad_token_id")
        if input_ids is None or self.pad_token_id is None:
            if input_ids is None:
                warnings.warn("sequence classification with inputs_embeds pools the last position; "
                              "padding cannot be detected", stacklevel=3)
            return torch.full((batch,), length - 1, dtype=torch.long)
        real = (input_ids != self.pad_token_id).long()
        return (torch.arange(length, device=input_ids.device) * real).argmax(-1)

    def forward(self, hidden_states: Tensor, inputs: HeadInputs) -> dict[str, Any]:
        batch, length = hidden_states.shape[:2]
        logits = F.linear(hidden_states, self.weight)
        index = self.pool_index(inputs.input_ids, batch, length).to(logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), index]
        loss = None if inputs.labels is None else self.loss(pooled, inputs.labels.to(pooled.device))
        return {"logits": pooled, "loss": loss}

    def infer_problem_type(self, labels: Tensor) -> str:
        if self.problem_type is not None:
            return self.problem_type
        if self.num_labels == 1:
            return "regression"
        if labels.dtype in (torch.long, torch.int):
            return "single_label_classification"
        return "multi_label_classification"

    def loss(self, pooled: Tensor, labels: Tensor) -> Tensor:
        problem = self.infer_problem_type(labels)
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(pooled.squeeze(), labels.squeeze().to(pooled.dtype))
            return F.mse_loss(pooled, labels.to(pooled.dtype))
        if problem == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))


class QuestionAnsweringHead(Head):
    """Start/end logits per position; out-of-range targets are clamped and ignored in the loss."""

    checkpoint_prefix = "qa_outputs"

    def __init__(self, dim: int, init_std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, dim))
        self.bias = nn.Parameter(torch.zeros(2))
        nn.init.normal_(self.weight, std=init_std)

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Two outputs: every tensor-parallel rank keeps the whole projection."""
        return {"": "replicate"}

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: kept whole."""

    def forward(self, hidden_states: Tensor, inputs: HeadInputs) -> dict[str, Any]:
        logits = F.linear(hidden_states, self.weight, self.bias)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if inputs.start_positions is not None and inputs.end_positions is not None:
            ignored = start_logits.size(1)
            start = inputs.start_positions.reshape(-1).clamp(0, ignored).to(logits.device)
            end = inputs.end_positions.reshape(-1).clamp(0, ignored).to(logits.device)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        return {"start_logits": start_logits, "end_logits": end_logits, "loss": loss}


def base_head(params, ctx) -> BaseHead:
    return BaseHead()


def causal_lm_head(params: CausalLMParams, ctx) -> CausalLMHead:
    return CausalLMHead(ctx.token_embedding, params.tie_word_embeddings, ctx.decoder.init_std, ctx.linear_factory)


def sequence_classification_head(params: SequenceClassificationParams, ctx) -> SequenceClassificationHead:
    return SequenceClassificationHead(ctx.decoder.embed_dim, params.num_labels, params.problem_type,
                                      ctx.spec.tokens.pad_token_id, ctx.decoder.init_std)


def question_answering_head(params, ctx) -> QuestionAnsweringHead:
    return QuestionAnsweringHead(ctx.decoder.embed_dim, ctx.decoder.init_std)
