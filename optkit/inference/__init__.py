"""Inference speed as a transform applied from outside the model.

``optkit/model.py`` is the definition of the OPT model and stays plain. This room makes it fast
without changing what it computes:

* :func:`prepare` swaps each attention block for :class:`PreparedAttention` (q/k/v in one GEMM where
  that pays, the power-of-two query scale folded into the kernel) -- the same modules, parameters,
  ``state_dict`` keys and values -- and gives the model an :class:`InferenceSession` that keeps
  captured CUDA graphs and the compiled decode step between ``generate`` calls;
* :func:`restore` undoes both (the plain blocks over the same modules; the session dropped);
* :mod:`optkit.inference.decode_graph` is the decode step with its state on the device (one CUDA
  graph replay per token) and :mod:`optkit.inference.compiled` its torch.compile'd form.

Training is unaffected: with autograd on, a prepared block runs the reference path, and ``.to()`` or
a replaced weight drops the stale stacked buffer by itself. ``optkit.from_pretrained`` prepares the
models it loads; ``optkit.build`` returns the plain model.
"""

from __future__ import annotations

from optkit._lazy import lazy_exports

# Exported lazily, as ``optkit`` itself does: ``generate`` needs the session and the decode step but
# not the transform, which needs optkit.model -- and optkit.model's ``generate`` needs ``generate``.
_LAZY = {
    "DecodeStep": "optkit.inference.decode_graph",
    "unsupported_reason": "optkit.inference.decode_graph",
    "InferenceSession": "optkit.inference.session",
    "session_for": "optkit.inference.session",
    "PreparedAttention": "optkit.inference.attention",
    "prepare": "optkit.inference.transform",
    "restore": "optkit.inference.transform",
    "is_prepared": "optkit.inference.transform",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
