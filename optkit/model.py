"""The module tree optkit owns: attention block, decoder layer, decoder, model.

Components (embeddings, norms, MLPs, projections, kernels, heads) are received ready-made
from the builder; this file only wires them, so it reads like transformers' OPT and
never changes when a backend is swapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from optkit.context import BuildContext
from optkit.errors import InputError
from optkit.interfaces import (
    AttentionKernel,
    AttentionMask,
    DecoderBlock,
    Head,
    HeadInputs,
    KVCache,
    KVCacheFactory,
    Placement,
    PositionalEmbedding,
    ShardStyle,
    TokenEmbedding,
)
from optkit.generation_config import GenerationConfig
from optkit.outputs import ConfigView, ModelOutput
from optkit.spec import AUTO, ComponentRef, ModelSpec

if TYPE_CHECKING:
    from optkit import Registry
    from optkit.inference.session import InferenceSession


class Attention(nn.Module):
    """Multi-head self-attention: owns q/k/v/out projections, delegates the kernel.

    This is the reference: three projections, q scaled as the spec says, then the kernel.
    ``optkit.inference.prepare`` swaps in a subclass that computes the same thing faster
    (``project`` and ``scale_query`` are the two steps it overrides).
    """

    def __init__(self, *, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, out_proj: nn.Module,
                 kernel: AttentionKernel, num_heads: int, head_dim: int, query_scaling: str, dropout: float):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.kernel = kernel
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scaling = head_dim**-0.5
        self.query_scaling = query_scaling
        self.dropout = dropout

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Megatron's split: whole heads per rank for q/k/v, partial sums through out_proj."""
        return {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "out_proj": "rowwise"}

    def shard_local(self, tp_size: int) -> None:
        if self.num_heads % tp_size:
            raise InputError(f"{self.num_heads} attention heads cannot be split evenly over {tp_size} ranks")
        self.num_heads //= tp_size

    def scale_query(self, query: Tensor) -> tuple[Tensor, float]:
        """The query and the scale the kernel applies to the scores.

        OPT (``query_scaling: projection``) scales q right after q_proj, bias included, and the
        kernel gets 1.0; ``query_scaling: scores`` leaves the whole scale to the kernel.
        """
        if self.query_scaling == "projection":
            return query * self.scaling, 1.0
        return query, self.scaling

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, *, mask: AttentionMask, positional: PositionalEmbedding, position_ids: Tensor,
                cache: KVCache | None, layer_idx: int, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        batch, length, _ = x.shape
        query, key, value = self.project(x)
        query, kernel_scale = self.scale_query(query)
        query, key, value = self._heads(query), self._heads(key), self._heads(value)
        query, key = positional.rotate(query, key, position_ids)
        if cache is not None:
            key, value = cache.update(layer_idx, key, value)
        output, weights = self.kernel(query, key, value, mask, scale=kernel_scale,
                                      dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights)
        output = output.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out_proj(output), weights


class DecoderLayer(DecoderBlock):
    """OPT's block: attention + MLP with residuals; norms before (pre-LN) or after (post-LN, opt-350m)."""

    placement_unit = True  # its forward needs every weight of the layer on one device
    offloadable = True  # ... which may be streamed in from CPU or disk just before it runs

    def __init__(self, *, self_attn: Attention, self_attn_layer_norm: nn.Module, mlp: nn.Module,
                 final_layer_norm: nn.Module, norm_position: str, dropout: float):
        super().__init__()
        self.self_attn = self_attn
        self.self_attn_layer_norm = self_attn_layer_norm
        self.mlp = mlp
        self.final_layer_norm = final_layer_norm
        self.pre_norm = norm_position == "pre"
        self.dropout = dropout

    @property
    def kv_heads(self) -> int:
        return self.self_attn.num_heads

    def forward(self, x: Tensor, **attention_args: Any) -> tuple[Tensor, Tensor | None]:
        residual = x
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        h, weights = self.self_attn(h, **attention_args)
        x = residual + F.dropout(h, p=self.dropout, training=self.training)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        residual = x
        h = self.final_layer_norm(x) if self.pre_norm else x
        h = self.mlp(h)
        x = residual + F.dropout(h, p=self.dropout, training=self.training)
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x, weights


