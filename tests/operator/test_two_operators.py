"""Two operator processes at once (a rolling upgrade's overlap, a stuck old replica): never more pods than wanted.

Both are real ``seedfork-operator`` processes, standalone (no peering), on the real apiserver. A watch records
every pod ever created; with nothing failing, each scale step must create exactly the pods it adds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from kubernetes import client

from seedfork_api import contract as c
from seedfork_localdev.watching import ListWatch

from .conftest import free_port

pytestmark = pytest.mark.cluster


class PodsCreated:
    """Every pod uid the apiserver announced in the namespace, and the most live pods at any moment."""

    def __init__(self, api_client, namespace: str):
        self.uids: set[str] = set()
        self.live: dict[str, bool] = {}
        self.most_live = 0
        self._watch = ListWatch(
            client.CoreV1Api(api_client).list_namespaced_pod,
            namespace,
            label_selector=f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}",
            on_list=lambda pods: [self._see("ADDED", pod) for pod in pods],
            on_event=self._see,
        )
        self._thread = threading.Thread(target=self._watch.run, daemon=True)

    def _see(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        self.uids.add(uid)
        if kind == "DELETED" or pod["metadata"].get("deletionTimestamp"):
            self.live.pop(uid, None)
        else:
            self.live[uid] = True
        self.most_live = max(self.most_live, len(self.live))

    def __enter__(self) -> PodsCreated:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._watch.close()
        self._thread.join(timeout=10)


def start_operator(namespace: str, log) -> subprocess.Popen:
    env = {**os.environ, "SEEDFORK_AGENT_IMAGE": "seedfork-agent:test", "PYTHONUNBUFFERED": "1"}
    args = ["--namespace", namespace, "--standalone", "--interval", "0.5", "--metrics-port", str(free_port())]
    return subprocess.Popen(
        [sys.executable, "-m", "seedfork_operator", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def test_two_operators_at_once_create_exactly_the_pods_wanted(api_client, crd, nodes, sets, wait, namespace, tmp_path):
    logs = [open(tmp_path / f"operator-{i}.log", "wb") for i in range(2)]  # noqa: SIM115 (closed below)
    procs = [start_operator(namespace, log) for log in logs]
    try:

        def started() -> bool:
            return all("seedfork operator configured" in (tmp_path / f"operator-{i}.log").read_text() for i in range(2))

        wait("both operators started", started, timeout=60)
        with PodsCreated(api_client, namespace) as created:
            sets.create("twice", replicas=4)
            wait("4 ready", lambda: sum(v.ready for v in sets.views("twice")) == 4, timeout=60)
            for replicas in (8, 11):
                sets.scale("twice", replicas)
                wait(f"{replicas} ready", lambda r=replicas: sum(v.ready for v in sets.views("twice")) == r, timeout=60)
            time.sleep(2)  # several passes of both: nothing more appears
        output = [(tmp_path / f"operator-{i}.log").read_text(errors="replace") for i in range(2)]
        assert all(p.poll() is None for p in procs), output
        assert created.most_live == 11, f"{created.most_live} pods alive at once for 11 wanted"
        assert len(created.uids) == 11, f"{len(created.uids)} pods created for 11 wanted"
        names = sorted(v.name for v in sets.views("twice"))
        assert names == sorted(f"twice-{k}" for k in range(11))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for log in logs:
            log.close()
