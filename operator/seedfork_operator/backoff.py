"""Exponential backoff for storage loads that keep failing (a bad ``model.uri``, an unreadable volume).

Without it a failed storage load is replaced at once, and its successor fails the same way: pods churn
as fast as the apiserver takes them. After ``n`` failures in a row the next pod that would load from
storage is created ``base * 2**(n-1)`` seconds (at most ``cap``) after the last failure, and the set is
Degraded with the last error until a storage load succeeds or the spec changes. Pods that pull from a
seed are never held back. The state lives in the operator's memory: a restarted operator tries once
at once, then backs off again.
"""

from __future__ import annotations

from dataclasses import dataclass

from .problem import Problem


@dataclass
class Backoff:
    base: float
    cap: float
    failures: int = 0
    last_error: str = ""
    retry_at: float = 0.0
    generation: int = 0

    def failed(self, error: str, now: float) -> None:
        self.failures += 1
        self.last_error = error
        self.retry_at = now + self.delay()

    def delay(self) -> float:
        return min(self.cap, self.base * 2 ** max(self.failures - 1, 0)) if self.failures else 0.0

    def succeeded(self) -> None:
        self.failures, self.last_error, self.retry_at = 0, "", 0.0

    def observe_generation(self, generation: int) -> None:
        """A changed spec (a fixed ``model.uri``) is tried at once."""
        if generation != self.generation:
            self.generation = generation
            self.succeeded()

    def holding(self, now: float) -> bool:
        return now < self.retry_at

    def problem(self) -> Problem | None:
        """The Degraded condition; its message changes only with a new failure (no status write per pass)."""
        if not self.failures:
            return None
        return Problem(
            "StorageLoadFailing",
            f"{self.failures} storage load(s) failed in a row; the next pod loads from storage "
            f"{self.delay():.0f}s after the last failure; last error: {self.last_error}",
        )
