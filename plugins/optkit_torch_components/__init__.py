"""optkit's first-party torch components: embeddings, norms, MLPs, linear, caches, blocks, heads.

Registered through the ``optkit`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

import optkit
from optkit.formats.opt import OPT
from optkit.registration import Capabilities

from . import blocks, caches, embeddings, heads, layers

OPTKIT_PLUGIN_API = 1
GRAPH_SAFE = Capabilities(cuda_graphs=True)  # no host syncs: decode steps can be CUDA-graph captured


@optkit.hookimpl
def optkit_register(registry) -> None:
    registry.register("token_embedding", "learned", embeddings.token_embedding,
                      capabilities=GRAPH_SAFE, description="lookup table (OPT); tied LM heads reuse its weight")
    registry.register("positional_embedding", "learned", embeddings.learned_positions,
                      params=embeddings.LearnedPositionParams,
                      capabilities=GRAPH_SAFE, description="learned absolute positions with OPT's offset of 2")
    registry.register("norm", "layernorm", layers.layernorm, params=layers.LayerNormParams,
                      capabilities=GRAPH_SAFE, description="torch LayerNorm")
    registry.register("mlp", "ffn", layers.feed_forward, params=layers.FeedForwardParams,
                      capabilities=GRAPH_SAFE, description="fc2(act(fc1(x)))")
    registry.register("linear", "torch", layers.torch_linear, capabilities=GRAPH_SAFE, description="torch.nn.Linear")
    registry.register("kv_cache", "dynamic", caches.dynamic_cache, description="grows by concatenation")
    registry.register("kv_cache", "static", caches.static_cache, params=caches.StaticCacheParams,
                      capabilities=GRAPH_SAFE, description="preallocated, updated in place (for CUDA graphs)")
    registry.register_format(OPT)  # transformers' OPT config.json and key names
    registry.register("block", "sequential", blocks.sequential_block, capabilities=GRAPH_SAFE,
                      description="OPT's layer: attention then MLP, residuals, norms before or after")
    registry.register("head", "base", heads.base_head, capabilities=GRAPH_SAFE, description="final hidden states")
    registry.register("head", "causal_lm", heads.causal_lm_head, params=heads.CausalLMParams,
                      capabilities=GRAPH_SAFE, description="next-token logits, tied to the token embedding")
    registry.register("head", "sequence_classification", heads.sequence_classification_head,
                      params=heads.SequenceClassificationParams,
                      capabilities=GRAPH_SAFE, description="pools the rightmost non-pad token")
    registry.register("head", "question_answering", heads.question_answering_head,
                      capabilities=GRAPH_SAFE, description="start/end logits per position")
