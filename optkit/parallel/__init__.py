"""Tensor-parallel inference on torch.distributed, with the plan declared by the components.

* :func:`parallelize` -- split a loaded model in place over the ranks of a process group (torchrun);
* :func:`tensor_parallel_plan` -- the checked ``{module path: style}`` plan, without a process group;
* :func:`local_parameter_bytes` -- the parameter bytes one rank holds; :func:`planned_parameter_bytes` --
  what it will hold (on a meta-device model too);
* :func:`shard_for_training` -- FSDP2 for training; :func:`export_checkpoint` -- a DCP training checkpoint
  as a plain one (optkit.parallel.fsdp).

See docs/distributed.md.
"""

from optkit.parallel.fsdp import export_checkpoint, shard_for_training
from optkit.parallel.plan import TensorParallelPlan, planned_parameter_bytes, tensor_parallel_plan
from optkit.parallel.tensor_parallel import local_parameter_bytes, parallelize

__all__ = ["TensorParallelPlan", "export_checkpoint", "local_parameter_bytes", "parallelize",
           "planned_parameter_bytes", "shard_for_training", "tensor_parallel_plan"]
