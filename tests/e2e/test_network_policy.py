"""The chart's NetworkPolicy, enforced: weights move inside a set and nowhere else, over every backend.

The pod runner gives every pod its own network namespace and turns the namespace's NetworkPolicies into
nftables rules (``seedfork_localdev.netns``). The policies are the chart's, rendered by helm for two sets.
Within the set ``wanted`` a real scale-out pulls from the seed. From the pod of the set ``other`` and from an
address outside every set, the seed's weight endpoints (HTTP, even with the right token), its TransferEngine
(a direct Mooncake read of its registered memory, pointers in hand) and a live rendezvous store are all
refused, while the same requests from the set's own pod succeed at the same moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading

import httpx
import pytest
import yaml
from kubernetes import client

from seedfork_localdev import binaries, netns
from seedfork_localdev.cluster import LocalCluster, install_agent_rbac, new_namespace
from seedfork_localdev.manifests import reference_set_body
from seedfork_localdev.referenceset import ReferenceSet
from seedfork_localdev.waiting import wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="per-pod network namespaces need root"),
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEP = 150.0
AGENT_PORT = 18080

# A client of Mooncake's TransferEngine that skips seedfork's HTTP API: reads the seed's memory directly.
TE_READ = """
import ctypes, json, os, sys
os.environ.update(MC_FORCE_TCP="1", MC_TRANSFER_TIMEOUT="5")
from mooncake.engine import TransferEngine
session, ptr, n, me = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
e = TransferEngine()
assert e.initialize(me, "P2PHANDSHAKE", "tcp", "") == 0
buf = ctypes.create_string_buffer(n)
assert e.register_memory(ctypes.addressof(buf), n) == 0
rc = e.batch_transfer_sync_read(session, [ctypes.addressof(buf)], [ptr], [n])
print(json.dumps({"rc": rc, "bytes": buf.raw.hex()}))
"""


def chart_policies(namespace: str, backend: str) -> list[dict]:
    helm = binaries.ensure("helm")
    out = subprocess.run(
        [str(helm), "template", "sf", os.path.join(REPO, "charts", "seedfork"), "--namespace", namespace,
         "--kube-version", "1.36.3",
         "--set", "networkPolicy.modelReplicaSets[0].name=wanted",
         "--set", f"networkPolicy.modelReplicaSets[0].backend={backend}",
         "--set", "networkPolicy.modelReplicaSets[1].name=other",
         "--set", f"networkPolicy.modelReplicaSets[1].backend={backend}"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out) if d and d.get("kind") == "NetworkPolicy"]
    return [d for d in docs if d["spec"]["podSelector"]["matchLabels"].get("seedfork.io/set")]


def _get(url: str, token: str) -> httpx.Response:
    return httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)


def _refused(fn, *args) -> bool:
    try:
        fn(*args)
    except (httpx.TransportError, OSError):
        return True
    return False


def _connect(ip: str, port: int) -> None:
    socket.create_connection((ip, port), timeout=3).close()


def _te_read(ns: str, me: str, session: str, ptr: int, n: int) -> dict:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", TE_READ, session, str(ptr), str(n), me],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"rc": None, "error": proc.stderr[-800:]}


@pytest.mark.parametrize("backend", ["transfer_engine", "nccl"])
def test_the_charts_policy_keeps_a_sets_weights_inside_it(
    backend, api_client, control_plane, crd, tmp_path, tiny_model
):
    namespace = new_namespace(api_client, "netpol")
    install_agent_rbac(api_client, namespace)
    for policy in chart_policies(namespace, backend):
        client.NetworkingV1Api(api_client).create_namespaced_network_policy(namespace, policy)
    with LocalCluster(control_plane.kubeconfig, namespace, tmp_path / "cluster", pod_network="namespaces") as cl:
        runner = cl.runner
        wanted, other = ReferenceSet(api_client, namespace, "wanted"), ReferenceSet(api_client, namespace, "other")
        wanted.create(reference_set_body("wanted", tiny_model, backend=backend, timeout_seconds=30))
        other.create(reference_set_body("other", tiny_model, backend=backend, timeout_seconds=30))
        (seed,) = wanted.wait_ready(1, STEP)
        (stranger,) = other.wait_ready(1, STEP)
        # A real transfer inside the set, through the policy.
        wanted.scale(2)
        rows = wanted.wait_ready(2, STEP)
        (pulled,) = [r for r in rows if r.name != seed.name]
        assert pulled.source == "seed" and pulled.state == "verified", pulled.report
        assert pulled.report.get("backend") == backend, pulled.report

        token = wanted.token()
        inside = runner.pod_netns(namespace, pulled.name)
        outsiders = {
            "other set's pod": runner.pod_netns(namespace, stranger.name),
            "outside": runner.network.outsider()[0],
        }
        assert seed.ip.startswith("198.18.")
        base = f"http://{seed.ip}:{AGENT_PORT}"

        # HTTP weight endpoints, with the right token.
        assert netns.run_in(inside, _get, f"{base}/v1/manifest", token).status_code == 200
        for who, ns in outsiders.items():
            assert netns.run_in(ns, _refused, _get, f"{base}/v1/manifest", token), who
            assert netns.run_in(ns, _refused, _get, f"{base}/v1/attach", token), who

        # TransferEngine, straight to Mooncake with the seed's session and pointers.
        info = netns.run_in(inside, _get, f"{base}/remote_instance_transfer_engine_info?rank=0", token)
        if backend == "transfer_engine":
            session, weights = info.json()["remote_instance_transfer_engine_info"]
            ptr, numel, elsize = next(iter(weights.values()))
            n = numel * elsize
            own = _te_read(inside, pulled.ip, session, ptr, n)
            assert own["rc"] == 0 and int(own["bytes"], 16) != 0, own  # the read itself works inside the set
            seed_host, seed_port = session.rsplit(":", 1)
            for who, ns in outsiders.items():
                me = runner.network.outsider()[1] if who == "outside" else stranger.ip
                got = _te_read(ns, me, session, ptr, n)
                assert got["rc"] != 0 and got.get("bytes", "") != own["bytes"], (who, got)
                assert netns.run_in(ns, _refused, _connect, seed_host, int(seed_port)), who
        else:
            assert info.status_code == 400  # a seed of an nccl set exposes no memory to TransferEngine

        # A rendezvous store, listening while a group of the set forms.
        port = 28050
        body = {"master_address": seed.ip, "ports": str(port), "world_size": 2, "group_name": "send_weights_probe"}

        def open_group() -> None:  # nobody joins: it answers when the group expires or the pods end
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(
                    f"{base}/init_weights_send_group_for_remote_instance", json=body,
                    headers={"Authorization": f"Bearer {token}"}, timeout=60,
                )  # fmt: skip

        threading.Thread(target=netns.run_in, args=(inside, open_group), daemon=True).start()

        def store_listens() -> bool:
            return not _refused(_connect, seed.ip, port)

        wait_until(lambda: netns.run_in(inside, store_listens), 20, "the seed's rendezvous store to listen")
        for who, ns in outsiders.items():
            assert netns.run_in(ns, _refused, _connect, seed.ip, port), who
        assert netns.run_in(inside, store_listens)  # still listening: the refusals above were the policy's
