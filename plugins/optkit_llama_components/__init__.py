"""LLaMA-family components: RMSNorm, rotary positions, the gated MLP and the stable embedding.

A second model family (Open-Llama) is these registrations plus YAML; the builder and the
module tree are the ones OPT uses. Registered through the ``optkit`` entry-point group.
"""

from __future__ import annotations

import optkit
from optkit.formats.open_llama import OPEN_LLAMA
from optkit.registration import Capabilities

from . import embeddings, mlp, norms, rotary

OPTKIT_PLUGIN_API = 1
GRAPH_SAFE = Capabilities(cuda_graphs=True)  # no host syncs: decode steps can be CUDA-graph captured


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register_format(OPEN_LLAMA)  # transformers' Open-Llama config.json and key names
    registry.register("norm", "rmsnorm", norms.rmsnorm, params=norms.RMSNormParams,
                      capabilities=GRAPH_SAFE,
                      description="RMSNorm in fp32, cast back before the weight (LLaMA, Open-Llama)")
    registry.register("positional_embedding", "rotary", rotary.rotary, params=rotary.RotaryParams,
                      capabilities=GRAPH_SAFE,  # dynamic NTK reads lengths on the host: its capture fails, loop used
                      description="rotary q/k (half-split), scaling none | linear | dynamic NTK")
    registry.register("mlp", "gated", mlp.gated_mlp, params=mlp.GatedMLPParams,
                      capabilities=GRAPH_SAFE, description="down_proj(act(gate_proj(x)) * up_proj(x))")
    registry.register("token_embedding", "stable", embeddings.stable_embedding,
                      params=embeddings.StableEmbeddingParams,
                      capabilities=GRAPH_SAFE,
                      description="lookup table + LayerNorm (Open-Llama V1); tied LM heads reuse its table")
