"""The tensor-parallel plan of a model, asked of its components (no process group needed).

Every module that implements :class:`optkit.interfaces.TensorParallel` says how its sub-modules split;
this module gathers those declarations into one ``{module path: style}`` table, and checks -- before
anything is changed -- that every weight is covered, that each split module can be split by the
parallel styles, and that ``tp_size`` divides every split dimension and the attention heads.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field

from torch import nn

from optkit.errors import InputError, brief_repr, shorten
from optkit.interfaces import (
    MLP,
    AttentionKernel,
    DecoderBlock,
    Head,
    Norm,
    PositionalEmbedding,
    ShardStyle,
    TensorParallel,
    TokenEmbedding,
)
from optkit.model import Attention, Model

STYLES: tuple[str, ...] = typing.get_args(ShardStyle)
COMPONENT_TYPES = (TokenEmbedding, PositionalEmbedding, DecoderBlock, Attention, MLP, Norm, Head, AttentionKernel)

@dataclass
class TensorParallelPlan:
    """What :func:`optkit.parallel.parallelize` will do: styles per module path, and who declared them."""

    tp_size: int
    styles: dict[str, ShardStyle] = field(default_factory=dict)
    declared_by: dict[str, str] = field(default_factory=dict)  # module path -> declaring module path
    components: list[str] = field(default_factory=list)  # paths of modules whose shard_local runs afterwards

    def covering(self, module_path: str) -> str | None:
        """The planned path that covers ``module_path`` (itself or its nearest planned ancestor)."""
        path = module_path
        while True:
            if path in self.styles:
                return path
            if not path:
                return None
            path = path.rpartition(".")[0]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _declared_plan(module: nn.Module) -> dict[str, ShardStyle] | None:
    if isinstance(module, TensorParallel):
        return dict(module.tp_plan())
    return None


def collect_plan(model: Model, tp_size: int) -> TensorParallelPlan:
    """Gather every component's declaration; the outermost declaration covering a module wins."""
    plan = TensorParallelPlan(tp_size=tp_size)
    for path, module in model.named_modules():
        declared = _declared_plan(module)
        if declared is None:
            continue
        if isinstance(module, TensorParallel):
            plan.components.append(path)
        if plan.covering(path) is not None:
            continue  # inside a module an outer declaration already splits (or keeps) as a whole
        for sub, style in declared.items():
            _check_entry(module, path, sub, style)
            target = _join(path, sub)
            if plan.covering(target) is None:
                plan.styles[target] = style
                plan.declared_by[target] = path
    return plan


def _check_entry(module: nn.Module, path: str, sub: str, style: object) -> None:
    where = f"{type(module).__name__} at '{path or '<model>'}'"
    if style not in STYLES:
        raise InputError(f"{where} declares tensor-parallel style {brief_repr(style)} for '{shorten(sub)}'; "
                         f"tp_plan() values must be one of {', '.join(STYLES)}")
    try:
        module.get_submodule(sub)
    except AttributeError:
        raise InputError(f"{where} declares a tensor-parallel plan for '{shorten(sub)}', which is not one of its "
                         f"sub-modules; tp_plan() keys are sub-module names relative to the component "
                         f"(\"\" for the component itself)") from None


def owning_component(model: Model, module_path: str) -> str:
    """The innermost component (embedding, block, attention, MLP, norm, head...) around a module."""
    path = module_path
    while path:
        if isinstance(model.get_submodule(path), COMPONENT_TYPES):
            return path
        path = path.rpartition(".")[0]
    return module_path


def check_coverage(model: Model, plan: TensorParallelPlan) -> None:
    """Every parameter lies in some planned module: otherwise one error naming the components."""
    unplanned: dict[str, list[str]] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        module_path, _, leaf = name.rpartition(".")
        if plan.covering(module_path) is None:
            owner = owning_component(model, module_path)
            unplanned.setdefault(owner, []).append(name[len(owner) + 1:] if owner else name)
    if not unplanned:
        return
    by_type: dict[str, list[str]] = {}
    for path in unplanned:
        by_type.setdefault(type(model.get_submodule(path)).__name__, []).append(path)
    listed = "; ".join(
        f"{kind} at '{paths[0]}'{f' (and {len(paths) - 1} more)' if len(paths) > 1 else ''} holds "
        f"{', '.join(unplanned[paths[0]][:4])}{', ...' if len(unplanned[paths[0]]) > 4 else ''}"
        for kind, paths in list(by_type.items())[:6])
    more = f"; and {len(by_type) - 6} more kinds" if len(by_type) > 6 else ""
    raise InputError(
        f"cannot split this model for tensor parallelism: {shorten(listed, 600)}{more} -- weights without a "
        f"plan. Implement optkit.interfaces.TensorParallel on that component: tp_plan() -> "
        f"{{sub-module: 'colwise' | 'rowwise' | 'vocab' | 'replicate'}} (e.g. {{'': 'replicate'}} to keep it whole "
        f"on every rank) and shard_local(tp_size)")


