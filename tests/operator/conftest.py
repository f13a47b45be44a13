"""Integration harness: the real apiserver, the operator running in-process, and a node double.

There is no scheduler, kubelet or agent process here, so ``NodeDouble`` stands in for them
(the only doubles in these tests): it binds pods to Node objects (scheduler), patches pod status
the way a kubelet does (pod IP 127.0.0.x, Running, containers ready, PodReady following the
readiness gate), finishes graceful deletions, and writes the agent's ``AgentReport`` following
a per-test policy. It never sets the readiness gate: that is the operator's job under test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from seedfork_api import contract as c
from seedfork_api import spec as api
from seedfork_localdev.waiting import wait_until
from seedfork_operator.config import OperatorConfig
from seedfork_operator.podview import PodView
from seedfork_operator.runner import OperatorThread

Policy = Callable[[PodView], "c.AgentReport | None"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def verify_at_once(pod: PodView) -> c.AgentReport | None:
    """Agent double: the weights arrive and verify immediately; the pod then serves as a seed."""
    a = pod.assignment
    if a is None or a.source == "queued":  # a queued pod's agent waits for its next assignment
        return None
    return c.AgentReport(
        attempt=a.attempt, state="verified", source=a.source, seed_pod=a.seed_pod, serving=True, bytesDone=10
    )


def stay_transferring(pod: PodView) -> c.AgentReport | None:
    a = pod.assignment
    if a is None or a.source == "queued":
        return None
    return c.AgentReport(attempt=a.attempt, state="transferring", source=a.source, seed_pod=a.seed_pod)


class NodeDouble:
    def __init__(self, api_client: client.ApiClient, namespace: str):
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.policy: Policy = verify_at_once
        self.place: Callable[[str, int], str | None] = lambda name, i: None  # pod name, ordinal → node
        self.ips: dict[str, str] = {}
        self._bound = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.errors: list[str] = []

    def add_node(self, name: str, labels: dict[str, str]) -> None:
        try:
            self.core.create_node({"metadata": {"name": name, "labels": labels}})
        except ApiException as err:
            if err.status != 409:
                raise

    def start(self) -> NodeDouble:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except ApiException as err:
                if err.status not in (404, 409):
                    self.errors.append(f"{err.status} {err.reason}")
            except Exception as err:  # keep playing; the test asserts on errors
                self.errors.append(repr(err))
            self._stop.wait(0.05)

    def pods(self) -> list[dict]:
        raw = self.core.list_namespaced_pod(self.namespace, label_selector=f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}")
        return [client.ApiClient().sanitize_for_serialization(p) for p in raw.items]

    def step(self) -> None:
        for pod in self.pods():
            meta, spec = pod["metadata"], pod["spec"]
            name = meta["name"]
            if meta.get("deletionTimestamp"):  # the kubelet confirms a graceful deletion
                self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
                continue
            if not spec.get("nodeName"):
                node = self.place(name, self._bound)
                if node:
                    self._bound += 1
                    self.core.create_namespaced_pod_binding(
                        name,
                        self.namespace,
                        {"metadata": {"name": name}, "target": {"kind": "Node", "name": node}},
                        _preload_content=False,
                    )
                    continue
            self._kubelet(pod)
            view = PodView.from_pod(pod)
            report = self.policy(view)
            if report is not None and _differs(view.report, report):
                self.core.patch_namespaced_pod(name, self.namespace, c.annotation_patch(report=report))

    def _kubelet(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        ip = self.ips.setdefault(name, f"127.0.0.{len(self.ips) + 2}")
        status = pod.get("status") or {}
        gates = [g["conditionType"] for g in pod["spec"].get("readinessGates") or []]
        conds = {x["type"]: x["status"] for x in status.get("conditions") or []}
        ready = all(conds.get(g) == "True" for g in gates)
        want_ready = "True" if ready else "False"
        if status.get("podIP") == ip and conds.get("Ready") == want_ready and status.get("phase") == "Running":
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        containers = [
            {
                "name": ct["name"],
                "image": ct.get("image", ""),
                "imageID": "",
                "ready": True,
                "restartCount": 0,
                "started": True,
                "state": {"running": {"startedAt": now}},
            }
            for ct in pod["spec"]["containers"]
        ]
        self.core.patch_namespaced_pod_status(
            name,
            self.namespace,
            {
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "containerStatuses": containers,
                    "conditions": [
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                        {"type": "Ready", "status": want_ready, "lastTransitionTime": now},
                    ],
                }
            },
        )


def _differs(old: c.AgentReport | None, new: c.AgentReport) -> bool:
    if old is None:
        return True
    skip = {"updated_at"}
    return old.model_dump(exclude=skip) != new.model_dump(exclude=skip)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def nodes(api_client, crd, namespace) -> Iterator[NodeDouble]:
    double = NodeDouble(api_client, namespace).start()
    yield double
    double.stop()


@pytest.fixture
def operator_config() -> OperatorConfig:
    return OperatorConfig(interval=0.5, debounce=0.02, metrics_port=free_port(), agent_image="seedfork-agent:test")


@pytest.fixture
def operator(crd, namespace, operator_config) -> Iterator[OperatorThread]:
    with OperatorThread([namespace], operator_config) as running:
        yield running


@pytest.fixture
def sets(api_client, namespace):
    return SetClient(api_client, namespace)


class SetClient:
    def __init__(self, api_client: client.ApiClient, namespace: str):
        self.objects = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace

    def create(self, name: str, replicas: int = 1, **transfer) -> dict:
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "model": {"name": "test/tiny-llama", "uri": "/models/tiny"},
                "engine": {"kind": "reference"},
                "transfer": transfer,
                "template": {"spec": {"containers": [{"name": "engine", "image": "engine:test"}]}},
            },
        }
        return self.objects.create_namespaced_custom_object(api.GROUP, api.VERSION, self.namespace, api.PLURAL, body)

    def create_body(self, body: dict) -> dict:
        return self.objects.create_namespaced_custom_object(api.GROUP, api.VERSION, self.namespace, api.PLURAL, body)

    def get(self, name: str) -> dict:
        return self.objects.get_namespaced_custom_object(api.GROUP, api.VERSION, self.namespace, api.PLURAL, name)

    def scale(self, name: str, replicas: int) -> None:
        self.objects.patch_namespaced_custom_object_scale(
            api.GROUP, api.VERSION, self.namespace, api.PLURAL, name, {"spec": {"replicas": replicas}}
        )

    def pods(self, name: str) -> list[dict]:
        raw = self.core.list_namespaced_pod(self.namespace, label_selector=f"{c.LABEL_SET}={name}")
        return [client.ApiClient().sanitize_for_serialization(p) for p in raw.items]

    def views(self, name: str) -> list[PodView]:
        return [PodView.from_pod(p) for p in self.pods(name)]

    def events(self) -> list[tuple[str, str]]:
        return [(e.reason, e.message) for e in self.core.list_namespaced_event(self.namespace).items]


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0, every: float = 0.1):
    """Poll until ``check()`` is truthy; return it. Fails with the last value seen."""
    return wait_until(check, timeout, what, every)


@pytest.fixture
def wait():
    return wait_for
