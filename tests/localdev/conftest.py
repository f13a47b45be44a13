"""Helpers for the local pod runner tests: a runner per test, pod builders, waiting, HTTP."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable

import pytest

from seedfork_localdev.waiting import wait_until

PORT = 18931  # every pod has its own address, so all of them can use the same port

# A tiny pod workload: serves its environment on $POD_IP, readiness on /healthz (503 until
# /make-ready is called when START_UNREADY is set). It ignores SIGTERM when IGNORE_TERM is set.
SERVER = r"""
import http.server, json, os, signal, sys
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
state = {"ready": not os.environ.get("START_UNREADY")}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/make-ready":
            state["ready"] = True
        if self.path == "/healthz":
            code, body = (200 if state["ready"] else 503), b"ok"
        else:
            code, body = 200, json.dumps({"pid": os.getpid(), "env": dict(os.environ)}).encode()
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer((os.environ["POD_IP"], int(os.environ["PORT"])), Handler)
print("serving on", os.environ["POD_IP"], flush=True)
server.serve_forever()
"""


def wait_for(check: Callable[[], object], timeout: float = 20.0, what: str = "condition", interval: float = 0.1):
    return wait_until(check, timeout, what, interval)


def server_pod(name: str, *, env: list[dict] | None = None, probe: bool = True, **spec) -> dict:
    """A pod running SERVER with POD_IP from the downward API and an httpGet readiness probe."""
    container = {
        "name": "server",
        "image": "ignored-by-the-runner",
        # "python" resolves through the runner's PATH, which starts with its Python environment's bin.
        "command": ["python", "-u", "-c", SERVER],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "PORT", "value": str(PORT)},
            *(env or []),
        ],
        "ports": [{"name": "http", "containerPort": PORT}],
    }
    if probe:
        container["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10}
    return {"metadata": {"name": name}, "spec": {"containers": [container], **spec}}


def command_pod(name: str, command: list[str], **spec) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "main", "image": "x", "command": command}], **spec},
    }


def get_json(ip: str, path: str = "/", timeout: float = 3.0) -> dict:
    with urllib.request.urlopen(f"http://{ip}:{PORT}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


def conditions(pod) -> dict[str, str]:
    return {c.type: c.status for c in (pod.status.conditions or [])}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has stopped running all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # it ended between the two looks
        return False


@pytest.fixture
def core(api_client):
    from kubernetes import client

    return client.CoreV1Api(api_client)


@pytest.fixture
def make_runner(control_plane, tmp_path):
    """Start PodRunners with fast probes, short grace and back-off; each is stopped at test end, pass or fail."""
    from seedfork_localdev.podrunner import PodRunner

    runners: list[PodRunner] = []

    def make(namespaces, **kwargs):
        kwargs.setdefault("logdir", tmp_path / "logs")
        kwargs.setdefault("probe_period", 0.2)
        kwargs.setdefault("max_grace", 2.0)
        kwargs.setdefault("restart_backoff", (0.2, 1.0))
        runner = PodRunner(control_plane.kubeconfig, namespaces, **kwargs)
        runner.start()
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.stop()
    leftovers = [pid for runner in runners for pid in runner.started_pids if alive(pid)]
    assert not leftovers, f"processes left running after the runner stopped: {leftovers}"


@pytest.fixture
def h():
    """The helpers above, for test modules (pytest's importlib mode keeps conftest out of imports)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        PORT=PORT,
        wait_for=wait_for,
        server_pod=server_pod,
        command_pod=command_pod,
        get_json=get_json,
        conditions=conditions,
        alive=alive,
    )
