"""The pod runner's per-pod network namespaces: real namespaces, veths, a bridge and nftables rules.

Needs root (the pod runner runs as root for this mode). Every address is inside namespaces made here.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from seedfork_localdev import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def _policy(name: str, selector: dict, ingress: list) -> dict:
    spec = {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"], "ingress": ingress}
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec}


def _serve(port: int, host: str = "0.0.0.0") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.sendall(b"hi")
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return sock


def _reach(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=3) as s:
            return s.recv(2) == b"hi"
    except OSError:
        return False


@pytest.fixture
def api_stub():
    """Stands in for the API server the runner relays into each pod (a listener on the host's loopback)."""
    sock = _serve(0, "127.0.0.1")
    yield sock.getsockname()
    sock.close()


def test_only_pods_a_policy_allows_reach_a_port(api_stub):
    policies = [
        _policy("a", {"seedfork.io/set": "a"}, [
            {"from": [{"podSelector": {"matchLabels": {"seedfork.io/set": "a"}}}],
             "ports": [{"protocol": "TCP", "port": 18080}, {"protocol": "TCP", "port": 28000, "endPort": 28099}]},
            {"ports": [{"protocol": "TCP", "port": 30000}]},
        ]),
    ]  # fmt: skip
    net = netns.PodNetwork(f"test-{os.getpid():x}", api_stub, lambda ns: policies)
    net.start()
    try:
        seed_ip = net.add_pod(("ns", "seed"), {"seedfork.io/set": "a"})
        client_ip = net.add_pod(("ns", "client"), {"seedfork.io/set": "a"})
        other_ip = net.add_pod(("ns", "other"), {"seedfork.io/set": "b"})
        outside, _ = net.outsider()
        seed, client, other = (net.netns_of(("ns", n)) for n in ("seed", "client", "other"))
        servers = [netns.run_in(seed, _serve, p) for p in (18080, 28050, 30000, 40000)]
        assert netns.run_in(client, _reach, seed_ip, 18080)
        assert netns.run_in(client, _reach, seed_ip, 28050)
        assert not netns.run_in(client, _reach, seed_ip, 40000)  # a port no rule names
        for stranger in (other, outside):
            assert not netns.run_in(stranger, _reach, seed_ip, 18080)
            assert not netns.run_in(stranger, _reach, seed_ip, 28050)
            assert netns.run_in(stranger, _reach, seed_ip, 30000)  # the engine port is open to all
        # The unselected pod ("other") is not isolated: the set's pods reach it on any port.
        assert netns.run_in(other, _serve, 40001) and netns.run_in(client, _reach, other_ip, 40001)
        # Inside its own namespace the pod reaches the API relay on the host's loopback address.
        assert netns.run_in(client, _reach, "127.0.0.1", api_stub[1])
        assert client_ip != seed_ip
        for s in servers:
            s.close()
    finally:
        net.stop()
    assert not any(n.startswith(net._prefix) or n == net.hub for n in _namespaces())


def _namespaces() -> list[str]:
    return [line.split()[0] for line in os.popen("ip netns list").read().splitlines() if line.strip()]


def test_unsupported_peers_match_nothing():
    pod = netns.Peer("198.18.0.2", "ns", {"app": "x"})
    peers = [pod, netns.Peer("198.18.0.3", "ns", {"app": "x"})]
    policy = _policy("p", {"app": "x"}, [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}])
    script = netns.ruleset(pod, peers, [policy])
    assert "accept\n" not in script.split("established,related accept", 1)[1].split("reject", 1)[0]
    assert "reject with tcp reset" in script
    assert "reject" not in netns.ruleset(pod, peers, [])  # no policy selects it: not isolated
