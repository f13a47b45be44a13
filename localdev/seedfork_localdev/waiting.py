"""Waiting for a condition, bounded: the one poll-until helper of the dev harness and its tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class ScenarioError(RuntimeError):
    """A step of the harness failed; the message says which and shows what the cluster looked like."""


def wait_until(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.1,
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """Call ``check`` until it returns something truthy and return that; on timeout raise ``ScenarioError``
    with the last value seen and ``diagnose()`` attached. An exception from ``check`` ends the wait at once
    (the other side failed)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            last = f"; last value: {got!r}" if got is not None else ""
            extra = f"\n{diagnose()}" if diagnose else ""
            raise ScenarioError(f"timed out after {timeout:.0f}s waiting for {what}{last}{extra}")
        time.sleep(interval)
