"""The harness reads the pod contract as the operator does, against a real kube-apiserver.

``PodTracker`` records every time a pod is Ready without verified weights, and the e2e tests assert that list
stays empty: if it read a pod differently from the operator, a pod the operator rightly made Ready would be
a false violation.
"""

from __future__ import annotations

import time

from kubernetes import client

from seedfork_api import contract as c
from seedfork_localdev.pods import PodRow, PodTracker
from seedfork_localdev.waiting import wait_until
from seedfork_operator.podview import PodView

SET = "tracked"


def _ready_pod(core: client.CoreV1Api, namespace: str, name: str, assignment: c.Assignment, report: c.AgentReport):
    """A pod of the set carrying the given contract annotations, with Ready and the gate True."""
    annotations = c.annotation_patch(assignment=assignment, report=report)["metadata"]["annotations"]
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": name, "labels": {c.LABEL_SET: SET}, "annotations": annotations},
            "spec": {"containers": [{"name": "engine", "image": "unused"}]},
        },
    )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conditions = [{"type": kind, "status": "True", "lastTransitionTime": now} for kind in ("Ready", c.READINESS_GATE)]
    core.patch_namespaced_pod_status(name, namespace, {"status": {"conditions": conditions}})


def test_a_verified_report_of_a_superseded_attempt_is_no_violation(api_client, namespace):
    # The operator moved the pod to attempt 2 (its seed was judged gone) just as the agent verified attempt 1:
    # the operator counts those weights as verified and makes the pod Ready; the harness must agree.
    core = client.CoreV1Api(api_client)
    retried = c.Assignment(attempt=2, source="seed", backend="nccl", seedPod="seed-b", excludedSeeds=["seed-a"])
    verified = c.AgentReport(attempt=1, state="verified", source="seed", seedPod="seed-a", bytesDone=7, bytesTotal=7)
    # A pod Ready while its current attempt is still transferring is a real violation: the tracker must see it.
    transferring = c.AgentReport(attempt=2, state="transferring", source="seed", seedPod="seed-b")
    with PodTracker(api_client, namespace, SET) as tracker:
        _ready_pod(core, namespace, "superseded", retried, verified)
        _ready_pod(core, namespace, "unverified", retried, transferring)
        wait_until(lambda: {"superseded", "unverified"} <= set(tracker.times), 30, "the tracker to see both pods",
                   diagnose=lambda: str(tracker.times))  # fmt: skip
        wait_until(lambda: all("ready" in tracker.times[n] for n in ("superseded", "unverified")), 30,
                   "the tracker to see both pods Ready", diagnose=lambda: str(tracker.times))  # fmt: skip
        pods = tracker.snapshot()

    assert PodView.from_pod(pods["superseded"]).verified
    row = PodRow.from_pod(pods["superseded"])
    assert row.state == "verified" and row.bytes_done == row.bytes_total == 7, row
    assert not PodView.from_pod(pods["unverified"]).verified
    assert PodRow.from_pod(pods["unverified"]).state == "transferring"
    assert {v.split()[0] for v in tracker.violations} == {"unverified"}, tracker.violations
