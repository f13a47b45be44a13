"""Pods of a set as the harness sees them: ``PodRow`` (one pod, read through the pod contract as the operator
reads it) and ``PodTracker`` (when each pod first reached each milestone, from a watch)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from kubernetes import client

from seedfork_api import contract as c

from .waiting import ScenarioError
from .watching import ListWatch


def condition_true(pod: Mapping[str, Any], kind: str) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond.get("status") == "True"
    return False


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return condition_true(pod, "Ready")


def corrupt_store(agent_url: str, token: str) -> None:
    """Flip one byte of a pod's verified store, in the shared memory its agent serves from (and, for an engine
    whose parameters are views of that store, in the engine's weights): a bad DIMM, a stray write."""
    r = httpx.get(f"{agent_url}/v1/attach", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    r.raise_for_status()
    body = r.json()
    with open(body["attach"]["path"], "r+b") as f:
        f.seek(body["manifest"]["tensors"][0]["offset"] + 11)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def _as_dict(model: c.Assignment | c.AgentReport | c.PodTiming | None) -> dict[str, Any]:
    """An annotation as its JSON said it (the keys it set), for tables and test messages."""
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True) if model is not None else {}


@dataclass
class PodRow:
    """One pod as the demo and the tests see it: where its weights came from and how far it got."""

    name: str
    node: str
    ip: str
    phase: str
    ready: bool
    gate: bool
    attempt: int
    source: str  # storage | seed
    seed_pod: str
    backend: str
    state: str  # the agent's report state for the current attempt
    bytes_done: int
    bytes_total: int
    error: str
    serving: bool
    deleting: bool
    assignment: dict[str, Any]
    report: dict[str, Any]
    timing: dict[str, Any]

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodRow:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        assignment, report, timing = c.read_annotations(meta.get("annotations"))
        # The state as the operator reads it (a verified report of a superseded attempt is verified), so the
        # harness never calls a pod pending that the operator rightly made Ready.
        weights = c.weights_report(assignment, report)
        queued = assignment is not None and assignment.source == "queued"
        return cls(
            name=meta.get("name", ""),
            node=spec.get("nodeName") or "",
            ip=status.get("podIP") or "",
            phase=status.get("phase") or "Pending",
            ready=pod_ready(pod),
            gate=condition_true(pod, c.READINESS_GATE),
            attempt=assignment.attempt if assignment else 0,
            source=(assignment.source if assignment else "") or "",
            seed_pod=(assignment.seed_pod if assignment else "") or "",
            backend=(assignment.backend if assignment else None) or (report.backend if report else None) or "",
            state="queued" if queued else (weights.state if weights else "pending"),
            bytes_done=weights.bytes_done if weights else 0,
            bytes_total=weights.bytes_total if weights else 0,
            error=(weights.error if weights else None) or (report.error if report else None) or "",
            serving=bool(report and report.serving),
            deleting=bool(meta.get("deletionTimestamp")),
            assignment=_as_dict(assignment),
            report=_as_dict(report),
            timing=_as_dict(timing),
        )

    @property
    def standby(self) -> bool:
        """A standby pod (no replica): its assignment says so until its promotion."""
        return self.source == "standby"

    @property
    def warm(self) -> bool:
        """A standby whose engine is up, waiting for its promotion."""
        return self.standby and self.state == "standby"

    @property
    def origin(self) -> str:
        """Where the weights came from, for a table: ``storage`` or the seed pod's name."""
        return self.seed_pod if self.source == "seed" and self.seed_pod else (self.source or "-")


# Milestones a PodTracker records, in the order a pod normally reaches them.
MILESTONES = ("created", "scheduled", "ip", "running", "transferring", "verified", "gate", "ready")


class PodTracker:
    """Watches the pods of one set and records when each first reached each milestone (wall clock).

    Kubernetes timestamps have one-second resolution, too coarse for a breakdown of a few seconds,
    so the times are taken when the watch event arrives (same clock as the agent's timing annotation).
    """

    def __init__(self, api: client.ApiClient, namespace: str, set_name: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.selector = f"{c.LABEL_SET}={set_name}"
        self.pods: dict[str, dict[str, Any]] = {}
        self.times: dict[str, dict[str, float]] = {}
        self.deleted: dict[str, float] = {}
        self.uids: dict[str, str] = {}  # the operator reuses a slot's name for the pod that replaces it
        self.history: dict[str, list[tuple[float, str, int]]] = {}  # (time, report state, attempt) changes
        # Every time a pod was seen Ready without verified weights: must stay empty.
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._watch = ListWatch(
            self.core.list_namespaced_pod,
            namespace,
            label_selector=self.selector,
            on_list=self._listed,
            on_event=self._event,
            retry_s=0.2,
        )
        self._thread = threading.Thread(target=self._watch.run, name="pod-tracker", daemon=True)

    def __enter__(self) -> PodTracker:
        self._thread.start()
        if not self._synced.wait(30):
            raise ScenarioError("pod watch did not start within 30s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._watch.close()
        self._thread.join(timeout=10)

    def _listed(self, items: list[dict[str, Any]]) -> None:
        for pod in items:
            self._see(pod)
        self._synced.set()

    def _event(self, kind: str, pod: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._gone(pod)
        else:
            self._see(pod)

    def _mark(self, name: str, milestone: str, now: float) -> None:
        self.times.setdefault(name, {}).setdefault(milestone, now)

    def _see(self, pod: dict[str, Any]) -> None:
        now = time.time()
        name = pod["metadata"]["name"]
        row = PodRow.from_pod(pod)
        uid = pod["metadata"].get("uid", "")
        with self._lock:
            if self.uids.setdefault(name, uid) != uid:  # a successor under the same name starts a new record
                self.uids[name] = uid
                self.times.pop(name, None)
                self.history.pop(name, None)
            self.pods[name] = pod
            self._mark(name, "created", now)
            if row.node:
                self._mark(name, "scheduled", now)
            if row.ip:
                self._mark(name, "ip", now)
            if row.phase == "Running":
                self._mark(name, "running", now)
            if row.state in ("transferring", "verified"):
                self._mark(name, "transferring", now)
            if row.state == "verified":
                self._mark(name, "verified", now)
            if row.gate:
                self._mark(name, "gate", now)
            if row.ready:
                self._mark(name, "ready", now)
                if not (row.gate and row.state == "verified"):
                    self.violations.append(f"{name} Ready with gate={row.gate} report={json.dumps(row.report)}")
            hist = self.history.setdefault(name, [])
            if not hist or hist[-1][1:] != (row.state, row.attempt):
                hist.append((now, row.state, row.attempt))

    def _gone(self, pod: dict[str, Any]) -> None:
        with self._lock:
            name = pod["metadata"]["name"]
            self.pods.pop(name, None)
            self.deleted.setdefault(name, time.time())

    # ---- reading
    def rows(self) -> list[PodRow]:
        with self._lock:
            pods = list(self.pods.values())
        return sorted((PodRow.from_pod(p) for p in pods), key=lambda r: (self.created(r.name), r.name))

    def created(self, name: str) -> float:
        return self.times.get(name, {}).get("created", float("inf"))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: json.loads(json.dumps(v)) for k, v in self.pods.items()}
