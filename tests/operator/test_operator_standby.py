"""Standby pods on the real apiserver: created with their role, promoted on scale-up, refilled, replaced."""

from __future__ import annotations

import pytest

from seedfork_api import contract as c
from seedfork_operator.render import selector
from seedfork_operator.runner import OperatorThread

from .conftest import verify_at_once

pytestmark = pytest.mark.cluster


def standby_agent(pod):
    """Agent double: a standby's engine comes up warm; any other assignment verifies at once."""
    a = pod.assignment
    if a is not None and a.source == "standby":
        return c.AgentReport(attempt=a.attempt, state="standby", source="standby")
    return verify_at_once(pod)


def with_standby(sets, name: str, replicas: int, standby: int) -> None:
    sets.create(name, replicas)
    sets.objects.patch_namespaced_custom_object(
        "seedfork.io", "v1alpha1", sets.namespace, "modelreplicasets", name, {"spec": {"standby": standby}}
    )


def roles(sets, name):
    return {p["metadata"]["name"]: p["metadata"]["labels"].get(c.LABEL_ROLE) for p in sets.pods(name)
            if not p["metadata"].get("deletionTimestamp")}  # fmt: skip


def test_standby_is_kept_warm_promoted_on_scale_up_and_refilled(operator, nodes, sets, wait):
    nodes.policy = standby_agent
    with_standby(sets, "warm", replicas=1, standby=1)
    status = wait("1 replica + 1 warm standby", lambda: (s := sets.get("warm").get("status", {}))
                  .get("readyReplicas") == 1 and s.get("standbyWarm") == 1 and s)  # fmt: skip
    assert status["replicas"] == 1 and status["standby"] == 1  # the standby is no replica
    assert status["selector"] == selector("warm")
    views = {v.name: v for v in sets.views("warm")}
    (spare,) = [v for v in views.values() if v.standby]
    (replica,) = [v for v in views.values() if not v.standby]
    assert roles(sets, "warm") == {spare.name: c.ROLE_STANDBY, replica.name: c.ROLE_REPLICA}
    assert not spare.ready and not spare.gate

    sets.scale("warm", 2)
    promoted = wait("the standby promoted", lambda: next(
        (v for v in sets.views("warm") if v.name == spare.name and v.ready), None))  # fmt: skip
    a = promoted.assignment
    assert (a.source, a.seed_pod, a.attempt) == ("seed", replica.name, 2)  # weights from the replica, not storage
    assert roles(sets, "warm")[spare.name] == c.ROLE_REPLICA
    status = wait("refilled", lambda: (s := sets.get("warm")["status"]).get("standbyWarm") == 1
                  and s.get("readyReplicas") == 2 and s)  # fmt: skip
    assert status["replicas"] == 2
    new = [n for n, r in roles(sets, "warm").items() if r == c.ROLE_STANDBY]
    assert len(new) == 1 and new[0] not in (spare.name, replica.name)
    assert ("StandbyPromoted", f"standby {spare.name} promoted") in sets.events()


def test_failed_standby_is_replaced_and_never_made_ready(operator, nodes, sets, wait):
    failing: set[str] = set()

    def agent(pod):
        a = pod.assignment
        if a is not None and a.source == "standby" and pod.uid in failing:
            return c.AgentReport(attempt=a.attempt, state="failed", source="standby", error="engine stopped answering")
        return standby_agent(pod)

    nodes.policy = agent
    with_standby(sets, "dies", replicas=1, standby=1)
    wait("warm", lambda: sets.get("dies").get("status", {}).get("standbyWarm") == 1)
    (spare,) = [v for v in sets.views("dies") if v.standby]
    failing.add(spare.uid)

    def successor():  # the replacement takes the freed slot, so the same name: a new uid
        views = [v for v in sets.views("dies") if v.standby and not v.deleting and v.uid != spare.uid]
        return views and views[0]

    new = wait("replaced", successor)
    wait("the successor warm", lambda: sets.get("dies")["status"].get("standbyWarm") == 1
         and all(v.uid != spare.uid for v in sets.views("dies")))  # fmt: skip
    assert new.name == spare.name
    assert any(r == "PodDeleted" and "standby failed: engine stopped answering" in m for r, m in sets.events())
    assert sets.get("dies")["status"]["readyReplicas"] == 1


def test_operator_restart_during_promotion_keeps_one_promotion(crd, namespace, operator_config, nodes, sets, wait):
    """The promotion lives in the pod (assignment + label): a new operator continues it, promoting nobody else."""
    nodes.policy = standby_agent
    with OperatorThread([namespace], operator_config):
        with_standby(sets, "restart", replicas=1, standby=1)
        wait("warm", lambda: sets.get("restart").get("status", {}).get("standbyWarm") == 1)
    (spare,) = [v.name for v in sets.views("restart") if v.standby]
    held: set[str] = set()

    def slow(pod):  # the promoted pod's transfer runs while the operator is replaced
        a = pod.assignment
        if a is not None and a.source == "seed" and pod.name in held:
            return c.AgentReport(attempt=a.attempt, state="transferring", source="seed", seed_pod=a.seed_pod)
        return standby_agent(pod)

    held.add(spare)
    nodes.policy = slow
    with OperatorThread([namespace], operator_config):
        sets.scale("restart", 2)
        wait("promoted", lambda: roles(sets, "restart").get(spare) == c.ROLE_REPLICA)
    with OperatorThread([namespace], operator_config):
        held.clear()
        wait("Ready", lambda: sets.get("restart")["status"].get("readyReplicas") == 2
             and sets.get("restart")["status"].get("standbyWarm") == 1)  # fmt: skip
        views = [v for v in sets.views("restart") if not v.deleting]
        assert len(views) == 3 and sum(v.standby for v in views) == 1
        mine = next(v for v in views if v.name == spare)
        assert mine.assignment.attempt == 2  # the one promotion, continued; not promoted twice
