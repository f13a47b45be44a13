"""The ModelReplicaSet status, computed from the pods. Pure.

Counts come from the pods as they are now; the transfer totals (completed,
failed, fell back) are cumulative, carried in the status itself and increased
by what the operator just did, so they survive an operator restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from seedfork_api.spec import ModelReplicaSetSpec

from .planner import resolve_backend, seed_check
from .podview import PodView
from .problem import Problem
from .standby import is_warm


def now_rfc3339(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    old: list[Mapping[str, Any]], kind: str, status: str, reason: str, message: str, generation: int, now: float
) -> dict[str, Any]:
    """metav1.Condition; lastTransitionTime moves only when the status flips."""
    before = next((c for c in old if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now_rfc3339(now)
    return {
        "type": kind,
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": since,
        "reason": reason,
        "message": message,
    }


def compute_status(
    *,
    spec: ModelReplicaSetSpec | None,
    fingerprint: str,
    pods: list[PodView],
    old: Mapping[str, Any],
    generation: int,
    selector: str,
    token_secret: str,
    counts: Mapping[str, int],
    weights_digest: str = "",
    degraded: Problem | None,
    now: float,
) -> dict[str, Any]:
    """``counts``: increments of completed / failed / fellBack from this pass."""
    everything = [p for p in pods if not p.deleting]
    standby = [p for p in everything if p.standby]
    warm = sum(is_warm(p) for p in standby)
    live = [p for p in everything if not p.standby]  # the replicas: what scale and HPA count
    ready = sum(p.ready for p in live)
    seeds = sum(map(seed_check(spec, fingerprint), live)) if spec else 0
    loading = [p for p in live if p.assignment is not None and p.state not in ("verified", "failed")]
    queued = sum(p.assignment.source == "queued" for p in loading)  # waiting for a slot, not loading
    in_flight = len(loading) - queued
    before = old.get("transfers") or {}
    transfers = {
        "inFlight": in_flight,
        "queued": queued,
        "completed": int(before.get("completed", 0)) + counts.get("completed", 0),
        "failed": int(before.get("failed", 0)) + counts.get("failed", 0),
        "fellBack": int(before.get("fellBack", 0)) + counts.get("fellBack", 0),
    }
    desired = spec.replicas if spec else 0
    conditions_before = list(old.get("conditions") or [])

    def cond(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return condition(conditions_before, kind, "True" if ok else "False", reason, message, generation, now)

    available = ready >= desired and spec is not None
    wanted_standby = spec.standby if spec else 0
    settled = (
        len(live) == desired
        and ready == desired
        and in_flight + queued == 0
        and len(everything) == len(pods)
        and len(standby) == warm == wanted_standby
    )
    conditions = [
        cond(
            "Available",
            available,
            "MinimumReplicasReady" if available else "ReplicasNotReady",
            f"{ready}/{desired} replicas ready",
        ),
        cond(
            "Progressing",
            not settled and degraded is None,
            "Settled" if settled else ("Blocked" if degraded else "Scaling"),
            f"{len(live)} pods for {desired} replicas, {in_flight} loading weights, {queued} queued for a slot"
            + (f", {warm}/{wanted_standby} standbys warm" if wanted_standby or standby else ""),
        ),
        cond(
            "Degraded",
            degraded is not None,
            degraded.reason if degraded else "AsExpected",
            degraded.message if degraded else "",
        ),
    ]
    return {
        "replicas": len(live),
        "readyReplicas": ready,
        "standby": len(standby),
        "standbyWarm": warm,
        "seeds": seeds,
        "backend": resolve_backend(spec) if spec else "",
        "transfers": transfers,
        "selector": selector,
        "fingerprint": fingerprint,
        "weightsDigest": weights_digest,
        "tokenSecret": token_secret,
        "observedGeneration": generation,
        "conditions": conditions,
    }
