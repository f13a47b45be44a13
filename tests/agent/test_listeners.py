"""Every listener of an agent binds its pod IP, never all addresses, on the agent port or the set's range.

Read from /proc for the agent's process (what ``ss -ltnp`` shows), on real agents: a storage-loaded seed,
a client that pulled over TransferEngine (and then serves), and the seed while it hosts a gloo rendezvous
(whose short-lived store a connect probe finds).
gloo's pair listeners take a port the kernel picks (gloo has no port setting): the one exception allowed,
and only on the pod IP.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from seedfork_agent.groups import listening
from seedfork_agent.puller import pull
from seedfork_localdev.sockets import ephemeral_ports, listeners


def _range(kit) -> tuple[int, int]:
    lo, hi = kit.PORT_RANGE.split("-")
    return int(lo), int(hi)


def _misplaced(agent, kit, allow_ephemeral: bool = False) -> list[str]:
    lo, hi = _range(kit)
    eph = ephemeral_ports()
    bad = []
    for sock in listeners(agent.proc.pid):
        in_range = sock.port == kit.AGENT_PORT or lo <= sock.port <= hi
        kernel_picked = allow_ephemeral and eph[0] <= sock.port <= eph[1]
        if sock.address != agent.ip or not (in_range or kernel_picked):
            bad.append(str(sock))
    return bad


def test_a_serving_seed_listens_only_on_its_ip_inside_its_ports(kit, seed):
    socks = listeners(seed.proc.pid)
    assert len(socks) >= 3, socks  # HTTP, TransferEngine RPC and data
    assert _misplaced(seed, kit) == []


def test_a_transfer_engine_client_listens_only_on_its_ip_inside_its_ports(kit, agents, seed):
    ip = kit.new_ip()
    client = agents(*kit.pull_args(ip, [seed.ip], "transfer_engine", "--port-range", kit.PORT_RANGE), ip=ip)
    client.wait_ready()
    assert len(listeners(client.proc.pid)) >= 3
    assert _misplaced(client, kit) == []


def test_a_rendezvous_listens_on_the_seed_ip_only_and_is_gone_with_its_group(kit, seed):
    """The seed's store listens on its IP, on no other address, while the client joins, and is gone when the pull
    is. The store lives only through the rendezvous (gloo is done with it once its pairs connected): on a busy
    machine that can fall between two looks at /proc, so a connect probe finds it; /proc checks the rest."""
    port = kit.new_port()
    answered: list[float] = []  # when a connect to the seed's IP on the group's port succeeded
    elsewhere: list[str] = []  # what else answered on that port at that moment
    wrong: set[str] = set()
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            if listening(seed.ip, port, 0.2):
                answered.append(time.monotonic())
                elsewhere.extend(ip for ip in ("127.0.0.1", kit.new_ip()) if listening(ip, port, 0.2))
            time.sleep(0.001)

    def watch() -> None:
        while not stop.is_set():
            wrong.update(_misplaced(seed, kit, allow_ephemeral=True))
            time.sleep(0.005)

    threads = [threading.Thread(target=probe, daemon=True), threading.Thread(target=watch, daemon=True)]
    for t in threads:
        t.start()
    try:
        # The client's init request opens the group (its one member is the client): the seed's store must
        # listen, on the seed's IP, while the client joins.
        req = kit.pull_request(seed.ip, "nccl", group_ports=[port], client_id="probe", local_ip=kit.new_ip())
        pull(req).close()
        assert answered, "the seed's store never listened on its IP"
        assert elsewhere == []
        deadline = time.monotonic() + 10
        while (listening(seed.ip, port, 0.2) or any(s.port == port for s in listeners(seed.proc.pid))) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert not listening(seed.ip, port, 0.2) and not any(s.port == port for s in listeners(seed.proc.pid))
    assert wrong == set()


def test_a_rendezvous_nobody_joins_closes_at_the_timeout(kit, seed):
    port = kit.new_port()
    headers = {"Authorization": f"Bearer {kit.TOKEN}"}
    body = {"master_address": seed.ip, "ports": str(port), "world_size": 2, "group_name": "send_weights_lonely"}
    with ThreadPoolExecutor(1) as pool:
        init = pool.submit(
            httpx.post, f"{seed.url}/init_weights_send_group_for_remote_instance", json=body, headers=headers,
            timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while not any(s.port == port for s in listeners(seed.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [str(s) for s in listeners(seed.proc.pid) if s.port == port] == [f"{seed.ip}:{port}"]
        assert init.result().json()["success"] is False  # the seed's timeout (20 s) ended the group
    assert not any(s.port == port for s in listeners(seed.proc.pid))


def test_a_seed_refuses_a_rendezvous_elsewhere(kit, seed):
    """The store listens on the seed's own address and range only, whatever a client asks for."""
    headers = {"Authorization": f"Bearer {kit.TOKEN}"}
    url = f"{seed.url}/init_weights_send_group_for_remote_instance"
    lo, hi = _range(kit)
    for master, port, complaint in [("127.0.0.1", lo + 5, "master_address"), (seed.ip, hi + 1, "outside")]:
        body = {"master_address": master, "ports": str(port), "world_size": 2, "group_name": "send_weights_x"}
        r = httpx.post(url, json=body, headers=headers, timeout=10)
        assert r.status_code == 400 and complaint in r.json()["message"], r.text
        assert not any(s.port == port for s in listeners(seed.proc.pid))


_TIME_WAIT = r"""
import socket, sys, time
from seedfork_agent.te import TransferEngineHandle, TransferEngineError
ip, lo = sys.argv[1], int(sys.argv[2])
held = []
for p in (lo, lo + 1):  # two ports held by live listeners (another engine's)
    s = socket.socket(); s.bind((ip, p)); s.listen(); held.append(s)
for p in (lo + 2, lo + 3):  # two whose connections just ended, the listener's side first: TIME_WAIT
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((ip, p)); srv.listen()
    c = socket.create_connection((ip, p)); a, _ = srv.accept(); a.close(); time.sleep(0.05); c.close(); srv.close()
try:
    print("ok", sorted(TransferEngineHandle(ip, "tcp", 30, (lo, lo + 3)).listen_ports))
except TransferEngineError as e:
    print("error", e)
"""


def test_a_transfer_engine_starts_on_ports_whose_last_connections_are_in_time_wait(kit):
    """A pod IP given out again, or a restarted agent, finds its engine ports with connections in TIME_WAIT for
    a minute; the engine must start on them anyway (and never on a port a live listener holds)."""
    import subprocess
    import sys

    ip, lo = kit.new_ip(), 28940
    out = subprocess.run(
        [sys.executable, "-c", _TIME_WAIT, ip, str(lo)], capture_output=True, text=True, timeout=120
    )  # a process of its own: Mooncake reads its port range once per process
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert last == f"ok [{lo + 2}, {lo + 3}]", last
