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

from typing import TYPE_CHECKING

from optkit.inference.attention import PreparedAttention
from optkit.inference.decode_graph import DecodeStep, unsupported_reason
from optkit.inference.session import InferenceSession
from optkit.model import Attention

if TYPE_CHECKING:
    from optkit.model import Model

__all__ = ["DecodeStep", "InferenceSession", "PreparedAttention", "is_prepared", "prepare", "restore",
           "session_for", "unsupported_reason"]


def prepare(model: Model, *, stack_projections: bool = True) -> Model:
    """Apply the inference transform in place (idempotent) and return the model.

    ``stack_projections=False`` keeps q/k/v as three GEMMs (e.g. to measure what stacking gains).
    """
    for layer in model.decoder.layers:
        attention = layer.self_attn
        if isinstance(attention, PreparedAttention):
            if stack_projections:
                attention.stack_projections()
        elif type(attention) is Attention:
            layer.self_attn = PreparedAttention.from_reference(attention, stack=stack_projections)
    if model.inference_session is None:
        model.inference_session = InferenceSession()
    return model


def restore(model: Model) -> Model:
    """Undo :func:`prepare`: plain attention blocks over the same modules; kept graphs dropped."""
    for layer in model.decoder.layers:
        if isinstance(layer.self_attn, PreparedAttention):
            layer.self_attn = layer.self_attn.to_reference()
    if model.inference_session is not None:
        model.inference_session.clear()
    model.inference_session = None
    return model


def is_prepared(model: Model) -> bool:
    return model.inference_session is not None


def session_for(model: Model) -> InferenceSession:
    """The model's session when it is prepared, else a fresh one for this call only."""
    return model.inference_session or InferenceSession()
