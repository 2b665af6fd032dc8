"""``AttentionBackendSuite``: the conformance kit as pytest tests, one per property.

    class TestMine(AttentionBackendSuite):
        backend = "mine"
        params = {"block": 32}        # optional: the spec params to build it with

Each property is its own test, so pytest's report says which one failed; properties a
backend declares it does not need (e.g. attention weights) are reported as skipped.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from optkit.registration import Registry
from optkit.testing.conformance import DEFAULT_EXAMPLES, PropertyResult, make_subject, run_property


class AttentionBackendSuite:
    """Subclass as ``Test...`` and set ``backend``; pytest collects the inherited tests."""

    backend: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    device: ClassVar[str] = "cpu"
    max_examples: ClassVar[int] = DEFAULT_EXAMPLES
    registry: ClassVar[Registry | None] = None  # None: the global optkit.registry

    def check(self, prop: str) -> PropertyResult:
        """Run one property; fail or skip the calling test accordingly."""
        if not self.backend:
            pytest.fail(f"{type(self).__name__} must set `backend = '<registered attention name>'`", pytrace=False)
        subject = make_subject(self.backend, params=self.params, registry=self.registry, device=self.device,
                               max_examples=self.max_examples)
        result = run_property(subject, prop)
        if result.status == "skipped":
            pytest.skip(result.detail)
        if result.status == "failed":
            pytest.fail(f"attention backend '{self.backend}' fails {prop}: {result.detail}", pytrace=False)
        return result

    def test_registration(self) -> None:
        self.check("registration")

    def test_capabilities(self) -> None:
        self.check("capabilities")

    def test_equals_eager(self) -> None:
        self.check("equals_eager")

    def test_reduced_precision(self) -> None:
        self.check("reduced_precision")

    def test_fully_masked_rows(self) -> None:
        self.check("fully_masked_rows")

    def test_gradients(self) -> None:
        self.check("gradients")

    def test_dropout(self) -> None:
        self.check("dropout")

    def test_attention_weights(self) -> None:
        self.check("attention_weights")

    def test_model_logits(self) -> None:
        self.check("model_logits")

    def test_set_backend(self) -> None:
        self.check("set_backend")
