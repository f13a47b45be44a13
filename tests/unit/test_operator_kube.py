"""The operator's API calls end when the apiserver stops answering (a frozen apiserver, a half-open connection)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from kubernetes import client

from seedfork_operator.kubeapi import Kube


@pytest.fixture
def silent_server():
    """A TCP listener on loopback that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for s in held:
        s.close()
    sock.close()


@pytest.mark.timeout(30)
def test_an_api_call_to_a_silent_apiserver_ends_with_an_error(silent_server):
    config = client.Configuration(host=silent_server)
    kube = Kube(client.ApiClient(config), timeout=0.5)
    with pytest.raises(Exception, match=r"(?i)timed? ?out"):
        asyncio.run(kube.call(kube.core.read_namespaced_pod, "p", "ns"))
