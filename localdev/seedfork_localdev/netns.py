"""Per-pod network namespaces for the local pod runner, with NetworkPolicies enforced (development/test only).

On loopback every pod may leave with source 127.0.0.1, so no packet filter can tell pods apart. With
``PodRunner(network="namespaces")`` every pod gets a network namespace of its own, made here:

- a hub namespace per runner holds one bridge; each pod's namespace has ``lo`` and ``eth0``, one end of a
  veth pair whose other end sits on the bridge, with an address of ``SUBNET`` (198.18.0.0/24, the range set
  aside for network tests). Those addresses exist only inside namespaces made here: the hub has no route
  anywhere else, so pods reach each other and nothing outside;
- the API server, which listens on the host's 127.0.0.1, is relayed into each pod: the runner listens on
  127.0.0.1:<port> inside the pod's namespace and copies bytes to the real address, so kubeconfigs and
  ``KUBERNETES_SERVICE_HOST`` stay as they are;
- each pod's namespace gets an nftables table derived from the NetworkPolicies of its Kubernetes namespace
  (``ruleset``): the subset the chart renders (podSelector.matchLabels; ingress rules ``from`` podSelector
  peers of the same namespace, or from anywhere; TCP ports with ``endPort``). A pod selected by a policy
  with Ingress accepts only what one of them allows and refuses the rest with a TCP reset. Peers the subset
  does not cover (namespaceSelector, ipBlock, matchExpressions) match nothing: fail closed. Rules are
  refreshed when pods come and go and when the policies change (polled);
- probes and test code run inside a pod's namespace on a thread that entered it (``run_in``, ``Pool``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("seedfork.podrunner.netns")

SUBNET = ipaddress.ip_network("198.18.0.0/24")
OUTSIDER_HOST = 253  # an address on the bridge that no pod and no set holds
_CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)
TABLE = "seedfork_netpolicy"
_IP_BIN = shutil.which("ip") or "/usr/sbin/ip"


def enter(netns: str) -> None:
    """Move the calling thread (only it) into the named network namespace."""
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _LIBC.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in(netns: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a fresh thread inside ``netns``; its result or its exception."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            enter(netns)
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    thread = threading.Thread(target=target, name=f"in-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def pool(netns: str, workers: int = 2) -> ThreadPoolExecutor:
    """Worker threads that live inside ``netns`` (probes; a child process they start inherits it)."""
    return ThreadPoolExecutor(workers, thread_name_prefix=f"in-{netns}", initializer=enter, initargs=(netns,))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([_IP_BIN, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _nft(netns: str, script: str) -> None:
    argv = [_IP_BIN, "netns", "exec", netns, shutil.which("nft") or "nft", "-f", "-"]
    proc = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {netns}: {proc.stderr.strip()}\n{script}")


# ---- NetworkPolicy -> nftables (pure) --------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    ip: str
    namespace: str
    labels: Mapping[str, str]


def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector with matchLabels only; anything else selects nothing (fail closed)."""
    selector = selector or {}
    if set(selector) - {"matchLabels"}:
        return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _ports(rule: Mapping[str, Any]) -> list[str] | None:
    """The rule's TCP ports as nft elements, None for every port; a port the subset cannot express: []."""
    ports = rule.get("ports")
    if not ports:
        return None
    out = []
    for p in ports:
        if (p.get("protocol") or "TCP") != "TCP" or not isinstance(p.get("port"), int):
            continue  # UDP/SCTP or named ports: not expressed here, so not allowed
        out.append(f"{p['port']}-{p['endPort']}" if p.get("endPort") else str(p["port"]))
    return out


def _sources(rule: Mapping[str, Any], namespace: str, peers: Sequence[Peer]) -> list[str] | None:
    """The rule's allowed source addresses, None for anywhere."""
    if "from" not in rule or rule["from"] is None:
        return None
    ips: list[str] = []
    for entry in rule["from"]:
        if set(entry) != {"podSelector"}:
            continue  # namespaceSelector, ipBlock: not covered, match nothing
        ips += [p.ip for p in peers if p.namespace == namespace and _selects(entry["podSelector"], p.labels)]
    return sorted(set(ips))


def ruleset(pod: Peer, peers: Sequence[Peer], policies: Sequence[Mapping[str, Any]]) -> str:
    """The nft script for ``pod``'s namespace under the NetworkPolicies of its Kubernetes namespace."""
    lines = [
        "type filter hook input priority 0; policy accept;",
        'iif "lo" accept',
        "ct state established,related accept",
    ]
    isolated = False
    for pol in policies:
        spec = pol.get("spec") or {}
        if pol.get("metadata", {}).get("namespace", pod.namespace) != pod.namespace:
            continue
        if not _selects(spec.get("podSelector"), pod.labels):
            continue
        types = spec.get("policyTypes") or ["Ingress"]
        if "Ingress" not in types:
            continue
        isolated = True
        for rule in spec.get("ingress") or []:
            sources, ports = _sources(rule, pod.namespace, peers), _ports(rule)
            if sources == [] or ports == []:
                continue
            match = []
            if sources is not None:
                match.append(f"ip saddr {{ {', '.join(sources)} }}")
            if ports is not None:
                match.append(f"tcp dport {{ {', '.join(ports)} }}")
            lines.append(" ".join(match) + " accept" if match else "accept")
    if isolated:
        lines.append("meta l4proto tcp reject with tcp reset")
        lines.append("reject")
    body = "\n    ".join(lines)
    return (
        f"table inet {TABLE}\ndelete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n  chain ingress {{\n    {body}\n  }}\n}}\n"
    )


