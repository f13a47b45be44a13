"""A read-only view of one owned pod: the facts the planner needs, parsed once from the pod body.

Pure: no I/O. The annotations are read by ``seedfork_api.contract`` (``read_annotations``,
``weights_report``), as the agent and the dev harness read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from seedfork_api import contract
from seedfork_api.contract import (
    ANN_TOKEN_DIGEST,
    LABEL_FINGERPRINT,
    READINESS_GATE,
    AgentReport,
    Assignment,
    PodTiming,
)


def parse_time(value: str | None) -> float:
    """RFC 3339 (as the apiserver writes it) → epoch seconds; 0.0 when absent."""
    if not value:
        return 0.0
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _condition(status: Mapping[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in status.get("conditions") or [])


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str = ""
    resource_version: str = ""
    created: float = 0.0
    node: str | None = None
    ip: str | None = None
    deleting: bool = False
    fingerprint: str | None = None
    ready: bool = False  # PodReady condition (the kubelet's verdict, gate included)
    gate: bool = False  # our readiness gate condition
    assignment: Assignment | None = None
    report: AgentReport | None = None
    timing: PodTiming | None = None  # the agent's phase timestamps: what the planner measures transfers by
    token_digest: str = ""  # of the token the pod started with

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodView:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        annotations = meta.get("annotations") or {}
        assignment, report, timing = contract.read_annotations(annotations)
        return cls(
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            resource_version=meta.get("resourceVersion", ""),
            created=parse_time(meta.get("creationTimestamp")),
            node=spec.get("nodeName") or None,
            ip=status.get("podIP") or None,
            deleting=bool(meta.get("deletionTimestamp")),
            fingerprint=(meta.get("labels") or {}).get(LABEL_FINGERPRINT),
            ready=_condition(status, "Ready"),
            gate=_condition(status, READINESS_GATE),
            assignment=assignment,
            report=report,
            timing=timing,
            token_digest=annotations.get(ANN_TOKEN_DIGEST, ""),
        )

    @cached_property
    def current_report(self) -> AgentReport | None:
        return contract.current_report(self.assignment, self.report)

    @cached_property
    def state(self) -> str | None:
        report = contract.weights_report(self.assignment, self.report)
        return report.state if report else None

    @cached_property
    def superseded_but_verified(self) -> bool:
        return contract.superseded_but_verified(self.assignment, self.report)

    @cached_property
    def standby(self) -> bool:
        """A warm standby, not a replica: its assignment says so (promotion replaces the assignment)."""
        return self.assignment is not None and self.assignment.source == "standby"

    @cached_property
    def verified(self) -> bool:
        return self.state == "verified"

    @cached_property
    def serving(self) -> bool:
        return bool(self.report and self.report.serving)
