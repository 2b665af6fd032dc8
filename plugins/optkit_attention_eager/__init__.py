"""The eager attention backend: the reference definition every other backend must match.

softmax in fp32 over ``scale * q k^T`` with masked scores at ``finfo(dtype).min`` (as
transformers' eager OPT), dropout on the probabilities, and zero output for query
rows that may attend to nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import optkit
from optkit.interfaces import AttentionKernel, AttentionMask, AttentionResult, is_power_of_two
from optkit.registration import Capabilities

OPTKIT_PLUGIN_API = 1


class EagerAttention(AttentionKernel):
    name = "eager"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *, scale: float,
                dropout_p: float = 0.0, need_weights: bool = False) -> AttentionResult:
        if scale != 1.0 and is_power_of_two(scale):
            # A power of two: scaling q first is exact, and keeps fp16 scores in the range transformers' OPT
            # (which scales q after its projection) keeps them in.
            query, scale = query * scale, 1.0
        scores = torch.matmul(query, key.transpose(-1, -2))
        if scale != 1.0:
            scores = scores * scale
        allowed = mask.allowed(scores.device)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        if mask.has_empty_rows:
            probs = probs.masked_fill(~mask.query_has_keys.to(probs.device), 0.0)
        probs = probs.to(query.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        return AttentionResult(torch.matmul(probs, value), probs if need_weights else None)


def eager(params, ctx) -> EagerAttention:
    return EagerAttention()


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register("attention", "eager", eager, capabilities=Capabilities(attention_weights=True, cuda_graphs=True),
                      description="reference: explicit softmax(q k^T) v in fp32; returns attention weights")
