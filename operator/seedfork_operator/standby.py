"""Standby pods, decided purely: which to promote on a scale-up, which to delete, how many to create.

A standby is a pod whose assignment has ``source: standby``: its agent brings the engine up warm, without
weights, reports ``state: standby`` and waits for a promotion (an assignment of a higher attempt). It is no
replica: not counted, never Ready, never a seed. Everything here is read from the pods (their assignment and
report), so a restarted operator decides exactly as the old one would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from seedfork_api.contract import Assignment

from .podview import PodView


@dataclass
class StandbyPlan:
    promote: list[PodView] = field(default_factory=list)  # become replicas now, in this order
    delete: list[tuple[str, str]] = field(default_factory=list)  # (pod, reason)
    create: int = 0  # new standbys to refill up to spec.standby


def is_warm(pod: PodView) -> bool:
    """The standby's engine is up and waits for its promotion (its agent said so for the current attempt)."""
    return pod.standby and pod.state == "standby"


def promotion_order(standbys: list[PodView]) -> list[PodView]:
    """Warm engines first (they answer at once), then the oldest (closest to warm); name breaks ties."""
    return sorted(standbys, key=lambda p: (not is_warm(p), p.created, p.name))


def plan_standby(standbys: list[PodView], wanted: int, missing_replicas: int) -> StandbyPlan:
    """``standbys``: the live standby pods; ``wanted``: spec.standby; ``missing_replicas``: replicas the set
    lacks after its own retries and replacements (each is a promotion while a standby is left)."""
    out = StandbyPlan()
    healthy: list[PodView] = []
    for pod in standbys:
        report = pod.current_report
        if report is not None and report.state == "failed":  # its engine died or never came up
            out.delete.append((pod.name, f"standby failed: {report.error or 'no reason given'}"))
        else:
            healthy.append(pod)
    ordered = promotion_order(healthy)
    out.promote = ordered[: max(missing_replicas, 0)]
    kept = ordered[len(out.promote) :]
    if len(kept) > wanted:  # fewer standbys wanted: drop the least warm, newest first
        for pod in sorted(kept, key=lambda p: (is_warm(p), -p.created, p.name))[: len(kept) - wanted]:
            out.delete.append((pod.name, "fewer standbys wanted"))
        dropped = {name for name, _ in out.delete}
        kept = [p for p in kept if p.name not in dropped]
    out.create = max(wanted - len(kept), 0)
    return out


def standby_assignment(now: float) -> Assignment:
    """A new standby's first assignment: bring the engine up, load nothing."""
    return Assignment(attempt=1, source="standby", assigned_at=now)
