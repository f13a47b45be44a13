"""The manifests the harness creates: a ModelReplicaSet of seedfork's reference engine and the agent container."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from seedfork_api import contract as c
from seedfork_api.spec import GROUP, VERSION

# Engine pods run as this ServiceAccount (see cluster.install_agent_rbac).
AGENT_SERVICE_ACCOUNT = "seedfork-agent"


def reference_set_body(
    name: str,
    model_dir: Path | str,
    *,
    backend: str = "transfer_engine",
    replicas: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    max_clients_per_seed: int = 4,
    timeout_seconds: int = 60,
    retries: int = 2,
    bandwidth_limit_mbps: int | None = None,
    agent_device: str | None = None,
    standby: int = 0,
) -> dict[str, Any]:
    """A ModelReplicaSet of the reference engine: the engine container attaches to its agent's weights.

    The pod runner ignores images and runs ``command`` on this machine, so the command is this
    interpreter; the operator adds the agent sidecar (``seedfork-agent run``) and the contract env.
    With ``agent_device`` the template runs the agent itself (``seedfork-agent run --device ...``),
    so agent and engine use the same device even where the agent's default (cuda when present) differs.
    """
    engine_cmd = [
        sys.executable,
        "-m",
        "seedfork_agent.engines.reference",
        "serve",
        "--config",
        str(model_dir),
        "--agent",
        f"http://$({c.ENV_POD_IP}):$({c.ENV_AGENT_PORT})",
        "--host",
        f"$({c.ENV_POD_IP})",
        "--port",
        f"$({c.ENV_ENGINE_PORT})",
        "--device",
        device,
    ]
    transfer: dict[str, Any] = {
        "backend": backend,
        # Every local pod shares this host: GPU memory moves over NVLink (copy engines), host memory over TCP.
        "protocol": "nvlink_intra" if device.startswith("cuda") else "tcp",
        "maxClientsPerSeed": max_clients_per_seed,
        "timeoutSeconds": timeout_seconds,
        "retries": retries,
        "fallback": "storage",
    }
    if bandwidth_limit_mbps:
        transfer["bandwidthLimitMbps"] = bandwidth_limit_mbps
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelReplicaSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            **({"standby": standby} if standby else {}),
            "model": {"name": "seedfork/reference-test", "revision": "main", "dtype": dtype, "uri": str(model_dir)},
            "engine": {"kind": "reference", "version": "0.1.0", "port": 30000},
            "transfer": transfer,
            "template": {
                "spec": {
                    "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                    "containers": [
                        {
                            "name": "engine",
                            "image": "seedfork/agent:dev",
                            "command": engine_cmd,
                            "ports": [{"name": "http", "containerPort": 30000}],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": 30000},
                                "periodSeconds": 1,
                                "failureThreshold": 3,
                            },
                        },
                        *([agent_container(agent_device)] if agent_device else []),
                    ],
                }
            },
        },
    }


def agent_container(device: str, port: int = 18080) -> dict[str, Any]:
    """The agent as a container of the template (the operator then injects none)."""
    return {
        "name": "seedfork-agent",
        "image": "seedfork/agent:dev",
        "command": ["seedfork-agent", "run", "--device", device],
        "ports": [{"name": "sf-agent", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": port}, "periodSeconds": 1, "failureThreshold": 3},
    }