# ---- the namespaces ----------------------------------------------------------------------------------------


@dataclass
class _PodNet:
    netns: str
    ip: str
    host: int
    peer: Peer
    relay: socket.socket | None = None
    probes: ThreadPoolExecutor | None = None
    rules: str = ""


class PodNetwork:
    """The hub, the pods' namespaces and their rules for one runner."""

    def __init__(self, runner_id: str, api_address: tuple[str, int], list_policies: Callable[[str], list]) -> None:
        tag = runner_id.rsplit("-", 1)[-1][:8]
        self.hub = f"sfhub-{tag}"
        self._prefix = f"sfpod-{tag}-"
        self.api_address = api_address
        self.list_policies = list_policies
        self._pods: dict[tuple[str, str], _PodNet] = {}
        self._extra: list[str] = []  # namespaces that are not pods (outsider)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._policies: dict[str, list] = {}
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    def start(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        _ip("-n", self.hub, "link", "set", "lo", "up")
        self._thread = threading.Thread(target=self._refresh_loop, name="podrunner-netpolicy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for key in list(self._pods):
                self.remove_pod(key)
            for ns in self._extra:
                _ip("netns", "del", ns, check=False)
            self._extra.clear()
        _ip("netns", "del", self.hub, check=False)

    # ---- pods
    def _free_host(self) -> int:
        used = {p.host for p in self._pods.values()}
        for host in range(2, OUTSIDER_HOST):
            if host not in used:
                return host
        raise RuntimeError(f"no free pod address in {SUBNET}")

    def _attach(self, netns: str, host: int) -> str:
        ip = str(SUBNET.network_address + host)
        _ip("netns", "add", netns)
        _ip("-n", self.hub, "link", "add", f"v{host}", "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", self.hub, "link", "set", f"v{host}", "master", "br0", "up")
        _ip("-n", netns, "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return ip

    def add_pod(self, key: tuple[str, str], labels: Mapping[str, str]) -> str:
        """Make the pod's namespace, address, API relay and rules; returns its IP."""
        with self._lock:
            host = self._free_host()
            netns = f"{self._prefix}{host}"
            ip = self._attach(netns, host)
            pod = _PodNet(netns, ip, host, Peer(ip, key[0], dict(labels or {})))
            pod.relay = run_in(netns, self._listen_relay)
            threading.Thread(target=self._relay_accept, args=(pod.relay,), daemon=True).start()
            pod.probes = pool(netns)
            self._pods[key] = pod
            self._policies[key[0]] = self.list_policies(key[0])
            self._apply()
        log.info("pod %s/%s: network namespace %s, address %s", key[0], key[1], netns, ip)
        return ip

    def remove_pod(self, key: tuple[str, str], ip: str | None = None) -> None:
        """Drop the pod's namespace (``ip``: only if it is still the one with that address, not a successor's)."""
        with self._lock:
            pod = self._pods.get(key)
            if pod is None or (ip is not None and pod.ip != ip):
                return
            del self._pods[key]
            if pod.relay is not None:
                with contextlib.suppress(OSError):
                    pod.relay.close()
            if pod.probes is not None:
                pod.probes.shutdown(wait=False, cancel_futures=True)
            _ip("netns", "del", pod.netns, check=False)  # takes the veth pair with it
            self._apply()

    def outsider(self) -> tuple[str, str]:
        """A namespace on the bridge with an address outside every pod and set: (netns, ip)."""
        with self._lock:
            netns = f"{self._prefix}outside"
            if netns not in self._extra:
                self._attach(netns, OUTSIDER_HOST)
                self._extra.append(netns)
            return netns, str(SUBNET.network_address + OUTSIDER_HOST)

    def netns_of(self, key: tuple[str, str]) -> str | None:
        pod = self._pods.get(key)
        return pod.netns if pod else None

    def wrap(self, key: tuple[str, str], argv: list[str]) -> list[str]:
        """The command that runs ``argv`` inside the pod's namespace (the process keeps its PID)."""
        return [_IP_BIN, "netns", "exec", self._pods[key].netns, *argv]

    def probe_pool(self, key: tuple[str, str]) -> ThreadPoolExecutor:
        return self._pods[key].probes

    # ---- rules
    def _apply(self) -> None:
        peers = [p.peer for p in self._pods.values()]
        for pod in self._pods.values():
            script = ruleset(pod.peer, peers, self._policies.get(pod.peer.namespace, []))
            if script != pod.rules:
                _nft(pod.netns, script)
                pod.rules = script

    def _refresh_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                with self._lock:
                    namespaces = {k[0] for k in self._pods}
                fresh = {ns: self.list_policies(ns) for ns in namespaces}
                with self._lock:
                    if json.dumps(fresh, sort_keys=True, default=str) != json.dumps(
                        {ns: self._policies.get(ns) for ns in namespaces}, sort_keys=True, default=str
                    ):
                        self._policies.update(fresh)
                        self._apply()
            except Exception as e:  # the API may be restarting: keep the rules, try again
                log.warning("NetworkPolicy refresh failed: %s", e)

    # ---- the API server relay
    def _listen_relay(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.api_address[1]))
        sock.listen(64)
        return sock

    def _relay_accept(self, listener: socket.socket) -> None:
        while True:
            try:
                inner, _ = listener.accept()
            except OSError:
                return  # closed with the pod
            try:
                outer = socket.create_connection(self.api_address, timeout=10)
                outer.settimeout(None)
            except OSError:
                inner.close()
                continue
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            src.close()