def position_ids_from_mask(attention_mask: Tensor, past_length: int) -> Tensor:
    """0-based positions of real tokens, -1 at padding (transformers' OPT formula)."""
    mask = attention_mask.long()
    return (torch.cumsum(mask, dim=1) * mask - 1)[:, past_length:]


class Decoder(nn.Module):
    """Embeddings -> layers -> final norm/projection."""

    def __init__(self, *, embed_tokens: TokenEmbedding, embed_positions: PositionalEmbedding,
                 layers: list[DecoderBlock], project_in: nn.Module | None, project_out: nn.Module | None,
                 final_layer_norm: nn.Module | None, max_positions: int, layerdrop: float):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.project_in = project_in
        self.embed_positions = embed_positions
        self.layers = nn.ModuleList(layers)
        self.final_layer_norm = final_layer_norm
        self.project_out = project_out
        self.max_positions = max_positions
        self.layerdrop = layerdrop
        self.gradient_checkpointing = False  # recompute each layer in backward to save memory

    def tp_plan(self) -> dict[str, ShardStyle]:
        """opt-350m's small projections stay whole on every rank (the components declare their own plans)."""
        kept: dict[str, ShardStyle] = {}
        if self.project_in is not None:
            kept["project_in"] = "replicate"
        if self.project_out is not None:
            kept["project_out"] = "replicate"
        return kept

    def shard_local(self, tp_size: int) -> None:
        """Nothing to adjust: the decoder's own sizes do not change."""

    def forward(self, *, input_ids: Tensor | None, inputs_embeds: Tensor | None, attention_mask: Tensor | None,
                position_ids: Tensor | None, cache: KVCache | None, output_hidden_states: bool,
                output_attentions: bool, mask: AttentionMask | None = None,
                ) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple[Tensor, ...] | None]:
        """Final hidden states (+ per-layer states and attention weights when asked).

        ``mask``: a ready :class:`AttentionMask` instead of one derived from ``attention_mask`` and the
        cache (the CUDA-graph decode step keeps its mask in device buffers and passes it here).
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else self.embed_tokens.embed_inputs(inputs_embeds)
        batch, length = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if self.project_in is not None:
            x = self.project_in(x)
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + length):
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new tokens) "
                f"= ({batch}, {past + length}); with a cache, pass the mask of the whole sequence so far"
            )
        if position_ids is None:
            position_ids = self._positions(attention_mask, batch, length, past, x.device)
        additive = self.embed_positions.additive(position_ids)
        if additive is not None:
            x = x + additive.to(x.dtype)
        if mask is None:
            mask = self._mask(attention_mask, batch, length, past, cache)

        hidden_states: list[Tensor] = []
        attentions: list[Tensor] = []
        for layer_idx, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            args = dict(mask=mask, positional=self.embed_positions, position_ids=position_ids, cache=cache,
                        layer_idx=layer_idx, need_weights=output_attentions)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                if cache is not None:
                    raise InputError("gradient checkpointing recomputes layers and cannot fill a KV cache; "
                                     "pass use_cache=False when training")
                x, weights = checkpoint(layer, x, use_reentrant=False, **args)
            else:
                x, weights = layer(x, **args)
            if output_attentions:
                attentions.append(weights)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if output_hidden_states:
            hidden_states.append(x)  # each layer's input, then the final output, as in transformers
        return (x, tuple(hidden_states) if output_hidden_states else None,
                tuple(attentions) if output_attentions else None)

    def _positions(self, attention_mask: Tensor | None, batch: int, length: int, past: int,
                   device: torch.device) -> Tensor:
        if attention_mask is None:
            positions = torch.arange(past, past + length, device=device).expand(batch, length)
        else:
            positions = position_ids_from_mask(attention_mask, past)
        if past + length > self.max_positions and int(positions.max()) >= self.max_positions:
            raise InputError(
                f"sequence of {past + length} tokens exceeds the model's maximum of {self.max_positions} "
                "positions; shorten the input (or the generation length)"
            )
        return positions

    def _mask(self, attention_mask: Tensor | None, batch: int, length: int, past: int,
              cache: KVCache | None) -> AttentionMask:
        if cache is not None and cache.max_length is not None and past + length > cache.max_length:
            raise InputError(f"the KV cache holds {cache.max_length} tokens; {past} stored + {length} new do not fit "
                             "(create it with a larger max_length)")
        kv_len = cache.attended_length(length) if cache is not None else length
        key_padding = None
        if attention_mask is not None:
            key_padding = attention_mask.bool()
            if bool(key_padding.all()):
                key_padding = None
            elif kv_len > past + length:  # static cache: slots not yet written are never attended
                key_padding = F.pad(key_padding, (0, kv_len - past - length), value=False)
        return AttentionMask(batch_size=batch, q_len=length, kv_len=kv_len, q_offset=past, key_padding=key_padding)


class Model(nn.Module):
    """An optkit model: decoder + head, called with transformers' keyword arguments."""

    def __init__(self, *, decoder: Decoder, head: Head, spec: ModelSpec, registry: Registry):
        super().__init__()
        self.decoder = decoder
        self.head = head
        self.spec = spec
        # The registry that built this model: caches, backend swaps and fresh heads come from it,
        # never silently from the global plugins.
        self.registry = registry
        # Graphs and compiled steps that generate() reuses; set by optkit.inference.prepare, dropped
        # by optkit.inference.restore (or by assigning None).
        self.inference_session: InferenceSession | None = None
        # Where each unit lives when optkit.placement.dispatch spread the model over devices / offloaded it.
        self.placement: Placement | None = None

    # -- inputs -----------------------------------------------------------------------------
    def _check(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, check_ids: bool) -> None:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise InputError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
            if check_ids and input_ids.numel():
                low, high = int(input_ids.min()), int(input_ids.max())
                vocab = self.spec.decoder.vocab_size
                if low < 0 or high >= vocab:
                    bad = low if low < 0 else high
                    raise InputError(f"token id {bad} is out of range for this model's vocabulary of {vocab} "
                                     f"(valid ids: 0..{vocab - 1}); was the text encoded with another tokenizer?")
        else:
            width = self.decoder.embed_tokens.embedding_dim
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
                raise InputError(f"inputs_embeds must be (batch, length, {width}), got {tuple(inputs_embeds.shape)}")
            table = getattr(self.decoder.embed_tokens, "weight", None)
            expected = table.dtype if isinstance(table, Tensor) else inputs_embeds.dtype
            mixed = inputs_embeds.dtype != expected and not torch.is_autocast_enabled(inputs_embeds.device.type)
            if not inputs_embeds.is_floating_point() or (expected.is_floating_point and mixed):
                raise InputError(f"inputs_embeds are {inputs_embeds.dtype} but the model computes in {expected}; "
                                 f"pass inputs_embeds.to({expected}) (or run under torch.autocast)")

    def _check_position_shape(self, position_ids: Tensor, inputs: Tensor) -> None:
        """position_ids of the wrong shape or dtype fail here by name, not as a broadcast or embedding error."""
        batch, length = inputs.shape[:2]
        if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
            raise InputError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        fits = position_ids.dim() == 1 or (position_ids.dim() == 2 and position_ids.shape[0] in (1, batch))
        if not fits or position_ids.shape[-1] != length:
            raise InputError(f"position_ids have shape {tuple(position_ids.shape)}, expected ({batch}, {length}) "
                             f"(or ({length},) / (1, {length}) for every row): one position per input token")

    def _check_positions(self, position_ids: Tensor) -> None:
        """Positions a lookup table cannot hold fail here, with the fix, not as an IndexError deep inside."""
        valid = self.decoder.embed_positions.position_range
        if valid is None or not position_ids.numel():
            return
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < valid[0] or high > valid[1]:
            bad = low if low < valid[0] else high
            raise InputError(f"position_ids contain {bad}, outside this model's positions {valid[0]}..{valid[1]} "
                             f"(-1 marks padding); shorten the input or pass position_ids below "
                             f"{self.decoder.max_positions}")

    def _check_attention_weights(self) -> None:
        name, registry = self.spec.decoder.attention.name, self.registry
        if ("attention", name) in registry and not registry.get("attention", name).capabilities.attention_weights:
            able = [r.name for r in registry.registrations("attention") if r.capabilities.attention_weights]
            raise InputError(f"attention backend '{name}' cannot return attention weights; "
                             f"switch with optkit.set_backend(model, attention='{able[0] if able else 'eager'}')")

    def _check_attention_capabilities(self, attention_mask: Tensor | None, cached: bool) -> None:
        """What this call asks of the attention kernel (padding, a KV cache, gradients, dropout) must be among
        the capabilities its registration declares; otherwise one error now, not wrong numbers later."""
        name = self.spec.decoder.attention.name
        if ("attention", name) not in self.registry:
            return  # a kernel installed by hand (not through the registry) answers for itself
        caps = self.registry.get("attention", name).capabilities
        needs: dict[str, str] = {}
        if not caps.kv_cache and cached:
            needs["kv_cache"] = "this call needs: it uses a KV cache (past_key_values / use_cache=True)"
        if not caps.padding and attention_mask is not None and not bool(attention_mask.all()):
            needs["padding"] = "this call needs: its attention_mask has padded positions"
        if self.training and torch.is_grad_enabled():
            if not caps.backward:
                needs["backward"] = "training needs: the model is in training mode with gradients on"
            if not caps.dropout and self.spec.decoder.attention_dropout > 0:
                needs["dropout"] = f"training needs: decoder.attention_dropout={self.spec.decoder.attention_dropout}"
        if needs:
            self.registry.require_capabilities("attention", name, needs)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute every layer during backward instead of storing its activations."""
        self.decoder.gradient_checkpointing = enabled

    def new_cache(self, batch_size: int, max_length: int | None = None, kind: str | None = None,
                  **params: Any) -> KVCache:
        """A fresh KV cache from the spec's kv_cache component (or ``kind``), from this model's registry."""
        d = self.spec.decoder
        ref = ComponentRef(name=kind, params=params) if kind else d.kv_cache
        if ref.name == AUTO:
            ref = ComponentRef(name=self.registry.select_auto("kv_cache", self.device, self.dtype).name)
        ctx = BuildContext(spec=self.spec, registry=self.registry, device=self.device, dtype=self.dtype)
        factory: KVCacheFactory = ctx.create("kv_cache", ref)
        heads = self.decoder.layers[0].kv_heads if len(self.decoder.layers) else d.num_heads
        where: dict[str, Any] = {}
        if self.placement is not None:  # a dispatched model: each layer's cache where that layer computes
            where["layer_devices"] = [self.placement.compute_devices.get(f"decoder.layers.{i}", self.device)
                                      for i in range(d.num_layers)]
        return factory(batch_size=batch_size, max_length=max_length, max_positions=d.max_positions,
                       num_layers=d.num_layers, num_heads=heads, head_dim=d.head_dim, dtype=self.dtype,
                       device=self.device, **where)

    def forward(self, input_ids: Tensor | None = None, *, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool | None = None, labels: Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False, logits_to_keep: int | Tensor = 0,
                start_positions: Tensor | None = None, end_positions: Tensor | None = None,
                check_inputs: bool = True, return_dict: bool | None = None) -> ModelOutput | tuple[Any, ...]:
        """transformers' keywords; ``check_inputs=False`` skips the id/position range checks (each costs a
        host synchronisation) for ids the caller has already checked, e.g. generate's own new tokens.
        ``return_dict=False``: transformers' tuple, the output's set fields in order (``ModelOutput.to_tuple``)."""
        self._check(input_ids, inputs_embeds, check_inputs)
        if position_ids is not None:
            self._check_position_shape(position_ids, input_ids if input_ids is not None else inputs_embeds)
            position_ids = position_ids if position_ids.dim() == 2 else position_ids[None]  # rotary needs rows
        if position_ids is not None and check_inputs:
            self._check_positions(position_ids)
        if output_attentions:
            self._check_attention_weights()
        self._check_attention_capabilities(attention_mask, past_key_values is not None or bool(use_cache))
        cache = past_key_values
        if cache is None and use_cache:
            ref = input_ids if input_ids is not None else inputs_embeds
            cache = self.new_cache(ref.shape[0])
        hidden, all_hidden, attentions = self.decoder(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions)
        head_out = self.head(hidden, HeadInputs(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                                start_positions=start_positions, end_positions=end_positions,
                                                logits_to_keep=logits_to_keep))
        output = ModelOutput(past_key_values=cache if (use_cache or past_key_values is not None) else None,
                             hidden_states=all_hidden, attentions=attentions, **head_out)
        return output.to_tuple() if return_dict is False else output

    def generate(self, input_ids: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Prompt + new tokens, like transformers' ``generate`` (see optkit.generation). The prompt may also come
        as ``inputs=``, the name of transformers' first parameter, so code written for it runs unchanged."""
        from optkit.generation import generate

        if "inputs" in kwargs:
            if input_ids is not None:
                raise InputError("generate(): the prompt came twice, as input_ids and as inputs; pass one")
            input_ids = kwargs.pop("inputs")
        if input_ids is None:
            raise InputError("generate(): no prompt; pass input_ids, a (batch, length) tensor of token ids")
        return generate(self, input_ids, **kwargs)

    # -- weights ----------------------------------------------------------------------------
    def tie_weights(self) -> None:
        self.head.tie_weights(self.decoder.embed_tokens)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write config.json + model.safetensors that transformers loads, or optkit's own format when transformers has
        no equivalent of this model (``format="auto"|"transformers"|"optkit"``; see optkit.checkpoints)."""
        from optkit.checkpoints import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    @property
    def attention_backend(self) -> str:
        return next(kernel.name for _, kernel in self.attention_kernels())

    def attention_kernels(self) -> list[tuple[str, AttentionKernel]]:
        """Every attention kernel in the tree, by module name (``set_backend`` replaces these)."""
        return [(name, module) for name, module in self.named_modules() if isinstance(module, AttentionKernel)]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first weight's device, or the dispatched model's input device."""
        if self.placement is not None:
            return self.placement.input_device
        return next(self.parameters()).device

    @property
    def device_map(self) -> dict[str, Any] | None:
        """{placement unit: device} of a dispatched model (None: everything where its weights are)."""
        return None if self.placement is None else self.placement.device_map

    # -- transformers-style views: config, generation_config, num_parameters ------------------
    @property
    def config(self) -> ConfigView:
        """transformers' ``model.config`` as a read-only view of the spec (``hidden_size``, ``num_hidden_layers``,
        ``vocab_size``, ``model_type`` ...: the fields of the config.json ``save_pretrained`` writes)."""
        from optkit.checkpoints import hf_config_from_spec

        return ConfigView(hf_config_from_spec(self.spec, self.dtype))

    @property
    def generation_config(self) -> GenerationConfig:
        """The defaults of ``generate``, pipelines and ``optkit run`` (the checkpoint's generation_config.json);
        assign a new :class:`GenerationConfig` to change them (``save_pretrained`` writes its explicit settings)."""
        return self.__dict__.get("_generation_config") or GenerationConfig()

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        if not isinstance(value, GenerationConfig):
            raise InputError(f"model.generation_config: expected an optkit.GenerationConfig, got "
                             f"{type(value).__name__}; use GenerationConfig(**settings)")
        self.__dict__["_generation_config"] = value

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters as transformers counts them: each tensor once (tied weights too)."""
        embedding_modules = (self.decoder.embed_tokens, self.decoder.embed_positions)
        embeddings = {id(p) for m in embedding_modules for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if (p.requires_grad or not only_trainable)
                   and not (exclude_embeddings and id(p) in embeddings))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- adapters: PEFT's method names, delegating to optkit.adapters (see docs/adapters.md) ----------
    def add_adapter(self, name: str = "default", **options: Any) -> Model:
        """A fresh LoRA adapter ``name`` (``r``, ``alpha``, ``dropout``, ``target_modules``, ``use_rslora``);
        only adapter parameters train afterwards. ``alpha`` defaults to PEFT's ``LoraConfig`` default, 8."""
        from optkit.adapters import add_adapters_from_options

        return add_adapters_from_options(self, {**options, "name": name})

    def load_adapter(self, directory: str | Path, name: str = "default", *, trainable: bool = False) -> Model:
        """The adapter PEFT (or ``save_adapter``) wrote in ``directory``, as adapter ``name``."""
        from optkit.adapters import load_adapters

        return load_adapters(self, directory, name=name, trainable=trainable)

    def set_adapter(self, name: str | None) -> None:
        """Run adapter ``name`` from now on (None: the base model alone)."""
        from optkit.adapters import set_adapter

        set_adapter(self, name)

    def merge_adapters(self) -> None:
        """Fold the active adapter into the base weights (refused, with the reason, for a quantized base)."""
        from optkit.adapters import merge_adapters

        merge_adapters(self)

    def unmerge_adapters(self) -> None:
        """Take a merged adapter out of the base weights again."""
        from optkit.adapters import unmerge_adapters

        unmerge_adapters(self)

    def save_adapter(self, directory: str | Path, names: list[str] | None = None) -> Path:
        """PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` for each adapter (default: all)."""
        from optkit.adapters import save_adapters

        return save_adapters(self, directory, names=names)