def is_plain_linear(module: nn.Module) -> bool:
    """A linear whose forward is torch's: the only kind DTensor's column/row styles can split."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def split_sizes(model: Model, plan: TensorParallelPlan) -> list[tuple[int, str]]:
    """(size, what) for every dimension the plan splits, heads included; checks each split module's kind."""
    sizes: list[tuple[int, str]] = []
    for path, style in plan.styles.items():
        module = model.get_submodule(path)
        if style in ("colwise", "rowwise"):
            if not is_plain_linear(module):
                raise InputError(
                    f"'{path}' is a {type(module).__name__}, declared '{style}' by '{plan.declared_by[path]}'; "
                    f"tensor parallelism splits plain torch linears only: build the model with linear='torch' "
                    f"(e.g. optkit.build(spec, linear='torch')) and merge or drop adapters first")
            dim = module.out_features if style == "colwise" else module.in_features
            sizes.append((dim, f"{'output' if style == 'colwise' else 'input'} width {dim} of '{path}'"))
        elif style == "vocab":
            weight = module._parameters.get("weight")
            if weight is None or weight.dim() != 2:
                raise InputError(f"'{path}' ({type(module).__name__}) is declared 'vocab' but has no 2-D 'weight' "
                                 "of its own to split by rows; declare 'vocab' on the module that owns the table")
            sizes.append((weight.shape[0], f"vocabulary of {weight.shape[0]} rows in '{path}'"))
    d = model.spec.decoder
    sizes.append((d.num_heads, f"{d.num_heads} attention heads"))
    for i, layer in enumerate(model.decoder.layers):
        if isinstance(layer, DecoderBlock) and layer.kv_heads != d.num_heads:
            sizes.append((layer.kv_heads, f"{layer.kv_heads} key/value heads of 'decoder.layers.{i}'"))
    return sizes


def valid_sizes(sizes: list[int]) -> list[int]:
    common = math.gcd(*sizes) if sizes else 1
    return [n for n in range(1, common + 1) if common % n == 0]


def check_divisible(model: Model, plan: TensorParallelPlan) -> None:
    sizes = split_sizes(model, plan)
    bad = [(size, what) for size, what in sizes if size % plan.tp_size]
    if not bad:
        return
    valid = ", ".join(map(str, valid_sizes([size for size, _ in sizes])))
    first = next(what for size, what in bad if "heads" in what) if any("heads" in w for _, w in bad) else bad[0][1]
    others = sorted({size for size, what in bad if what != first} - {size for size, what in bad if what == first})
    also = f" (nor the split sizes {', '.join(map(str, others))})" if others else ""
    vocab_only = all(what.startswith("vocabulary") for _, what in bad)
    note = (" -- optkit does not pad the vocabulary: resize the embedding to a multiple of tp_size"
            if vocab_only else "")
    raise InputError(f"tp_size {plan.tp_size} does not divide the {first}{also}; "
                     f"valid tp_size for this model: {valid}{note}")


def check_tp_size(tp_size: object) -> None:
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise InputError(f"tp_size must be a positive integer (ranks per tensor-parallel group), got "
                         f"{brief_repr(tp_size)}")


def tensor_parallel_plan(model: Model, tp_size: int) -> TensorParallelPlan:
    """The checked plan for splitting ``model`` over ``tp_size`` ranks (raises InputError when it cannot be)."""
    check_tp_size(tp_size)
    plan = collect_plan(model, tp_size)
    check_coverage(model, plan)
    check_divisible(model, plan)
    return plan


def split_dims(model: Model, plan: TensorParallelPlan) -> dict[str, int | None]:
    """Every parameter name (tied ones under each name) -> the dimension a rank keeps a slice of, or None
    for a parameter every rank holds whole.

    Column-split linears split weight and bias by output rows (dim 0), row-split ones the weight by input
    columns (dim 1) and keep the bias whole, vocabulary tables their own weight by rows (dim 0).
    """
    dims: dict[str, int | None] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        module_path, _, leaf = name.rpartition(".")
        covering = plan.covering(module_path)
        style = plan.styles[covering] if covering is not None else "replicate"
        own_weight = module_path == covering and leaf == "weight"
        if style == "colwise":
            dims[name] = 0
        elif style == "rowwise" and own_weight:
            dims[name] = 1
        elif style == "vocab" and own_weight:
            dims[name] = 0
        else:
            dims[name] = None
    return dims


def planned_parameter_bytes(model: Model, tp_size: int, dtype: str | None = None) -> int:
    """Parameter bytes one rank will hold after the split (works on a model built on the meta device).

    Column-split linears keep 1/tp of weight and bias, row-split ones 1/tp of the weight and the whole bias,
    vocabulary tables 1/tp of their rows; everything else is held whole. A tied table counts once.
    ``dtype``: count as ``optkit plan`` does for "float16", "bfloat16", "float32" or "int8" (a linear's weight
    1 byte per element plus an fp32 scale per output row it holds, the rest fp16) instead of the model's own.
    """
    dims = split_dims(model, tensor_parallel_plan(model, tp_size))
    return sum(_share_bytes(model.get_submodule(name.rpartition(".")[0]), param, dtype, tp_size, dims[name])
               for name, param in model.named_parameters())


def _share_bytes(module: nn.Module, param: nn.Parameter, dtype: str | None, parts: int, dim: int | None) -> int:
    """The bytes of one rank's part of ``param`` (``dim``: the split dimension, None when held whole)."""
    if dtype is None:
        return param.numel() * param.element_size() // (parts if dim is not None else 1)
    from optkit.placement.units import INT8, INT8_SCALE_BYTES, tensor_bytes

    if dim is None:
        return tensor_bytes(module, param, dtype)
    if dtype == INT8 and isinstance(module, nn.Linear) and param is module.weight:
        rows = module.out_features // parts if dim == 0 else module.out_features  # a scale per row held
        return param.numel() // parts + rows * INT8_SCALE_BYTES
    return tensor_bytes(module, param, dtype) // parts
