"""A read-only view of one owned pod: the facts the planner needs, parsed once from the pod body.

Pure: no I/O. Unparseable contract annotations read as absent (the planner then
re-assigns the pod), so a hand-edited annotation cannot crash the operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from pydantic import ValidationError

from seedfork_api.contract import (
    ANN_TIMING,
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
        try:
            assignment = Assignment.from_annotations(annotations)
        except ValidationError:
            assignment = None
        try:
            report = AgentReport.from_annotations(annotations)
        except ValidationError:
            report = None
        try:
            raw = annotations.get(ANN_TIMING)
            timing = PodTiming.model_validate_json(raw) if raw else None
        except ValidationError:
            timing = None
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
        """The agent's report for the current attempt; an older report says nothing about it."""
        if self.assignment is None or self.report is None or self.report.attempt != self.assignment.attempt:
            return None
        return self.report

    @cached_property
    def state(self) -> str | None:
        report = self.current_report
        if report is None and self.superseded_but_verified:
            return "verified"
        return report.state if report else None

    @cached_property
    def superseded_but_verified(self) -> bool:
        """The agent verified an earlier attempt just as the operator moved on (seed judged gone, closer seed).

        Verified weights are verified whatever attempt brought them, and an agent that already serves
        takes no new attempt, so waiting for the newer one would hang the pod until it timed out.
        """
        r, a = self.report, self.assignment
        return r is not None and a is not None and r.state == "verified" and 1 <= r.attempt < a.attempt

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
