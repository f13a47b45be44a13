"""One replica added to a Ready set, cold or from a warm standby, and its startup phases on one clock.

A set of the reference engine with ``replicas: 1`` (and ``standby: 1`` for the standby case) is made Ready,
then scaled to 2. The added pod is a new pod (cold: its agent and engine processes start after the scale
request) or the promoted standby (its processes, and the engine's API, were up before it). Its phases are
seconds after the scale request, negative when they happened before it (a standby's warm engine):

- ``created``: the pod object seen by the pod watch;
- ``process start``: the agent's process; ``engine start`` / ``engine up``: the engine's process, then its
  API answering (initialised and warm, no weights);
- ``assigned``: the assignment that brought the weights (a standby's promotion);
- ``transfer start`` / ``transfer end``: the weights moving; ``verified``: the agent's checksums;
- ``engine verified``: the engine attached the store and re-checked every tensor, inside itself;
- ``reported``: the agent's verified report, seen by the pod watch; ``gated``: the operator's readiness gate
  True, seen by the pod watch (what the control plane adds after the proof: report, gate, Ready);
- ``ready``: the pod's Ready condition (readiness gate and probe); ``first token``: one generated token
  returned by the engine (asked once the pod is Ready).

``transfer_verify_s`` is what moving and checking the weights cost: the agent's transfer start to verified
plus the engine's own re-check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from .cluster import LocalCluster, install_agent_rbac, new_namespace
from .manifests import reference_set_body
from .pods import PodRow, PodTracker
from .referenceset import ReferenceSet
from .scenario import PROMPT, engine_info
from .waiting import wait_until

SET_NAME = "llama"
PHASES = (
    "created",
    "process start",
    "engine start",
    "engine up",
    "assigned",
    "transfer start",
    "transfer end",
    "verified",
    "engine verified",
    "reported",
    "gated",
    "ready",
    "first token",
)


@dataclass
class Startup:
    mode: str  # cold | standby
    pod: str
    source: str  # where the added pod's weights came from: seed or storage
    bytes: int
    phases: dict[str, float | None]  # seconds after the scale request
    ready_s: float  # scale request -> Ready
    first_token_s: float  # scale request -> first token
    transfer_verify_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_token(client: httpx.Client, row: PodRow, port: int = 30000) -> float:
    """When one greedily generated token came back from the pod's engine (epoch seconds). ``client``: made, with
    the set's token, before the scale request, as a caller that already talks to the set has them."""
    r = client.post(
        f"http://{row.ip}:{port}/generate",
        json={"text": PROMPT, "sampling_params": {"max_new_tokens": 1}},
        timeout=120,
    )
    r.raise_for_status()
    return time.time()


def phases_of(seen: dict[str, float], timing: dict[str, Any], engine: dict[str, Any], after: float) -> dict:
    e = engine.get("phases") or {}
    at = {
        "created": seen.get("created"),
        "process start": timing.get("started"),
        "engine start": timing.get("engineStart") or e.get("started"),
        "engine up": timing.get("engineUp") or e.get("up"),
        "assigned": timing.get("assigned"),
        "transfer start": timing.get("transferStart"),
        "transfer end": timing.get("transferEnd"),
        "verified": timing.get("verified"),
        "engine verified": timing.get("engineVerified") or e.get("verified"),
        "reported": seen.get("verified"),
        "gated": seen.get("gate"),
        "ready": seen.get("ready"),
    }
    return {k: (None if v is None else float(v) - after) for k, v in at.items()}


def transfer_verify(timing: dict[str, Any], engine: dict[str, Any]) -> float | None:
    start, verified = timing.get("transferStart"), timing.get("verified")
    e = engine.get("phases") or {}
    if start is None or verified is None or e.get("attached") is None or e.get("verified") is None:
        return None
    return (verified - start) + (e["verified"] - e["attached"])


def add_one(
    api: client.ApiClient,
    kubeconfig: Path,
    workdir: Path,
    model: Path,
    *,
    standby: bool,
    timeout: float,
    device: str = "cpu",
    on_poll: Callable[[list[PodRow]], None] | None = None,
) -> Startup:
    """Scale a fresh set 1 -> 2 in its own namespace (and local cluster); the added pod's startup. Leaves
    nothing running. In the standby case the refilling standby starts as the promoted one loads, as it would
    in a real cluster (here it shares the machine's CPUs)."""
    namespace = new_namespace(api, "startup")
    install_agent_rbac(api, namespace)
    spares = 1 if standby else 0
    body = reference_set_body(SET_NAME, model, replicas=1, device=device, agent_device=device, standby=spares)
    with LocalCluster(kubeconfig, namespace, workdir) as cluster, PodTracker(api, namespace, SET_NAME) as tracker:
        rset = ReferenceSet(api, namespace, SET_NAME)

        def poll(rows: list[PodRow]) -> None:
            cluster.check_alive()
            if on_poll:
                on_poll(rows)

        rset.create(body)
        (first,) = rset.wait_ready(1, timeout, poll, standby=spares or None)
        token = rset.token()
        # Plain HTTP to a pod: no TLS context (loading the CA bundle is tens of ms of CPU, not the pod's time).
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, verify=False) as client:
            time.sleep(2.0)  # let the warm-up's CPU settle: the scale request should find an idle machine
            requested = time.time()
            rset.scale(2)
            rows = rset.wait_ready(2, timeout, poll, interval=0.02)
            added = next(r for r in rows if r.name != first.name)
            token_at = first_token(client, added)
        engine = engine_info(added, token)

        def timed() -> dict[str, Any] | None:
            row = next((r for r in rset.rows() if r.name == added.name), None)
            return row.timing if row is not None and row.timing.get("engineVerified") else None

        timing = wait_until(timed, 30, f"the engine's verification in {added.name}'s timing")
        seen = dict(tracker.times.get(added.name, {}))
        phases = phases_of(seen, timing, engine, requested)
        phases["first token"] = token_at - requested
        return Startup(  # leaving the cluster ends every pod: the next case finds an idle machine
            mode="standby" if standby else "cold",
            pod=added.name,
            source=added.source,
            bytes=int(timing.get("bytes") or 0),
            phases=phases,
            ready_s=phases["ready"],
            first_token_s=phases["first token"],
            transfer_verify_s=transfer_verify(timing, engine),
        )
