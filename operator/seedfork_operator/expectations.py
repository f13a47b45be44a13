"""What this operator wrote and the pod watch has not delivered yet. Pure: no I/O, no clock of its own.

A pass plans from the pod index, which lags the operator's own writes by a watch round trip. Without
this memory a second pass right after the first would create, delete, assign or gate the same pods
again. An expectation ends when the index shows the write, or after ``EXPECTATION_TTL`` seconds (a
write that was lost, or a watch event that was: the pass then trusts the index alone). Losing them all
(a restart) is safe: pod names are deterministic, so a duplicate create gets 409.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from seedfork_api.contract import Assignment

from .podview import PodView

EXPECTATION_TTL = 30.0  # seconds to trust our own create/delete before the watch confirms it


@dataclass
class Expectations:
    created: dict[str, tuple[float, PodView]] = field(default_factory=dict)  # name -> (when, what we created)
    deleted: dict[str, float] = field(default_factory=dict)
    assigned: dict[str, tuple[float, Assignment]] = field(default_factory=dict)  # written, not yet watched
    gating: dict[str, float] = field(default_factory=dict)  # readiness gate set True, not yet watched
    ttl: float = EXPECTATION_TTL

    def expect_created(self, name: str, assignment: Assignment, now: float) -> None:
        self.created[name] = (now, PodView(name=name, created=now, assignment=assignment))

    def create_failed(self, name: str) -> None:
        """Not created: the next pass plans the pod again."""
        self.created.pop(name, None)

    def expect_deleted(self, name: str, now: float) -> None:
        self.deleted[name] = now

    def expect_assigned(self, name: str, assignment: Assignment, now: float) -> None:
        self.assigned[name] = (now, assignment)

    def expect_gated(self, name: str, now: float) -> None:
        self.gating[name] = now

    def pending(self) -> bool:
        return bool(self.created or self.deleted or self.assigned or self.gating)

    def overlay(self, indexed: list[PodView], now: float) -> list[PodView]:
        """The pods as the index shows them, corrected by our own writes the watch has not delivered yet."""
        self._forget_seen(indexed, now)
        pods = []
        for p in indexed:
            if p.name in self.deleted:
                p = replace(p, deleting=True)
            if p.name in self.assigned:
                p = replace(p, assignment=self.assigned[p.name][1])
            if p.name in self.gating:
                p = replace(p, gate=True)
            pods.append(p)
        return pods + [view for _, view in self.created.values()]

    def _forget_seen(self, indexed: list[PodView], now: float) -> None:
        """Drop what the index confirms (or makes moot: the pod is gone) and what is older than ``ttl``."""
        seen = {p.name: p for p in indexed}

        def old(t: float) -> bool:
            return now - t > self.ttl

        for name in [n for n, (t, _) in self.created.items() if n in seen or old(t)]:
            del self.created[name]
        for name in [n for n, t in self.deleted.items() if n not in seen or old(t)]:
            del self.deleted[name]
        for name, (t, a) in list(self.assigned.items()):
            p = seen.get(name)
            if p is None or (p.assignment and p.assignment.attempt >= a.attempt) or old(t):
                del self.assigned[name]
        for name, t in list(self.gating.items()):
            p = seen.get(name)
            if p is None or p.gate or old(t):
                del self.gating[name]
