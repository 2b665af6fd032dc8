"""``ComponentSuite``: a component kit as pytest tests, one per property.

    class TestGeGLU(ComponentSuite):
        kind = "mlp"
        component = "geglu"
        params = {"approximate": True}   # optional: the spec params to build it with
        reference = None                 # optional: optkit's component it must equal ("ffn", "layernorm", ...)

Properties that do not apply (no reference, ``backward=False``, ``capacity`` of a non-cache) are skipped.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from optkit.registration import Registry
from optkit.testing.component_kits import PropertyResult, make_component_subject, run_component_property
from optkit.testing.conformance import DEFAULT_EXAMPLES


class ComponentSuite:
    """Subclass as ``Test...`` and set ``kind`` and ``component``; pytest collects the inherited tests."""

    kind: ClassVar[str] = ""
    component: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    reference: ClassVar[str | None] = None
    device: ClassVar[str] = "cpu"
    max_examples: ClassVar[int] = DEFAULT_EXAMPLES
    registry: ClassVar[Registry | None] = None  # None: the global optkit.registry

    def check(self, prop: str) -> PropertyResult:
        """Run one property; fail or skip the calling test accordingly."""
        if not (self.kind and self.component):
            pytest.fail(f"{type(self).__name__} must set `kind = '<component kind>'` and "
                        "`component = '<registered name>'`", pytrace=False)
        if prop == "capacity" and self.kind != "kv_cache":
            pytest.skip("applies to KV caches only")
        subject = make_component_subject(self.kind, self.component, params=self.params, registry=self.registry,
                                         device=self.device, max_examples=self.max_examples, reference=self.reference)
        result = run_component_property(subject, prop)
        if result.status == "skipped":
            pytest.skip(result.detail)
        if result.status == "failed":
            pytest.fail(f"{self.kind} '{self.component}' fails {prop}: {result.detail}", pytrace=False)
        return result

    def test_builds(self) -> None:
        self.check("builds")

    def test_shapes(self) -> None:
        self.check("shapes")

    def test_dtypes(self) -> None:
        self.check("dtypes")

    def test_no_hidden_state(self) -> None:
        self.check("no_hidden_state")

    def test_gradients(self) -> None:
        self.check("gradients")

    def test_equivalence(self) -> None:
        self.check("equivalence")

    def test_capacity(self) -> None:
        self.check("capacity")
