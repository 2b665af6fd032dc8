"""Tensor-parallel inference on torch.distributed, with the plan declared by the components.

* :func:`parallelize` -- split a loaded model in place over the ranks of a process group (torchrun);
* :func:`tensor_parallel_plan` -- the checked ``{module path: style}`` plan, without a process group;
* :func:`local_parameter_bytes` -- the parameter bytes one rank holds; :func:`planned_parameter_bytes` --
  what it will hold (on a meta-device model too);
* :func:`shard_for_training` -- FSDP2 for training; :func:`export_checkpoint` -- a DCP training checkpoint
  as a plain one (optkit.parallel.fsdp).

See docs/distributed.md.
"""

from __future__ import annotations

from optkit._lazy import lazy_exports

# Exported lazily, as ``optkit`` and ``optkit.inference`` are: every ``optkit run`` imports
# ``optkit.parallel.launch`` to ask whether torchrun started it, and must not pay for FSDP, DCP and DTensor.
_LAZY = {
    "export_checkpoint": "optkit.parallel.fsdp",
    "shard_for_training": "optkit.parallel.fsdp",
    "TensorParallelPlan": "optkit.parallel.plan",
    "planned_parameter_bytes": "optkit.parallel.plan",
    "tensor_parallel_plan": "optkit.parallel.plan",
    "local_parameter_bytes": "optkit.parallel.tensor_parallel",
    "parallelize": "optkit.parallel.tensor_parallel",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
