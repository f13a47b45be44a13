"""Carry out one pass's plan: its API writes, what they make the operator expect, and what they report.

Every write of a pass runs at once (at most ``CONCURRENCY`` in flight), so a 100-pod scale-out is one
round trip, not a hundred. A write that fails is logged and left to the next pass, which plans from
what the apiserver then shows; only a rejected pod is a problem of the set (the template is wrong).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from seedfork_api import contract as c

from .expectations import Expectations
from .kubeapi import Kube, api_message
from .planner import Plan
from .podview import PodView
from .problem import Problem
from .reporting import Reporter
from .status import now_rfc3339

log = logging.getLogger("seedfork.operator")

CONCURRENCY = 16  # API writes of one pass in flight at once


@dataclass
class Counts:
    """This pass's additions to the set's cumulative transfer totals (status.transfers)."""

    completed: int = 0
    failed: int = 0
    fell_back: int = 0

    def as_status(self) -> dict[str, int]:
        return {"completed": self.completed, "failed": self.failed, "fellBack": self.fell_back}


@dataclass
class PlanApplier:
    """One pass's writes for one set; made afresh each pass (it holds that pass's pods)."""

    kube: Kube
    namespace: str
    expect: Expectations
    report: Reporter
    render_pod: Callable[[str, c.Assignment], Mapping[str, Any]]  # the set's pod for a slot name
    pods: list[PodView]  # as the plan saw them
    counts: Counts = field(default_factory=Counts)
    limit: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONCURRENCY))

    async def apply(self, plan: Plan, ungate: Iterable[str] = ()) -> Problem | None:
        """``ungate``: pods whose gate goes False now (their weights are untrusted; they are being replaced)."""
        self._announce(plan)
        versions = {p.name: p.resource_version for p in self.pods}
        uids = {p.name: p.uid for p in self.pods}
        promoted = set(plan.promoted)
        jobs: list[Any] = [self._delete(n) for n, _ in plan.delete]
        jobs += [self._create(n, a) for n, a in plan.create]
        jobs += [self._assign(n, a, versions.get(n, ""), n in promoted) for n, a in plan.assign]
        jobs += [self._gate(n, uids.get(n)) for n in plan.gate]
        jobs += [self._untrust(n) for n in ungate]
        problem = None
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, ApiException):
                log.warning("API call failed: %s %s", result.status, api_message(result))
            elif isinstance(result, BaseException):
                log.error("action failed: %r", result)
            elif isinstance(result, Problem):
                problem = problem or result
        return problem

    def _announce(self, plan: Plan) -> None:
        """What the plan decided, told before its writes (deletions are expected from now on)."""
        for name, why in plan.delete:
            self.expect.expect_deleted(name, time.time())
            self.report.pod_deleted(name, why)
        for failure in plan.failures:
            self.counts.failed += 1
            self.report.transfer_failed(failure)
        for choice in plan.choices:
            self.report.source_chosen(choice)
        self.counts.fell_back += plan.fell_back

    async def _delete(self, name: str) -> None:
        async with self.limit:
            await self.kube.delete_pod(self.namespace, name)

    async def _create(self, name: str, assignment: c.Assignment) -> Problem | None:
        pod = self.render_pod(name, assignment)
        self.expect.expect_created(name, assignment, time.time())
        try:
            async with self.limit:
                await self.kube.create_pod(self.namespace, pod)
        except ApiException as err:
            self.expect.create_failed(name)
            if err.status in (400, 422):
                return Problem("PodRejected", f"the apiserver rejected the rendered pod: {api_message(err)}")
            if err.status == 409:  # another writer (a second operator during an upgrade) made this slot's pod
                log.info("pod %s exists already; next pass sees it", name)
                return None
            raise
        return None

    async def _assign(self, name: str, assignment: c.Assignment, version: str, promote: bool) -> None:
        patch = c.annotation_patch(assignment=assignment)
        if promote:  # one patch: label and assignment change together, or neither does
            patch["metadata"]["labels"] = {c.LABEL_ROLE: c.ROLE_REPLICA}
            self.report.standby_promoted(name)
        if version:
            patch["metadata"]["resourceVersion"] = version  # only if the pod is as we saw it
        try:
            async with self.limit:
                await self.kube.patch_pod(self.namespace, name, patch)
        except ApiException as err:
            if err.status not in (404, 409):
                raise
            log.info("assignment of %s skipped (%s); next pass decides again", name, err.status)
            return
        self.expect.expect_assigned(name, assignment, time.time())

    async def _gate(self, name: str, uid: str | None) -> None:
        if not await self._set_gate(name, "True", "WeightsVerified", "the agent verified the weights"):
            return
        self.expect.expect_gated(name, time.time())
        self.counts.completed += 1
        self.report.verified(uid)

    async def _untrust(self, name: str) -> None:
        await self._set_gate(
            name, "False", "WeightsUntrusted", "the pod's weights failed a check; it is being replaced"
        )

    async def _set_gate(self, name: str, status: str, reason: str, message: str) -> bool:
        """Write the readiness-gate condition; False when the pod is gone."""
        condition = {
            "type": c.READINESS_GATE,
            "status": status,
            "lastTransitionTime": now_rfc3339(time.time()),
            "reason": reason,
            "message": message,
        }
        async with self.limit:
            return await self.kube.set_pod_condition(self.namespace, name, condition)
