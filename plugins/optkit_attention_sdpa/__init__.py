"""torch.nn.functional.scaled_dot_product_attention as an optkit backend.

The mask goes in as a boolean tensor; rows that may attend to nothing are unmasked
for the kernel (so no kernel ever sees a fully masked row and returns NaN) and then
zeroed, which is the contract every backend shares.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

import optkit
from optkit.interfaces import AttentionKernel, AttentionMask, AttentionResult
from optkit.registration import Capabilities

OPTKIT_PLUGIN_API = 1


class SDPAttention(AttentionKernel):
    name = "sdpa"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask, *, scale: float,
                dropout_p: float = 0.0, need_weights: bool = False) -> AttentionResult:
        if need_weights:
            raise NotImplementedError("sdpa cannot return attention weights; use attention='eager'")
        if mask.is_plain_causal:
            return AttentionResult(F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout_p, is_causal=True, scale=scale), None)
        if mask.sees_every_key:
            return AttentionResult(F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout_p, scale=scale), None)
        allowed = mask.allowed(query.device)
        if not mask.has_empty_rows:
            # CUDA converts a boolean mask to an additive one in every call (three kernels per layer);
            # the additive form is made once per mask. Same numbers: masked scores vanish in both.
            attn_mask = mask.additive(query.dtype) if query.is_cuda and mask.device == query.device else allowed
            return AttentionResult(F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale), None)
        has_keys = mask.query_has_keys.to(query.device)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed | ~has_keys,
                                                dropout_p=dropout_p, scale=scale)
        return AttentionResult(output.masked_fill(~has_keys, 0.0), None)


def sdpa(params, ctx) -> SDPAttention:
    return SDPAttention()


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register("attention", "sdpa", sdpa, capabilities=Capabilities(attention_weights=False, cuda_graphs=True),
                      description="torch.nn.functional.scaled_dot_product_attention")
