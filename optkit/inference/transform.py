"""The inference transform: :func:`prepare` and :func:`restore` (see :mod:`optkit.inference`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from optkit.inference.attention import PreparedAttention
from optkit.inference.session import InferenceSession
from optkit.model import Attention, DecoderLayer

if TYPE_CHECKING:
    from optkit.model import Model


def prepare(model: Model, *, stack_projections: bool = True) -> Model:
    """Apply the inference transform in place (idempotent) and return the model.

    ``stack_projections=False`` keeps q/k/v as three GEMMs (e.g. to measure what stacking gains).
    """
    for layer in model.decoder.layers:
        if not isinstance(layer, DecoderLayer):
            continue  # another family's block: computed as it is
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
        if isinstance(layer, DecoderLayer) and isinstance(layer.self_attn, PreparedAttention):
            layer.self_attn = layer.self_attn.to_reference()
    if model.inference_session is not None:
        model.inference_session.clear()
    model.inference_session = None
    return model


def is_prepared(model: Model) -> bool:
    return model.inference_session is not None
