"""``seedfork-agent run -- <sglang command>`` against a real kube-apiserver: the agent launches SGLang per
assignment, supervises it and reports on its own pod; SGLang moves its own bytes.

SGLang cannot run here (no GPU): the command is ``sglang_double.py``, the double of SGLang's HTTP surface
and R-Fork flag handling built from docs/sglang.md ("Flags and resolution": flags and silent fallbacks;
"What the supervisor reads": ``/health``, ``/server_info``, ``/weights_checker``; TransferEngine info).
No kubelet runs: each "pod" is a real Pod object plus the agent process on its own loopback IP, reading and
patching that Pod.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from kubernetes import client

from seedfork_api import contract as c

pytestmark = pytest.mark.cluster

DOUBLE = Path(__file__).with_name("sglang_double.py")


def _pod(core, namespace: str, name: str, assignment: c.Assignment) -> None:
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": name, "annotations": {c.ANN_ASSIGNMENT: assignment.to_json()}},
            "spec": {"containers": [{"name": "engine", "image": "sglang-with-seedfork:test"}]},
        },
    )


def _env(h, control_plane, namespace: str, name: str, ip: str, port: int, **extra: str) -> dict:
    return {
        c.ENV_POD_NAME: name,
        c.ENV_POD_NAMESPACE: namespace,
        c.ENV_POD_IP: ip,
        c.ENV_SET: "demo",
        c.ENV_FINGERPRINT: "fp-test",
        c.ENV_ENGINE: "sglang",
        c.ENV_ENGINE_PORT: str(port),
        c.ENV_BACKEND: "transfer_engine",
        c.ENV_TP: "1",
        c.ENV_TIMEOUT_SECONDS: "60",
        c.ENV_TOKEN: h.TOKEN,
        "KUBECONFIG": str(control_plane.kubeconfig),
        **extra,
    }


def _run(procs, tiny_model: Path, name: str, env: dict, *engine_flags: str):
    command = [sys.executable, str(DOUBLE), "--model-path", str(tiny_model), *engine_flags]
    return procs.start(["-m", "seedfork_agent", "run", "--", *command], name, env)


def _wait_report(core, namespace, name, predicate, proc, procs, timeout=120) -> c.AgentReport:
    deadline = time.monotonic() + timeout
    report = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"agent of {name} exited {proc.returncode}:\n{procs.log(proc)[-3000:]}")
        report = c.AgentReport.from_annotations(core.read_namespaced_pod(name, namespace).metadata.annotations)
        if report and predicate(report):
            return report
        time.sleep(0.3)
    raise AssertionError(f"pod {name}: report never matched; last {report}\n{procs.log(proc)[-3000:]}")


def _final(attempt: int):
    return lambda r: r.attempt == attempt and r.state in ("verified", "failed")


def _resolved(ip: str, port: int) -> dict:
    """What the SGLang the agent launched resolved (its /server_info)."""
    return httpx.get(f"http://{ip}:{port}/server_info", timeout=10).json()


def _start_seed(h, procs, core, control_plane, namespace, tiny_model) -> tuple[str, int]:
    ip = h.loopback_ip()
    port = h.free_port(ip)
    _pod(core, namespace, "seed-0", c.Assignment(attempt=1, source="storage"))
    agent = _run(procs, tiny_model, "seed-0", _env(h, control_plane, namespace, "seed-0", ip, port))
    report = _wait_report(core, namespace, "seed-0", _final(1), agent, procs)
    assert report.state == "verified" and report.serving and report.source == "storage", report
    assert _resolved(ip, port)["remote_instance_weight_loader_start_seed_via_transfer_engine"] is True
    return ip, port


def test_seed_and_te_client_verified_and_stopped_with_the_pod(h, procs, api_client, control_plane, namespace,
                                                              tiny_model):  # fmt: skip
    core = client.CoreV1Api(api_client)
    seed_ip, port = _start_seed(h, procs, core, control_plane, namespace, tiny_model)
    timing = c.PodTiming.model_validate_json(core.read_namespaced_pod("seed-0", namespace).metadata.annotations[
        c.ANN_TIMING])  # fmt: skip
    assert timing.verified >= timing.transfer_start >= timing.started

    ip = h.loopback_ip()
    assignment = c.Assignment(attempt=1, source="seed", backend="transfer_engine", seedPod="seed-0", seedIP=seed_ip)
    _pod(core, namespace, "new-0", assignment)
    agent = _run(procs, tiny_model, "new-0", _env(h, control_plane, namespace, "new-0", ip, port))
    report = _wait_report(core, namespace, "new-0", _final(1), agent, procs)
    assert report.state == "verified", report
    assert report.source == "seed" and report.seed_pod == "seed-0" and report.backend == "transfer_engine"
    assert not report.serving  # SGLang 0.5.x does not republish TransferEngine-loaded weights: never a seed
    # one set, one digest: both report the digest of the same /weights_checker sums
    seed_report = c.AgentReport.from_annotations(core.read_namespaced_pod("seed-0", namespace).metadata.annotations)
    assert report.digest and report.digest == seed_report.digest
    resolved = _resolved(ip, port)
    assert resolved["load_format"] == "remote_instance" and resolved["remote_instance_weight_loader_seed_instance_ip"]
    assert resolved["remote_instance_weight_loader_seed_instance_ip"] == seed_ip

    # The pod stops: the agent stops its SGLang (in its own session) before it exits.
    os.killpg(agent.pid, signal.SIGTERM)
    agent.wait(60)
    with pytest.raises(OSError):
        socket.create_connection((ip, port), timeout=5).close()


def test_fallback_to_disk_fails_then_the_next_attempt_relaunches(h, procs, api_client, control_plane, namespace,
                                                                 tiny_model, tmp_path):  # fmt: skip
    core = client.CoreV1Api(api_client)
    seed_ip, port = _start_seed(h, procs, core, control_plane, namespace, tiny_model)

    # This pod's image lacks Mooncake: SGLang's validate_transfer_engine() fails and it silently loads
    # from disk (docs/sglang.md, "Flags and resolution"). The agent must catch that and report failed, not verified.
    shadow = tmp_path / "shadow" / "mooncake"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('mooncake not installed in this image')\n")
    ip = h.loopback_ip()
    te = c.Assignment(attempt=1, source="seed", backend="transfer_engine", seedPod="seed-0", seedIP=seed_ip)
    _pod(core, namespace, "new-0", te)
    env = _env(h, control_plane, namespace, "new-0", ip, port, PYTHONPATH=str(shadow.parent))
    agent = _run(procs, tiny_model, "new-0", env)
    failed = _wait_report(core, namespace, "new-0", _final(1), agent, procs)
    assert failed.state == "failed" and "fell back to loading from disk" in failed.error, failed
    assert not failed.serving and failed.seed_pod == "seed-0"
    with pytest.raises(OSError):  # the fallen-back SGLang was stopped, not left holding the GPU
        socket.create_connection((ip, port), timeout=5).close()

    # The operator re-assigns (attempt 2, NCCL with a group port): SGLang is relaunched in the same container.
    nccl = c.Assignment(attempt=2, source="seed", backend="nccl", seedPod="seed-0", seedIP=seed_ip,
                        groupPorts=[h.free_port(seed_ip)], excludedSeeds=[])  # fmt: skip
    core.patch_namespaced_pod("new-0", namespace, c.annotation_patch(assignment=nccl))
    report = _wait_report(core, namespace, "new-0", _final(2), agent, procs)
    assert report.state == "verified" and report.error is None, report
    assert report.backend == "nccl" and report.serving  # an NCCL-loaded SGLang can seed
    assert agent.poll() is None  # the same agent process
    resolved = _resolved(ip, port)
    assert resolved["remote_instance_weight_loader_backend"] == "nccl"
    assert resolved["remote_instance_weight_loader_send_weights_group_ports"] == list(nccl.group_ports)


def test_a_layout_sglang_cannot_fork_is_reported_failed(h, procs, api_client, control_plane, namespace, tiny_model):
    core = client.CoreV1Api(api_client)
    ip = h.loopback_ip()
    port = h.free_port(ip)
    _pod(core, namespace, "dp-0", c.Assignment(attempt=1, source="storage"))
    agent = _run(procs, tiny_model, "dp-0", _env(h, control_plane, namespace, "dp-0", ip, port), "--dp-size", "2")
    report = _wait_report(core, namespace, "dp-0", _final(1), agent, procs)
    assert report.state == "failed" and "--dp-size 2: data parallel size above 1" in report.error, report
    assert agent.poll() is None  # waits for the next assignment
