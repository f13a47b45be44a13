"""``seedfork-agent run -- <sglang command>`` against a real kube-apiserver: the agent launches SGLang per
assignment, supervises it and reports on its own pod; SGLang moves its own bytes.

SGLang cannot run here (no GPU): the command is ``sglang_double.py``, the double of SGLang's HTTP surface
and R-Fork flag handling built from docs/sglang.md ("Flags and resolution": flags and silent fallbacks;
"What the supervisor reads": ``/health``, ``/server_info``, ``/weights_checker``; TransferEngine info).
No kubelet runs: each "pod" is a real Pod object plus the agent process on its own loopback IP, reading and
patching that Pod.
"""

from __future__ import annotations

import json
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


def _events(core, namespace: str, pod: str) -> list[tuple[str, str]]:
    items = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}").items
    return [(e.reason, e.message) for e in items]


def _cache_env(root: Path) -> dict[str, str]:
    """What the operator renders into an SGLang pod (render._engine_cache)."""
    return {c.ENV_ENGINE_CACHE_DIR: str(root), **c.engine_cache_env("sglang", str(root))}


def test_a_client_starts_sglang_on_its_seeds_caches_and_keeps_its_own_node_probe(
    h, procs, api_client, control_plane, namespace, tiny_model, tmp_path
):
    """The seed's compiled kernels are in the client's SGLang cache before that SGLang starts (the double
    builds a kernel only on a miss); the per-node P2P probe is never taken from the seed; the route needs
    the token and listens on the pod IP only; a cache of another key is skipped with an Event, never fatal."""
    core = client.CoreV1Api(api_client)
    seed_ip, client_ip = h.loopback_ip(), h.loopback_ip()
    port, agent_port = h.free_port(seed_ip), h.free_port(seed_ip)
    seed_cache, client_cache, other_cache = tmp_path / "seed", tmp_path / "client", tmp_path / "other"
    ports = {c.ENV_AGENT_PORT: str(agent_port)}
    _pod(core, namespace, "seed-0", c.Assignment(attempt=1, source="storage"))
    env = _env(h, control_plane, namespace, "seed-0", seed_ip, port, **ports, **_cache_env(seed_cache))
    seed = _run(procs, tiny_model, "seed-0", env)
    assert _wait_report(core, namespace, "seed-0", _final(1), seed, procs).state == "verified"
    kernel = Path("sglang", "triton", "double-kernel", "kernel.cubin")
    probe = Path("sglang", "gpu_p2p_access_cache_for_0.json")
    seed_kernel, seed_probe = (seed_cache / kernel).read_text(), (seed_cache / probe).read_text()

    url = f"http://{seed_ip}:{agent_port}/v1/engine-cache"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {h.TOKEN}"}, timeout=10).status_code == 200
    with pytest.raises(OSError):  # the pod IP only, never every address
        socket.create_connection(("127.0.0.1", agent_port), timeout=5).close()

    assignment = c.Assignment(attempt=1, source="seed", backend="transfer_engine", seedPod="seed-0", seedIP=seed_ip)
    _pod(core, namespace, "new-0", assignment)
    env = _env(h, control_plane, namespace, "new-0", client_ip, port, **ports, **_cache_env(client_cache))
    new = _run(procs, tiny_model, "new-0", env)
    assert _wait_report(core, namespace, "new-0", _final(1), new, procs).state == "verified"
    assert (client_cache / kernel).read_text() == seed_kernel  # nothing compiled: the seed's kernel was there
    assert (client_cache / probe).read_text() != seed_probe  # probed on its own node
    fetched = [m for r, m in _events(core, namespace, "new-0") if r == "EngineCacheFetched"]
    assert fetched and "fetched 1 files" in fetched[0], _events(core, namespace, "new-0")
    timing = c.PodTiming.model_validate_json(core.read_namespaced_pod("new-0", namespace).metadata.annotations[
        c.ANN_TIMING])  # fmt: skip
    assert timing.transfer_start >= timing.cache_fetch_end >= timing.cache_fetch_start >= timing.started

    # Another engine version: another key. SGLang compiles its own and the pod is verified all the same.
    _pod(core, namespace, "other-0", assignment)
    env = _env(h, control_plane, namespace, "other-0", h.loopback_ip(), port, **ports, **_cache_env(other_cache))
    other = _run(procs, tiny_model, "other-0", {**env, c.ENV_ENGINE_VERSION: "0.0.1"})
    assert _wait_report(core, namespace, "other-0", _final(1), other, procs).state == "verified"
    assert (other_cache / kernel).read_text() != seed_kernel
    skipped = [m for r, m in _events(core, namespace, "other-0") if r == "EngineCacheSkipped"]
    assert skipped and "key" in skipped[0], _events(core, namespace, "other-0")

    # The seed's SGLang dies and the pod is re-assigned: until the new SGLang is verified the cache is not
    # served, since that SGLang may still be writing it. The new seed accepts the connection and never
    # answers, which holds the attempt in its cache fetch (bounded by the set's timeout) while the route is asked.
    os.kill(json.loads(seed_probe)["probed_by"], signal.SIGKILL)
    assert _wait_report(core, namespace, "seed-0", lambda r: r.state == "failed", seed, procs).attempt == 1
    silent_ip = h.loopback_ip()
    with socket.create_server((silent_ip, agent_port)):
        again = c.Assignment(attempt=2, source="seed", backend="transfer_engine", seedPod="new-0", seedIP=silent_ip)
        core.patch_namespaced_pod("seed-0", namespace, c.annotation_patch(assignment=again))
        _wait_report(core, namespace, "seed-0", lambda r: r.attempt == 2, seed, procs)
        assert httpx.get(url, headers={"Authorization": f"Bearer {h.TOKEN}"}, timeout=10).status_code == 503
    assert _wait_report(core, namespace, "seed-0", _final(2), seed, procs).state == "failed"  # no SGLang there
    assert httpx.get(url, headers={"Authorization": f"Bearer {h.TOKEN}"}, timeout=10).status_code == 503
    storage = c.Assignment(attempt=3, source="storage")
    core.patch_namespaced_pod("seed-0", namespace, c.annotation_patch(assignment=storage))
    assert _wait_report(core, namespace, "seed-0", _final(3), seed, procs).state == "verified"
    assert httpx.get(url, headers={"Authorization": f"Bearer {h.TOKEN}"}, timeout=10).status_code == 200
