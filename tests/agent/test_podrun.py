"""In-pod mode against a real kube-apiserver: assignment in, report out, retry in the same process.

No kubelet runs here: each "pod" is a real Pod object plus an agent process on
its own loopback IP that reads and patches that Pod, as it would in a cluster.
"""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client

from seedfork_api import contract as c

pytestmark = pytest.mark.cluster


def _pod(core, namespace: str, name: str, assignment: c.Assignment | None) -> None:
    annotations = {c.ANN_ASSIGNMENT: assignment.to_json()} if assignment else {}
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{"name": "engine", "image": "seedfork/agent:test"}]},
        },
    )


def _env(kit, control_plane, namespace: str, name: str, ip: str, model_uri: str | None = None) -> dict:
    env = {
        c.ENV_POD_NAME: name,
        c.ENV_POD_NAMESPACE: namespace,
        c.ENV_POD_IP: ip,
        c.ENV_SET: "demo",
        c.ENV_FINGERPRINT: "fp-test",
        c.ENV_AGENT_PORT: str(kit.AGENT_PORT),
        c.ENV_TIMEOUT_SECONDS: "20",
        c.ENV_TOKEN: kit.TOKEN,
        "KUBECONFIG": str(control_plane.kubeconfig),
    }
    if model_uri:
        env[c.ENV_MODEL_URI] = model_uri
    return env


def _wait_report(core, namespace, name, predicate, timeout=90) -> c.AgentReport:
    deadline = time.monotonic() + timeout
    report = None
    while time.monotonic() < deadline:
        pod = core.read_namespaced_pod(name, namespace)
        report = c.AgentReport.from_annotations(pod.metadata.annotations)
        if report and predicate(report):
            return report
        time.sleep(0.3)
    raise AssertionError(f"pod {name}: report never matched; last {report}")


def test_storage_seed_then_failed_attempt_and_retry(kit, agents, api_client, control_plane, namespace, weights_dir):
    core = client.CoreV1Api(api_client)
    seed_ip = kit.new_ip()
    _pod(core, namespace, "seed-0", c.Assignment(attempt=1, source="storage"))
    seed = agents("run", "--device", "cpu", ip=seed_ip, env=_env(kit, control_plane, namespace, "seed-0", seed_ip,
                                                                  str(weights_dir)))  # fmt: skip
    report = _wait_report(core, namespace, "seed-0", lambda r: r.state in ("verified", "failed"))
    assert report.state == "verified" and report.serving and report.bytes_done == report.bytes_total > 0, report
    timing = json.loads(core.read_namespaced_pod("seed-0", namespace).metadata.annotations[c.ANN_TIMING])
    assert timing["verified"] >= timing["transferStart"] and timing["bytes"] == report.bytes_total

    # A new pod is first sent to a seed that does not answer, then (attempt 2) to the real one.
    new_ip, dead_ip = kit.new_ip(), kit.new_ip()
    bad = c.Assignment(attempt=1, source="seed", backend="nccl", seedPod="gone", seedIP=dead_ip,
                       seedAgentPort=kit.AGENT_PORT, groupPorts=[kit.new_port()])  # fmt: skip
    _pod(core, namespace, "new-0", bad)
    agent = agents("run", "--device", "cpu", ip=new_ip, env=_env(kit, control_plane, namespace, "new-0", new_ip))
    failed = _wait_report(core, namespace, "new-0", lambda r: r.state == "failed")
    assert failed.attempt == 1 and "unreachable" in failed.error and not failed.serving
    good = c.Assignment(attempt=2, source="seed", backend="transfer_engine", seedPod="seed-0", seedIP=seed_ip,
                        seedAgentPort=kit.AGENT_PORT, excludedSeeds=["gone"])  # fmt: skip
    core.patch_namespaced_pod("new-0", namespace, c.annotation_patch(assignment=good))
    report = _wait_report(core, namespace, "new-0", lambda r: r.attempt == 2 and r.state in ("verified", "failed"))
    assert report.state == "verified" and report.serving and report.seed_pod == "seed-0", report
    assert report.backend == "transfer_engine" and report.bytes_done == report.bytes_total > 0
    assert agent.proc.poll() is None  # the retry ran in the same process
    assert agent.tensors().keys() == seed.tensors().keys()
    for name, t in seed.tensors().items():
        assert t.view(-1).view(-1).equal(agent.tensors()[name].view(-1)), name

    # A queued pod's agent waits: it starts nothing until the assignment that names a source.
    q_ip = kit.new_ip()
    queued = c.Assignment(attempt=1, source="queued", waitUntil=time.time() + 60)
    _pod(core, namespace, "queued-0", queued)
    agents("run", "--device", "cpu", ip=q_ip, env=_env(kit, control_plane, namespace, "queued-0", q_ip))
    _wait_report(core, namespace, "queued-0", lambda r: r.attempt == 0)  # the agent runs and reports
    time.sleep(2)
    idle = _wait_report(core, namespace, "queued-0", lambda r: True)
    assert (idle.attempt, idle.state, idle.error) == (0, "pending", None), idle
    go = good.model_copy(update={"attempt": 2, "excluded_seeds": []})
    core.patch_namespaced_pod("queued-0", namespace, c.annotation_patch(assignment=go))
    report = _wait_report(core, namespace, "queued-0", lambda r: r.attempt == 2 and r.state in ("verified", "failed"))
    assert report.state == "verified" and report.seed_pod == "seed-0", report
