"""In-pod mode against a real kube-apiserver: assignment in, report out, retry in the same process.

No kubelet runs here: each "pod" is a real Pod object plus an agent process on its own loopback IP that
reads and patches that Pod, as it would in a cluster, and the pod's engine: the reference engine as a process
on the same IP, attached to the agent's store (the agent reports verified only once the engine proved it).
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


ENGINE_PORT = 30000


def _env(kit, control_plane, namespace: str, name: str, ip: str, model_uri: str | None = None) -> dict:
    env = {
        c.ENV_ENGINE_PORT: str(ENGINE_PORT),
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


def _engine(engines, kit, model, ip: str):
    """The pod's engine container: the reference engine on the pod's IP, attached to its agent."""
    return engines(model, f"http://{ip}:{kit.AGENT_PORT}", ip=ip, port=ENGINE_PORT)


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


def test_storage_seed_then_failed_attempt_and_retry(
    kit, agents, engines, api_client, control_plane, namespace, reference_model
):
    core = client.CoreV1Api(api_client)
    seed_ip = kit.new_ip()
    _pod(core, namespace, "seed-0", c.Assignment(attempt=1, source="storage"))
    seed = agents("run", "--device", "cpu", ip=seed_ip, env=_env(kit, control_plane, namespace, "seed-0", seed_ip,
                                                                  str(reference_model)))  # fmt: skip
    _engine(engines, kit, reference_model, seed_ip)
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
    _engine(engines, kit, reference_model, new_ip)
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
    _engine(engines, kit, reference_model, q_ip)
    _wait_report(core, namespace, "queued-0", lambda r: r.attempt == 0)  # the agent runs and reports
    time.sleep(2)
    idle = _wait_report(core, namespace, "queued-0", lambda r: True)
    assert (idle.attempt, idle.state, idle.error) == (0, "pending", None), idle
    go = good.model_copy(update={"attempt": 2, "excluded_seeds": []})
    core.patch_namespaced_pod("queued-0", namespace, c.annotation_patch(assignment=go))
    report = _wait_report(core, namespace, "queued-0", lambda r: r.attempt == 2 and r.state in ("verified", "failed"))
    assert report.state == "verified" and report.seed_pod == "seed-0", report

def test_a_restarted_agent_works_on_the_current_assignment_only(
    kit, agents, engines, api_client, control_plane, namespace, reference_model
):
    """The agent is killed while its attempt waits in a cohort that never fills; the restarted process must
    not run that attempt again (its cohort is gone): it reports it failed and waits for a new one. A newer
    assignment written while an attempt waits ends that attempt at once, and the newer one runs."""
    import signal

    core = client.CoreV1Api(api_client)
    seed_ip = kit.new_ip()
    _pod(core, namespace, "seed-0", c.Assignment(attempt=1, source="storage"))
    seed = agents("run", "--device", "cpu", ip=seed_ip, env=_env(kit, control_plane, namespace, "seed-0", seed_ip,
                                                                  str(reference_model)))  # fmt: skip
    _engine(engines, kit, reference_model, seed_ip)
    _wait_report(core, namespace, "seed-0", lambda r: r.state == "verified")

    # Rank 1 of 3: rank 2 never comes, so the group never forms. Its port lies in the seed's rendezvous ports
    # (the contract's default range), as the operator hands them out.
    def cohort(attempt: int) -> c.Assignment:
        return c.Assignment(attempt=attempt, source="seed", backend="nccl", seedPod="seed-0", seedIP=seed_ip,
                            seedAgentPort=kit.AGENT_PORT, groupPorts=[28000 + attempt], cohortId=f"c{attempt}",
                            cohortRank=1, cohortSize=3)  # fmt: skip

    ip = kit.new_ip()
    env = _env(kit, control_plane, namespace, "new-0", ip)
    _pod(core, namespace, "new-0", cohort(1))
    first = agents("run", "--device", "cpu", ip=ip, env=env)
    _engine(engines, kit, reference_model, ip)  # it outlives the agent's restart, as a container does
    _wait_report(core, namespace, "new-0", lambda r: r.attempt == 1 and r.state == "transferring" and r.bytes_total)
    time.sleep(1.0)  # its init request is in: the seed holds the pending group
    first.kill(signal.SIGKILL)

    second = agents("run", "--device", "cpu", ip=ip, env=env)
    report = _wait_report(core, namespace, "new-0", lambda r: r.attempt == 1 and r.state == "failed", timeout=60)
    assert "restarted" in report.error, report
    time.sleep(2.0)  # had it joined the old cohort again, the seed would hold a group for it now
    assert kit.metric(seed, "seedfork_agent_pending_groups") == 0
    assert "attempt 1: source" not in second.output()  # it never ran attempt 1

    core.patch_namespaced_pod("new-0", namespace, c.annotation_patch(assignment=cohort(2)))
    _wait_report(core, namespace, "new-0", lambda r: r.attempt == 2 and r.state == "transferring")
    good = c.Assignment(attempt=3, source="seed", backend="transfer_engine", seedPod="seed-0", seedIP=seed_ip,
                        seedAgentPort=kit.AGENT_PORT)  # fmt: skip
    core.patch_namespaced_pod("new-0", namespace, c.annotation_patch(assignment=good))
    written = time.monotonic()
    report = _wait_report(core, namespace, "new-0", lambda r: r.attempt == 3 and r.state in ("verified", "failed"))
    assert report.state == "verified" and report.serving, report
    # Ended by the newer assignment, not by the pending group's expiry nor the timeout (20 s here).
    assert time.monotonic() - written < 8
    assert "superseded by attempt 3" in second.output(), second.output()[-3000:]
    assert second.proc.poll() is None


def _events(core, namespace: str, pod: str) -> dict[str, str]:
    items = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}").items
    return {e.reason: e.message for e in items}


def test_engine_cache_from_the_seed_fetched_or_skipped_with_an_event(
    kit, agents, engines, api_client, control_plane, namespace, reference_model, tmp_path
):
    core = client.CoreV1Api(api_client)
    seed_ip = kit.new_ip()
    seed_cache = tmp_path / "seed-cache"
    (seed_cache / "inductor").mkdir(parents=True)
    (seed_cache / "inductor" / "k.so").write_bytes(b"\x7fELF" * 500)
    _pod(core, namespace, "seed-0", c.Assignment(attempt=1, source="storage"))
    seed_env = _env(kit, control_plane, namespace, "seed-0", seed_ip, str(reference_model))
    seed_env |= {c.ENV_ENGINE_CACHE_DIR: str(seed_cache), c.ENV_ENGINE_VERSION: "1.0"}
    agents("run", "--device", "cpu", ip=seed_ip, env=seed_env)
    _engine(engines, kit, reference_model, seed_ip)  # its /health: the engine's API is up (it finished compiling)
    _wait_report(core, namespace, "seed-0", lambda r: r.state == "verified")

    def engine_ready() -> dict | None:
        raw = core.read_namespaced_pod("seed-0", namespace).metadata.annotations.get(c.ANN_TIMING)
        timing = json.loads(raw) if raw else {}
        return timing if timing.get("engineReady") else None

    deadline = time.monotonic() + 30
    while (timing := engine_ready()) is None:  # published after the report's final state, on its own
        assert time.monotonic() < deadline, "the seed's timing never recorded its engine's API up"
        time.sleep(0.3)
    assert timing["engineReady"] >= timing["verified"]

    seed = c.Assignment(attempt=1, source="seed", backend="transfer_engine", seedPod="seed-0", seedIP=seed_ip,
                        seedAgentPort=kit.AGENT_PORT)  # fmt: skip
    cases = (("same-0", "1.0", "EngineCacheFetched"), ("other-0", "2.0", "EngineCacheSkipped"))
    for name, version, reason in cases:
        ip, cache = kit.new_ip(), tmp_path / f"{name}-cache"
        _pod(core, namespace, name, seed)
        env = _env(kit, control_plane, namespace, name, ip) | {c.ENV_ENGINE_CACHE_DIR: str(cache),
                                                                c.ENV_ENGINE_VERSION: version}  # fmt: skip
        agents("run", "--device", "cpu", ip=ip, env=env)
        _engine(engines, kit, reference_model, ip)
        report = _wait_report(core, namespace, name, lambda r: r.state in ("verified", "failed"))
        assert report.state == "verified", report  # a skipped cache never fails the pod
        events = _events(core, namespace, name)
        assert reason in events, events
        if reason == "EngineCacheFetched":
            assert (cache / "inductor" / "k.so").read_bytes() == (seed_cache / "inductor" / "k.so").read_bytes()
        else:
            assert "is not this pod's" in events[reason] and not (cache / "inductor").exists()
