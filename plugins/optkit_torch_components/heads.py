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
    """transformers' ``logits_to_keep``: an int keeps the last n (0 = all), a 1-D tensor selects positions for
    every row, a 2-D integer tensor selects per row, a 2-D bool mask keeps its True positions (flattened)."""
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise InputError(f"logits_to_keep={logits_to_keep}: must be >= 0 (the number of last positions to "
                             "keep, 0 keeps all) or a tensor of positions")
        return hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
    if not isinstance(logits_to_keep, Tensor):
        raise InputError(f"logits_to_keep must be an int or a tensor of positions, got "
                         f"{type(logits_to_keep).__name__}")
    keep = logits_to_keep.to(hidden.device)
    if keep.dtype == torch.bool:
        if keep.shape != hidden.shape[:2]:
            raise InputError(f"logits_to_keep as a bool mask must have the shape of input_ids "
                             f"{tuple(hidden.shape[:2])}, got {tuple(keep.shape)}")
        return hidden[keep]
    if keep.is_floating_point() or keep.is_complex() or keep.dim() > 2:
        raise InputError(f"logits_to_keep tensor must hold integer positions (0-D, 1-D or 2-D (batch, n)) or be a "
                         f"bool mask, got dtype {keep.dtype} and shape {tuple(keep.shape)}")
    check_index_range("logits_to_keep", logits_to_keep, hidden.shape[1], low=-hidden.shape[1], ignore=None)
    if keep.dim() == 2:
        if keep.shape[0] != hidden.shape[0]:
            raise InputError(f"logits_to_keep as a 2-D tensor must have one row per sequence ({hidden.shape[0]}), "
                             f"got shape {tuple(keep.shape)}")
        return torch.take_along_dim(hidden, keep.long()[..., None], dim=1)
    return hidden[:, keep]


def check_index_range(name: str, values: Tensor, size: int, *, low: int = 0, ignore: int | None = -100) -> None:
    """Indices outside ``low..size-1`` (``ignore`` aside) fail here with the name, not as an IndexError (or a
    device-side assert) inside the loss. Checked on CPU tensors only: on an accelerator ``min``/``max`` would cost
    a host synchronisation every training step, so there the kernel's own bounds check is left to catch them.
    A DTensor (tensor parallelism replicates the targets) is checked on its local values: boolean indexing has
    no sharding rule."""
    if hasattr(values, "to_local"):
        values = values.to_local()
    if values.device.type != "cpu" or not values.numel():
        return
    kept = values if ignore is None else values[values != ignore]
    if not kept.numel():
        return
    least, most = int(kept.min()), int(kept.max())
    if least < low or most >= size:
        bad = least if least < low else most
        allowed = "" if ignore is None else f" (or {ignore}, ignored)"
        fix = "" if ignore is None else f", {ignore} where no loss is wanted"
        raise InputError(f"{name} holds {bad}, outside the valid range {low}..{size - 1}{allowed}; pass values "
                         f"in that range{fix} (were they made with another tokenizer or num_labels?)")


def integer_targets(name: str, values: Tensor, fix: str) -> Tensor:
    """Class or position indices as int64, the only index dtype cross_entropy takes (int32 is widened);
    a float or bool tensor is refused with ``fix`` instead of torch's 'expected target dtype' RuntimeError."""
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise InputError(f"{name} must be an integer tensor, got {values.dtype}; {fix}")
    return values.long()


def refuse_unused_targets(head: str, inputs: HeadInputs, used: tuple[str, ...]) -> None:
    """Targets this head computes no loss from are an error, not silently ignored (``loss`` would be None)."""
    given = [name for name in TARGET_HEADS if getattr(inputs, name) is not None and name not in used]
    if given:
        raise InputError(f"{' and '.join(given)} given, but the {head} head computes no loss from them; drop "
                         f"them, or load the model with head='{TARGET_HEADS[given[0]]}'")


TARGET_HEADS = {"labels": "causal_lm", "start_positions": "question_answering", "end_positions": "question_answering"}


