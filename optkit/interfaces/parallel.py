"""How a component splits under tensor parallelism: a declaration the component owns.

Megatron's split of a transformer layer needs to know, per weight, whether it is cut by output rows
(column-parallel: each rank computes whole heads / FFN columns, no communication), by input columns
(row-parallel: partial sums, one all-reduce), by vocabulary rows, or kept whole. transformers keeps that
knowledge in one per-model table; in a component kit it belongs to the component, because only the
component knows which of its weights play which role -- a third-party MLP or attention block declares
its own plan and the tensor-parallel room applies it with ``torch.distributed.tensor.parallel``.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

ShardStyle = Literal["colwise", "rowwise", "vocab", "replicate"]
"""colwise: weight split on dim 0 (outputs); rowwise: split on dim 1 (inputs), outputs all-reduced;
vocab: an embedding/LM head split by vocabulary rows; replicate: every rank holds all of it."""


@runtime_checkable
class TensorParallel(Protocol):
    """A module that declares how its sub-modules shard (names relative to the module)."""

    def tp_plan(self) -> dict[str, ShardStyle]:
        """Sub-module name -> style, e.g. ``{"q_proj": "colwise", ..., "out_proj": "rowwise"}``."""
        ...

    def shard_local(self, tp_size: int) -> None:
        """After its weights were split over ``tp_size`` ranks: use the local sizes (e.g. heads per rank)."""
        ...
