"""Bad input the schema cannot catch: Degraded + Event, no crash, no pods; foreign pods untouched."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import pytest

from seedfork_api import contract as c
from seedfork_api import spec as api

from .conftest import free_port

pytestmark = pytest.mark.cluster


def condition(sets, name, kind):
    conds = {x["type"]: x for x in (sets.get(name).get("status") or {}).get("conditions", [])}
    return conds.get(kind)


def test_missing_named_token_secret_degrades_until_it_exists(operator, nodes, sets, wait, namespace):
    sets.create("locked", replicas=2, tokenSecretName="team-token")
    degraded = wait("Degraded", lambda: (d := condition(sets, "locked", "Degraded")) and d["status"] == "True" and d)
    assert degraded["reason"] == "TokenSecretMissing"
    assert "team-token" in degraded["message"] and namespace in degraded["message"]
    # kopf posts events from a queue of its own: the condition can land first
    wait("event", lambda: any(r == "TokenSecretMissing" for r, _ in sets.events()))
    time.sleep(1.2)  # several passes
    assert sets.pods("locked") == []

    token = base64.b64encode(b"s3cret").decode()
    sets.core.create_namespaced_secret(namespace, {"metadata": {"name": "team-token"}, "data": {"token": token}})
    wait("2 ready", lambda: sum(v.ready for v in sets.views("locked")) == 2)
    wait("recovered", lambda: condition(sets, "locked", "Degraded")["status"] == "False")
    env = {e["name"]: e for e in sets.pods("locked")[0]["spec"]["containers"][0]["env"]}
    assert env[c.ENV_TOKEN]["valueFrom"]["secretKeyRef"]["name"] == "team-token"
    assert sets.get("locked")["status"]["tokenSecret"] == "team-token"


def test_template_without_containers_degrades_and_foreign_pods_are_left_alone(operator, nodes, sets, wait, namespace):
    # a pod that looks like ours but is not owned by any set: the operator must never touch it
    foreign = {
        "metadata": {
            "name": "user-pod",
            "labels": {c.LABEL_SET: "empty", c.LABEL_MANAGED_BY: c.MANAGED_BY},
        },
        "spec": {"containers": [{"name": "x", "image": "busybox"}]},
    }
    sets.core.create_namespaced_pod(namespace, foreign)
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "empty"},
        "spec": {
            "replicas": 0,
            "model": {"name": "m", "uri": "/m"},
            "engine": {"kind": "reference"},
            "template": {"spec": {"containers": []}},
        },
    }
    sets.create_body(body)
    degraded = wait("Degraded", lambda: (d := condition(sets, "empty", "Degraded")) and d["status"] == "True" and d)
    assert degraded["reason"] == "InvalidTemplate" and "containers is empty" in degraded["message"]
    sets.scale("empty", 2)
    time.sleep(1.5)
    names = [p["metadata"]["name"] for p in sets.pods("empty")]
    assert names == ["user-pod"]  # nothing created, the foreign pod neither adopted nor deleted
    assert sets.get("empty")["status"]["replicas"] == 0


def test_pod_the_apiserver_rejects_degrades_with_its_message(operator, nodes, sets, wait):
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "rejected"},
        "spec": {
            "replicas": 1,
            "model": {"name": "m", "uri": "/m"},
            "engine": {"kind": "reference"},
            "template": {"spec": {"containers": [{"name": "Not_A_DNS_Label", "image": "x"}]}},
        },
    }
    sets.create_body(body)
    degraded = wait("Degraded", lambda: (d := condition(sets, "rejected", "Degraded")) and d["status"] == "True" and d)
    assert degraded["reason"] == "PodRejected" and "Not_A_DNS_Label" in degraded["message"]
    assert sets.pods("rejected") == []


def test_console_script_runs_the_operator_as_a_process(crd, nodes, sets, wait, namespace, control_plane):
    """`seedfork-operator --namespace X` with KUBECONFIG set, as the demo and the Helm chart run it."""
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig), "SEEDFORK_RECONCILE_INTERVAL": "0.5"}
    cmd = [sys.executable, "-m", "seedfork_operator", "--namespace", namespace, "--standalone"]
    proc = subprocess.Popen([*cmd, "--metrics-port", str(port)], env=env, start_new_session=True)
    try:
        sets.create("proc", replicas=2)
        wait("2 ready", lambda: sum(v.ready for v in sets.views("proc")) == 2, timeout=40)
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_policy_the_engine_cannot_run_degrades_the_set_with_the_reason(operator, nodes, sets, wait):
    spec = {
        "replicas": 1,
        "model": {"name": "test/tiny-llama"},
        "engine": {"kind": "sglang", "parallelism": {"tp": 1, "pp": 2}},
        "transfer": {"backend": "auto"},  # auto resolves to TransferEngine: SGLang cannot with pp 2
        "template": {"spec": {"containers": [{"name": "engine", "image": "e", "command": ["sglang"]}]}},
    }
    sets.create_body({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "pp2"}, "spec": spec})
    degraded = wait("Degraded", lambda: (d := condition(sets, "pp2", "Degraded")) and d["status"] == "True" and d)
    assert degraded["reason"] == "InvalidTransferPolicy" and "pp 1" in degraded["message"]
    assert sets.pods("pp2") == []