class BaseHead(Head):
    """No head: the final hidden states (after final norm and project_out)."""

    def forward(self, hidden_states: Tensor, inputs: HeadInputs) -> dict[str, Any]:
        refuse_unused_targets("base", inputs, ())
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
        refuse_unused_targets("causal_lm", inputs, ("labels",))
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
    labels = integer_targets("labels", labels, "pass token ids (e.g. labels=input_ids), -100 where no loss is wanted")
    if labels.shape != logits.shape[:2]:
        raise InputError(f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])} "
                         "(with logits_to_keep, compute the loss on all positions)")
    check_index_range("labels", labels, logits.shape[-1])
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
        refuse_unused_targets("sequence_classification", inputs, ("labels",))
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
        batch = pooled.shape[0]
        if problem == "regression":
            if self.num_labels == 1:
                self.check_label_shape(labels, labels.numel() == batch, problem, f"{batch} values")
                return F.mse_loss(pooled.squeeze(), labels.squeeze().to(pooled.dtype))
            self.check_label_shape(labels, labels.shape == pooled.shape, problem, f"shape {tuple(pooled.shape)}")
            return F.mse_loss(pooled, labels.to(pooled.dtype))
        if problem == "single_label_classification":
            labels = integer_targets("labels", labels, f"single_label_classification takes class indices "
                                     f"0..{self.num_labels - 1}; for float targets set problem_type to "
                                     "regression or multi_label_classification")
            self.check_label_shape(labels, labels.numel() == batch, problem, f"{batch} class indices")
            check_index_range("labels", labels, self.num_labels)
            return F.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1))
        self.check_label_shape(labels, labels.shape == pooled.shape, problem,
                               f"shape {tuple(pooled.shape)} (one 0/1 target per label)")
        return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))

    def check_label_shape(self, labels: Tensor, fits: bool, problem: str, expected: str) -> None:
        """A label tensor the problem type cannot use fails here, not as a broadcast (silently wrong loss)
        or a batch-size ValueError from torch."""
        if not fits:
            raise InputError(f"labels have shape {tuple(labels.shape)} and dtype {labels.dtype}, but {problem} "
                             f"(num_labels={self.num_labels}) expects {expected}; pass such labels or set "
                             "problem_type (long labels: single_label_classification, float: "
                             "multi_label_classification, num_labels=1: regression)")


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
        refuse_unused_targets("question_answering", inputs, ("start_positions", "end_positions"))
        if (inputs.start_positions is None) != (inputs.end_positions is None):
            given = "start_positions" if inputs.start_positions is not None else "end_positions"
            raise InputError(f"only {given} given; the question-answering loss needs both start_positions and "
                             "end_positions (or neither, for logits only)")
        logits = F.linear(hidden_states, self.weight, self.bias)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if inputs.start_positions is not None and inputs.end_positions is not None:
            ignored = start_logits.size(1)
            start = answer_positions("start_positions", inputs.start_positions, start_logits.shape[0])
            end = answer_positions("end_positions", inputs.end_positions, start_logits.shape[0])
            start, end = start.clamp(0, ignored).to(logits.device), end.clamp(0, ignored).to(logits.device)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        return {"start_logits": start_logits, "end_logits": end_logits, "loss": loss}


def answer_positions(name: str, positions: Tensor, batch: int) -> Tensor:
    """One token index per row, as (batch,) or (batch, 1); out-of-range values are clamped and ignored later,
    as in transformers, but a float tensor or a wrong shape is the caller's mistake."""
    positions, given = integer_targets(name, positions, "pass token indices (torch.long), one per row"), positions
    if positions.dim() > 1:
        positions = positions.squeeze(-1)
    if positions.shape != (batch,):
        raise InputError(f"{name} has shape {tuple(given.shape)}, expected ({batch},) or ({batch}, 1): "
                         "one answer token index per row")
    return positions


def base_head(params, ctx) -> BaseHead:
    return BaseHead()


def causal_lm_head(params: CausalLMParams, ctx) -> CausalLMHead:
    return CausalLMHead(ctx.token_embedding, params.tie_word_embeddings, ctx.decoder.init_std, ctx.linear_factory)


def sequence_classification_head(params: SequenceClassificationParams, ctx) -> SequenceClassificationHead:
    return SequenceClassificationHead(ctx.decoder.embed_dim, params.num_labels, params.problem_type,
                                      ctx.spec.tokens.pad_token_id, ctx.decoder.init_std)


def question_answering_head(params, ctx) -> QuestionAnsweringHead:
    return QuestionAnsweringHead(ctx.decoder.embed_dim, ctx.decoder.init_std)
