"""Readiness probes for the local pod runner (development/test component).

One call runs one probe the way the kubelet does: ``httpGet`` against the pod IP
(success is a status in [200, 400)), ``tcpSocket`` (a connection opens) or
``exec`` (the command exits 0, run with the container's environment).
"""

from __future__ import annotations

import http.client
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any


class UnsupportedProbe(ValueError):
    pass


def resolve_port(port: int | str, container_ports: Sequence[Mapping[str, Any]]) -> int:
    """A probe port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container_ports:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise UnsupportedProbe(f"probe port {port!r} is not a named port of the container")


def run_probe(
    probe: Mapping[str, Any],
    *,
    pod_ip: str,
    container_ports: Sequence[Mapping[str, Any]],
    env: Mapping[str, str],
    cwd: str | None = None,
) -> tuple[bool, str]:
    """Run one probe; returns (success, message). Never raises for a failing target."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            return _http_get(probe["httpGet"], pod_ip, container_ports, timeout)
        if "tcpSocket" in probe:
            spec = probe["tcpSocket"]
            port = resolve_port(spec["port"], container_ports)
            with socket.create_connection((spec.get("host") or pod_ip, port), timeout=timeout):
                return True, ""
        if "exec" in probe:
            result = subprocess.run(
                list(probe["exec"]["command"]),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
            if result.returncode == 0:
                return True, ""
            return False, f"exit code {result.returncode}: {result.stdout.decode(errors='replace')[-200:]}"
    except UnsupportedProbe as exc:
        return False, str(exc)
    except subprocess.TimeoutExpired:
        return False, f"probe timed out after {timeout}s"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return False, f"unsupported probe handler {sorted(probe)}; supported: httpGet, tcpSocket, exec"


def _http_get(
    spec: Mapping[str, Any], pod_ip: str, ports: Sequence[Mapping[str, Any]], timeout: float
) -> tuple[bool, str]:
    if (spec.get("scheme") or "HTTP").upper() != "HTTP":
        raise UnsupportedProbe("httpGet probes over HTTPS are not supported by the local pod runner")
    host = spec.get("host") or pod_ip
    conn = http.client.HTTPConnection(host, resolve_port(spec["port"], ports), timeout=timeout)
    try:
        headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
        conn.request("GET", spec.get("path") or "/", headers=headers)
        status = conn.getresponse().status
    finally:
        conn.close()
    return 200 <= status < 400, f"HTTP probe failed with statuscode: {status}"
