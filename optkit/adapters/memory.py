"""How much memory fine-tuning a model takes, per method: the numbers behind docs/fine-tuning.md's table.

Counted from the model itself (built on "meta", so nothing is allocated): every parameter, the projections
the linear component stores (q/k/v/out, fc1/fc2 and project_in/out: what int8 / nf4 quantize), and the
adapter's parameters for the chosen targets and rank. Per method, in bytes:

* ``full``: fp32 weights (4 B/param) + fp32 gradients (4) + AdamW's two fp32 moments (8) = 16 B/param.
* ``lora``: a frozen 16-bit base (2 B/param) + adapters trained in fp32 (4 + 4 + 8 = 16 B per adapter param).
* ``int8+lora``: the projections in int8 (1 B/weight + one fp32 scale per output row), everything else
  (embeddings, norms, biases) 16-bit; adapters as above.
* ``nf4+lora``: the projections in 4 bits (0.5 B/weight) + one fp32 absmax per 64-weight block (with
  ``double_quant``: one byte per block + one fp32 per 256 blocks); everything else 16-bit; adapters as above.

Activations are not counted: they depend on batch size and sequence length, not on the method (gradient
checkpointing shrinks them for all four alike). Neither are the CUDA context and allocator slack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optkit.adapters.attach import ALL_LINEAR, DEFAULT_TARGETS, layer_linears, resolve_targets
from optkit.adapters.lora import DEFAULT_ALPHA, check_settings
from optkit.errors import InputError

METHODS = ("full", "lora", "int8+lora", "nf4+lora")
BLOCKSIZE = 64  # weights per 4-bit absmax block (bitsandbytes' default)
DOUBLE_QUANT_GROUP = 256  # absmax values per second-level fp32 scale with double quantization
ADAPTER_BYTES = 4 + 4 + 8  # fp32 adapter weight, its gradient, AdamW's two moments


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes for one method: the frozen or trained weights, their gradients and optimizer states, the adapter."""

    method: str
    weights: int
    gradients: int
    optimizer: int
    adapter: int  # adapter weights + their gradients + their AdamW moments (0 for full fine-tuning)
    adapter_parameters: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.adapter


@dataclass(frozen=True)
class ModelCounts:
    """What the estimate needs to know about a model."""

    parameters: int  # every parameter once (a tied head counts once)
    projection_weights: int  # weights of the projections a linear component stores
    projection_rows: int  # their output rows (int8 keeps one scale per row)
    adapter_parameters: int  # r * (in + out) summed over the targeted projections


def count(spec: Any, *, r: int = 8, target_modules: str | Sequence[str] = DEFAULT_TARGETS) -> ModelCounts:
    """Build ``spec`` (a ModelSpec, preset or YAML path) on "meta" and count what the estimate needs."""
    from optkit.builder import build

    problems = check_settings(r, DEFAULT_ALPHA, 0.0, False)  # only r varies here; a bad one gave negative counts
    if problems:
        raise InputError(f"memory estimate: {problems[0]}")
    model = build(spec, device="meta")
    projections = layer_linears(model)  # project_in/project_out included, where the model has them
    targets = resolve_targets(model, target_modules)
    sizes = {path: (module.in_features, module.out_features) for path, module in projections.items()}
    return ModelCounts(parameters=model.num_parameters(),
                       projection_weights=sum(i * o for i, o in sizes.values()),
                       projection_rows=sum(o for _, o in sizes.values()),
                       adapter_parameters=sum(r * (sizes[p][0] + sizes[p][1]) for p in targets))


def estimate(counts: ModelCounts, method: str, *, double_quant: bool = False) -> MemoryEstimate:
    """Bytes of ``method`` (one of METHODS) for a model with ``counts`` (see the module doc for the rules)."""
    if method not in METHODS:
        raise InputError(f"unknown fine-tuning method {method!r:.60}; choose one of {', '.join(METHODS)}")
    if method == "full":
        n = counts.parameters
        return MemoryEstimate(method, weights=4 * n, gradients=4 * n, optimizer=8 * n, adapter=0, adapter_parameters=0)
    others = counts.parameters - counts.projection_weights  # embeddings, norms, biases: 16-bit in every LoRA method
    w = counts.projection_weights
    if method == "lora":
        weights = 2 * counts.parameters
    elif method == "int8+lora":
        weights = 2 * others + w + 4 * counts.projection_rows
    else:
        blocks = -(-w // BLOCKSIZE)
        scales = blocks + 4 * -(-blocks // DOUBLE_QUANT_GROUP) if double_quant else 4 * blocks
        weights = 2 * others + -(-w // 2) + scales
    return MemoryEstimate(method, weights=weights, gradients=0, optimizer=0,
                          adapter=ADAPTER_BYTES * counts.adapter_parameters,
                          adapter_parameters=counts.adapter_parameters)


def memory_table(presets: Sequence[str], *, r: int = 8, target_modules: str | Sequence[str] = DEFAULT_TARGETS,
                 double_quant: bool = False) -> str:
    """A markdown table: one row per preset, GB (10^9 bytes) per method, and the adapter's parameter count."""
    targets = ALL_LINEAR if target_modules == ALL_LINEAR else ",".join(target_modules)
    lines = [f"| preset | parameters | {' | '.join(METHODS)} | adapter parameters (r={r}, {targets}) |",
             "|---" * (len(METHODS) + 3) + "|"]
    for preset in presets:
        counts = count(preset, r=r, target_modules=target_modules)
        cells = [f"{estimate(counts, m, double_quant=double_quant).total / 1e9:,.2f}" for m in METHODS]
        lines.append(f"| {preset} | {counts.parameters / 1e6:,.1f} M | {' | '.join(cells)} | "
                     f"{counts.adapter_parameters / 1e6:,.2f} M |")
    return "\n".join(lines)
