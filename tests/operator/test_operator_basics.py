"""The operator on the real apiserver: first pod from storage, the pod contract, the gate, the token."""

from __future__ import annotations

import dataclasses
import time

import pytest

from seedfork_api import contract as c
from seedfork_operator.podview import PodView
from seedfork_operator.runner import OperatorThread

from .conftest import verify_at_once

pytestmark = pytest.mark.cluster


def test_first_pod_loads_from_storage_and_carries_the_contract(operator, nodes, sets, wait, namespace):
    nodes.policy = lambda pod: None  # agent silent: nothing verified yet
    sets.create("solo")
    pods = wait("one pod", lambda: sets.pods("solo"))
    assert len(pods) == 1
    pod = pods[0]
    view = PodView.from_pod(pod)
    assert view.assignment is not None and view.assignment.source == "storage" and view.assignment.attempt == 1
    meta = pod["metadata"]
    assert meta["labels"][c.LABEL_SET] == "solo"
    assert meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY
    owner = meta["ownerReferences"][0]
    assert owner["kind"] == "ModelReplicaSet" and owner["controller"] is True
    assert owner["uid"] == sets.get("solo")["metadata"]["uid"]
    assert {"conditionType": c.READINESS_GATE} in pod["spec"]["readinessGates"]
    names = [ct["name"] for ct in pod["spec"]["containers"]]
    assert names == ["engine", "seedfork-agent"]
    for ct in pod["spec"]["containers"]:
        env = {e["name"]: e for e in ct["env"]}
        assert set(c.ALL_ENV) - {c.ENV_BANDWIDTH_LIMIT_MBPS} <= set(env)
        token = env[c.ENV_TOKEN]
        assert "value" not in token  # never a literal
        secret = token["valueFrom"]["secretKeyRef"]
        assert secret == {"name": "solo-seedfork-token", "key": "token"}
    # the per-set token Secret exists and belongs to the set
    got = sets.core.read_namespaced_secret("solo-seedfork-token", namespace)
    assert got.data["token"] and got.metadata.owner_references[0].name == "solo"

    status = wait("status", lambda: sets.get("solo").get("status", {}).get("replicas") == 1 and sets.get("solo"))
    st = status["status"]
    assert st["selector"] == f"{c.LABEL_SET}=solo,{c.LABEL_ROLE}!={c.ROLE_STANDBY}"  # standbys are no replicas
    assert st["tokenSecret"] == "solo-seedfork-token"
    assert st["readyReplicas"] == 0
    assert st["observedGeneration"] == status["metadata"]["generation"]
    assert {x["type"] for x in st["conditions"]} == {"Available", "Progressing", "Degraded"}
    assert not any(k.startswith("kopf") for k in st)


def test_gate_holds_until_the_current_attempt_is_verified(operator, nodes, sets, wait):
    reports = {}
    nodes.policy = lambda pod: reports.get(pod.name)
    sets.create("gated")
    pod = wait("pod", lambda: sets.views("gated"))[0]
    wait("pod IP", lambda: sets.views("gated")[0].ip)
    # a verified report for an OLDER attempt must not open the gate
    reports[pod.name] = c.AgentReport(attempt=0, state="verified", serving=True)
    import time

    time.sleep(1.5)
    assert not sets.views("gated")[0].gate
    reports[pod.name] = c.AgentReport(attempt=1, state="transferring", bytesDone=5, bytesTotal=10)
    time.sleep(1.5)
    view = sets.views("gated")[0]
    assert not view.gate and not view.ready
    reports[pod.name] = c.AgentReport(attempt=1, state="verified", serving=True)
    wait("gate", lambda: sets.views("gated")[0].gate)
    wait("PodReady", lambda: sets.views("gated")[0].ready)
    st = wait("ready in status", lambda: sets.get("gated")["status"]["readyReplicas"] == 1 and sets.get("gated"))
    assert st["status"]["transfers"]["completed"] == 1
    assert {x["type"]: x["status"] for x in st["status"]["conditions"]}["Available"] == "True"


def test_a_scale_request_after_a_quiet_spell_is_acted_on_without_the_debounce(
    crd, namespace, operator_config, nodes, sets, wait
):
    # A debounce far longer than a pass: were every wake-up made to wait it, the new pod would follow the scale
    # request no sooner than 1.5 s. Events right after a pass still wait it (a burst settles into one pass), so
    # the first pod's start (passes whose own writes wake the next) takes a few debounces to go quiet. The scale
    # request is no urgent event (that is a verified pod without its gate: the test below).
    config = dataclasses.replace(operator_config, debounce=1.5, interval=60.0)
    with OperatorThread([namespace], config):
        sets.create("quiet")
        wait("first pod Ready", lambda: any(v.ready for v in sets.views("quiet")), timeout=30)
        time.sleep(8.0)  # every event of the pod's start is handled: the set is quiet
        sets.scale("quiet", 2)
        scaled = time.monotonic()
        wait("second pod", lambda: len(sets.views("quiet")) == 2, timeout=30, every=0.02)
        assert time.monotonic() - scaled < 1.0


def test_a_verified_pod_gets_its_gate_without_waiting_for_a_burst_to_settle(
    crd, namespace, operator_config, nodes, sets, wait
):
    # The report lands amid the events of the pod's own start, each pass's writes waking the next: were the
    # verified pod's wake-up made to wait the debounce like theirs, its gate would follow 3 s or more later.
    config = dataclasses.replace(operator_config, debounce=3.0, interval=60.0)
    reported: list[float] = []

    def verify_once_placed(pod: PodView) -> c.AgentReport | None:
        report = verify_at_once(pod) if pod.ip else None
        if report is not None and not reported:
            reported.append(time.monotonic())
        return report

    nodes.policy = verify_once_placed
    with OperatorThread([namespace], config):
        sets.create("burst")
        wait("gate", lambda: any(v.gate for v in sets.views("burst")), timeout=30, every=0.02)
        assert time.monotonic() - reported[0] < 1.5
