"""What ``generate`` keeps between calls for one model, in one object the caller can see and drop.

Capturing a CUDA graph costs a few forward passes and compiling the step costs seconds to minutes,
so a prepared model keeps them: ``model.inference_session`` holds the last captured decode step (with
its cache) and the compiled step function. ``optkit.inference.restore(model)`` (or assigning None)
drops them. A model that was never prepared gets a fresh session per ``generate`` call, so
``generate`` itself never changes the model.

Thread safety: a kept step is lent to one call at a time; a second thread generating on the same
model meanwhile builds a step of its own.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import Tensor

from optkit.inference.decode_graph import DecodeStep, forward_hooks, padded_length, step_key

if TYPE_CHECKING:
    from optkit.model import Model


class InferenceSession:
    """The decode steps and compiled step function ``generate`` reuses for one model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: tuple[tuple, DecodeStep] | None = None  # at most one: an old graph's memory is freed first
        self._compiled: Callable[[DecodeStep], Tensor] | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> "InferenceSession":
        """A copied model gets an empty session: captured graphs read the original's memory."""
        return InferenceSession()

    @property
    def kept_step(self) -> DecodeStep | None:
        """The captured step the next call of the same shape replays (None: none kept)."""
        return None if self._kept is None else self._kept[1]

    def compiled_step(self) -> Callable[[DecodeStep], Tensor]:
        with self._lock:
            if self._compiled is None:
                from optkit.inference.compiled import compile_step

                self._compiled = compile_step()
            return self._compiled

    @contextmanager
    def decode_step(self, model: Model, batch_size: int, max_length: int, cache_kind: str | None,
                    compiled: bool = False) -> Iterator[DecodeStep]:
        """A decode step with a fresh (reset) cache, lent for the block.

        On CUDA the kept step is reused when shapes, kinds and the module/weight layout still match
        (any ``set_backend`` or ``.to()`` changes the layout: a new capture); a new captured step
        replaces it when the block ends.
        """
        max_length = padded_length(max_length, compiled)
        key = step_key(model, batch_size, max_length, cache_kind, compiled)
        with self._lock:
            kept, self._kept = self._kept, None  # lent: a concurrent call builds its own
        if kept is not None and kept[0] == key:
            step = kept[1]
            step.cache.reset()
        else:
            del kept
            cache = model.new_cache(batch_size, max_length=max_length, kind=cache_kind)
            step = DecodeStep(model, cache, batch_size, run=self.compiled_step() if compiled and not
                              _hooks_refuse_compile(model) else None)
        try:
            yield step
        finally:
            if step.capture is False and step.graph is not None and type(step.cache).can_reset():
                with self._lock:
                    self._kept = (key, step)

    def clear(self) -> None:
        """Drop the kept step (its graph and cache) and the compiled function."""
        with self._lock:
            self._kept, self._compiled = None, None


def _hooks_refuse_compile(model: Model) -> bool:
    """A model with forward hooks decodes with the eager step: the compiled one would not follow them.
    A single-device placement's own hooks (moves to the device everything is already on) do not count."""
    placement_hooks = {handle.id for handle in model.placement.hooks} if model.placement is not None else set()
    if not set(forward_hooks(model)) - placement_hooks:
        return False
    warnings.warn("compile: the model has forward hooks, which torch.compile does not follow when they change "
                  "(nor per model); decoding with the eager step, which computes the same tokens",
                  RuntimeWarning, stacklevel=5)
    return True


def session_for(model: Model) -> InferenceSession:
    """The model's session when it is prepared, else a fresh one for this call only."""
    return model.inference_session or InferenceSession()
