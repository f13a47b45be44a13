"""What one set tells people: Events on the ModelReplicaSet and its Prometheus metrics (``metrics``).

Kept apart from the decisions so that a pass reads as plan, write, report. The little state here is
reporting's own: the last Degraded message announced (one Warning per new problem, not one per pass)
and the pods this process gated (the Ready histogram measures only pods whose gate it set).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from seedfork_api.spec import GROUP, KIND, VERSION

from . import metrics
from .planner import Failure, SeedChoice
from .podview import PodView
from .problem import Problem


@dataclass
class Reporter:
    namespace: str
    name: str
    uid: str
    last_warning: str | None = None
    gated: set[str] = field(default_factory=set)  # pod uids this process gated, for the Ready histogram

    def _event(self, type: str, reason: str, message: str) -> None:
        # The fields kopf reads for the Event's involvedObject: the set, whatever body the pass saw.
        ref: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }
        kopf.event(ref, type=type, reason=reason, message=message)

    def problem(self, problem: Problem | None) -> None:
        """A Warning when the set's problem is new (or changed); nothing while it stays the same."""
        if problem and problem.message != self.last_warning:
            self._event("Warning", problem.reason, problem.message)
        self.last_warning = problem.message if problem else None

    def token_secret(self, reason: str, message: str, *, warning: bool) -> None:
        self._event("Warning" if warning else "Normal", reason, message)

    def pod_deleted(self, pod: str, why: str) -> None:
        self._event("Normal", "PodDeleted", f"deleting pod {pod}: {why}")

    def standby_promoted(self, pod: str) -> None:
        self._event("Normal", "StandbyPromoted", f"standby {pod} promoted")

    def transfer_failed(self, failure: Failure) -> None:
        source = "seed" if failure.seed else "storage"
        metrics.TRANSFER_FAILURES.labels(self.namespace, self.name, source).inc()
        frm = f"from seed {failure.seed}" if failure.seed else "from storage"
        message = f"pod {failure.pod} attempt {failure.attempt} {frm} failed: {failure.reason}"
        self._event("Warning", "TransferFailed", message)

    def source_chosen(self, ch: SeedChoice) -> None:
        metrics.SEED_SELECTIONS.labels(self.namespace, self.name, ch.locality, ch.why).inc()
        if ch.why == "fallback":
            metrics.FALLBACKS.labels(self.namespace, self.name).inc()
        src = f"seed {ch.seed} (shared {ch.locality})" if ch.seed else "storage"
        reason = "SeedFailover" if ch.why in ("retry", "fallback") else "SeedChosen"
        self._event("Normal", reason, f"pod {ch.pod} attempt {ch.attempt} loads from {src} [{ch.why}]")

    def verified(self, uid: str | None) -> None:
        """The gate of a pod was set: its weights verified. ``uid``: the pod's, when this pass knew it."""
        metrics.VERIFIED.labels(self.namespace, self.name).inc()
        if uid is not None:
            self.gated.add(uid)

    def ready(self, pods: list[PodView]) -> None:
        """Time to Ready of each pod this process gated, once, when it shows Ready."""
        for pod in pods:
            if pod.uid in self.gated and pod.ready and pod.created:
                metrics.POD_READY_SECONDS.labels(self.namespace, self.name).observe(max(time.time() - pod.created, 0))
                self.gated.discard(pod.uid)

    def in_flight(self, transfers: int) -> None:
        metrics.TRANSFERS_IN_FLIGHT.labels(self.namespace, self.name).set(transfers)
