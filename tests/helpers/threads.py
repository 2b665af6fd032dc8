"""Running one call in several threads at once, for the tests that generate concurrently on one model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def results_of_threads(call: Callable[[int], Any], count: int, *, repeats: int = 3, timeout: float = 120) -> dict:
    """``call(i)`` ``repeats`` times in thread i, all ``count`` threads at once: {i: its last result}.

    An exception in any thread, or a thread still running after ``timeout`` seconds, fails the test."""
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(repeats):
                results[i] = call(i)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a generating thread did not finish"
    return results
