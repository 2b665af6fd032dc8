"""LLaMA-family components: RMSNorm, rotary positions, the gated MLP and the stable embedding.

A second model family (Open-Llama) is these registrations plus YAML; the builder and the
module tree are the ones OPT uses. Registered through the ``optkit`` entry-point group.
"""

from __future__ import annotations

import optkit

from . import embeddings, mlp, norms, rotary

OPTKIT_PLUGIN_API = 1


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register("norm", "rmsnorm", norms.rmsnorm, params=norms.RMSNormParams,
                      description="RMSNorm in fp32, cast back before the weight (LLaMA, Open-Llama)")
    registry.register("positional_embedding", "rotary", rotary.rotary, params=rotary.RotaryParams,
                      description="rotary q/k (half-split), scaling none | linear | dynamic NTK")
    registry.register("mlp", "gated", mlp.gated_mlp, params=mlp.GatedMLPParams,
                      description="down_proj(act(gate_proj(x)) * up_proj(x))")
    registry.register("token_embedding", "stable", embeddings.stable_embedding,
                      params=embeddings.StableEmbeddingParams,
                      description="lookup table + LayerNorm (Open-Llama V1); tied LM heads reuse its table")
