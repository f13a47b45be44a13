"""One set, one digest; seeds that fail are taken out; storage loads that keep failing back off.

The operator on the real apiserver, the node double playing kubelet and agent (tests/operator/conftest.py).
"""

from __future__ import annotations

import time

import pytest
from kubernetes.client.rest import ApiException

from seedfork_api import contract as c
from seedfork_api import spec as api

from .conftest import verify_at_once

pytestmark = pytest.mark.cluster

GOOD, OTHER = "a" * 64, "b" * 64


def with_digest(digest):
    def agent(pod):
        report = verify_at_once(pod)
        return report.model_copy(update={"digest": digest}) if report else None

    return agent


def condition(sets, name, kind):
    conds = {x["type"]: x for x in (sets.get(name).get("status") or {}).get("conditions", [])}
    return conds.get(kind)


def test_a_pod_that_verified_other_bytes_is_never_ready_nor_a_seed(operator, nodes, sets, wait):
    nodes.policy = with_digest(GOOD)
    sets.create("one", replicas=1, backend="transfer_engine")
    wait("first load recorded", lambda: sets.get("one").get("status", {}).get("weightsDigest") == GOOD)
    first = sets.views("one")[0]

    # The next pod verifies other bytes (the storage behind model.uri changed); its successor verifies GOOD.
    bad: dict[str, list[bool]] = {}

    def agent(pod):
        if pod.uid != first.uid and (not bad or pod.uid in bad):
            bad.setdefault(pod.uid, []).append(pod.gate or pod.ready)
            return with_digest(OTHER)(pod)
        return with_digest(GOOD)(pod)

    nodes.policy = agent
    sets.scale("one", 2)
    wait("the mismatch is reported", lambda: any(r == "WeightsDigestMismatch" for r, _ in sets.events()))
    message = next(m for r, m in sets.events() if r == "WeightsDigestMismatch")
    assert GOOD in message and OTHER in message
    wait("2 ready", lambda: sum(v.ready for v in sets.views("one")) == 2 and len(sets.views("one")) == 2)
    (bad_uid,) = bad
    assert bad_uid not in {v.uid for v in sets.views("one")}  # replaced
    assert not any(bad[bad_uid]), "the pod with other bytes was gated or Ready"
    status = wait("both seed", lambda: (st := sets.get("one")["status"])["seeds"] == 2 and st)
    assert status["weightsDigest"] == GOOD
    assert all(v.report.digest == GOOD for v in sets.views("one"))
    # nobody was ever assigned the bad pod as its seed
    assert all(v.assignment.seed_pod in (None, first.name) for v in sets.views("one"))


def test_model_uri_is_immutable_once_the_set_has_verified_weights(operator, nodes, sets, wait):
    nodes.policy = lambda pod: None  # nothing verifies yet
    sets.create("moving", replicas=1)
    patch = {"spec": {"model": {"uri": "/models/fixed-typo"}}}
    sets.objects.patch_namespaced_custom_object(api.GROUP, api.VERSION, sets.namespace, api.PLURAL, "moving", patch)

    nodes.policy = with_digest(GOOD)
    wait("digest recorded", lambda: sets.get("moving").get("status", {}).get("weightsDigest") == GOOD)
    patch = {"spec": {"model": {"uri": "/models/other-bytes"}}}
    with pytest.raises(ApiException) as err:
        sets.objects.patch_namespaced_custom_object(api.GROUP, api.VERSION, sets.namespace, api.PLURAL, "moving", patch)
    assert err.value.status == 422
    assert "spec.model.uri is immutable once the set has verified weights" in err.value.body
    assert sets.get("moving")["spec"]["model"]["uri"] == "/models/fixed-typo"


def test_a_seed_that_fails_its_own_check_is_replaced(operator, nodes, sets, wait):
    sets.create("selfcheck", replicas=1)
    wait("seed", lambda: sets.get("selfcheck").get("status", {}).get("seeds") == 1)
    seed = sets.views("selfcheck")[0]

    def agent(pod):
        if pod.uid == seed.uid:
            a = pod.assignment
            error = f"{c.ERR_SELF_CHECK_FAILED}: 1 of 21 tensors differ, first lm_head.weight"
            return c.AgentReport(attempt=a.attempt, state="failed", source=a.source, error=error, selfChecks=1)
        return verify_at_once(pod)

    nodes.policy = agent
    wait("seed replaced", lambda: seed.uid not in {v.uid for v in sets.views("selfcheck")})
    wait("successor ready", lambda: sum(v.ready for v in sets.views("selfcheck")) == 1)
    wait("event", lambda: any(r == "PodDeleted" and c.ERR_SELF_CHECK_FAILED in m for r, m in sets.events()))


def test_a_storage_load_that_keeps_failing_backs_off_and_degrades(crd, nodes, sets, wait, namespace, operator_config):
    from dataclasses import replace

    from seedfork_operator.runner import OperatorThread

    seen: set[str] = set()

    def agent(pod):
        seen.add(pod.uid)
        a = pod.assignment
        error = "loading /models/typo failed: FileNotFoundError: no safetensors files"
        return c.AgentReport(attempt=a.attempt, state="failed", source="storage", error=error) if a else None

    nodes.policy = agent
    config = replace(operator_config, storage_backoff=1.0, storage_backoff_cap=60.0)
    with OperatorThread([namespace], config):
        sets.create("typo", replicas=1)
        wait("Degraded", lambda: (d := condition(sets, "typo", "Degraded")) and d["status"] == "True")
        start = time.monotonic()
        time.sleep(10)
        created = len(seen)
        elapsed = time.monotonic() - start
    degraded = condition(sets, "typo", "Degraded")
    assert degraded["reason"] == "StorageLoadFailing"
    assert "/models/typo" in degraded["message"]
    # 1 s, 2 s, 4 s, 8 s between failures: at most 5 pods in these ~11 s (without backoff: one per pass).
    assert created <= 5, f"{created} pods in {elapsed:.0f}s"
