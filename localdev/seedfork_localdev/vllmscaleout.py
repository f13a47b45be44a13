"""Real vLLM scaling out on the local cluster: a replica from storage, a cold seeded pod, a promoted standby.

A fresh namespace, a ModelReplicaSet of vLLM (its CPU build, from the environment ``scripts/setup_vllm.sh``
builds) with ``replicas: 1``; once Ready, scaled to 2 (a cold seeded pod); then given ``standby: 1`` and, once
that standby's vLLM is warm, scaled to 3: the promotion, timed from the scale request to Ready and to its first
token, against its own transfer and verification and against the cold seeded pod. Every replica's time from
creation to Ready and to its first token is split into:

- start: created -> Running (scheduling, the pod runner starting the containers);
- vllm_init: Running -> vLLM asks seedfork's loader for the weights (vLLM's imports, engine core and
  worker processes, model construction);
- weights: the agent's storage read or pull (transfer start -> end);
- verify: the agent's checksums of its store;
- engine_load: vLLM's worker maps the store, checksums it, loads it, checksums its own parameters, and
  the agent accepts the proof (the later of verified and vLLM's ask -> accepted);
- kv_and_api: accepted -> Ready (vLLM's weight post-processing, KV cache, API server up, probe, gate);
- first_token: Ready -> the first greedy completion answered.

With it, per pod, what it holds for weights: the store the agent serves (whose memory the engine's parameters
are) plus what each engine rank holds outside it, against the engine's own parameter bytes (host memory).
``bench/vllm_scaleout.py`` and ``make demo ARGS="--engine vllm"`` run it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from seedfork_api.spec import GROUP, PLURAL, VERSION

from . import vllm
from .cluster import LocalCluster, install_agent_rbac, new_namespace
from .pods import PodRow, PodTracker
from .referenceset import ReferenceSet

SET_NAME = "tiny"
PHASES = ("start", "vllm_init", "weights", "verify", "engine_load", "kv_and_api", "first_token")
MODEL = "vllm-tiny (float32, 7.3 MB)"


@dataclass
class VllmScaleOut:
    pods: list[dict[str, Any]] = field(default_factory=list)  # the replicas: storage, then the cold seeded pod
    standby: dict[str, Any] = field(default_factory=dict)  # the promotion

    def pod(self, source: str) -> dict[str, Any]:
        return next(r for r in self.pods if r["source"] == source)

    @property
    def seeded_over_storage_ready(self) -> float:
        return self.pod("seed")["phases_s"]["total_ready"] / self.pod("storage")["phases_s"]["total_ready"]

    @property
    def cold_seeded_over_promoted(self) -> float:
        return self.pod("seed")["phases_s"]["total_ready"] / self.standby["request_to_ready_s"]

    @property
    def promoted_over_transfer_and_verification(self) -> float:
        return self.standby["request_to_ready_s"] / self.standby["transfer_and_verification_s"]


def _d(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else max(0.0, end - start)


def phases(seen: dict[str, float], timing: dict[str, float], first_token_at: float) -> dict[str, float | None]:
    running, ready = seen.get("running"), seen.get("ready")
    ask, accepted = timing.get("engineLoadStart"), timing.get("engineAttached")
    verified = timing.get("verified")
    return {
        "total_ready": _d(ready, seen.get("created")),
        "total_first_token": _d(first_token_at, seen.get("created")),
        "start": _d(running, seen.get("created")),
        "vllm_init": _d(ask, running),
        "weights": _d(timing.get("transferEnd"), timing.get("transferStart")),
        "verify": _d(verified, timing.get("transferEnd")),
        "engine_load": _d(accepted, max(x for x in (verified, ask) if x is not None) if verified or ask else None),
        "kv_and_api": _d(ready, accepted),
        "first_token": _d(first_token_at, ready),
    }


def promote_standby(rset: ReferenceSet, tracker: PodTracker, timeout: float) -> dict[str, Any]:
    """Add one standby, wait until its vLLM is warm, scale up by one: the promotion, timed from the request."""
    rset.custom.patch_namespaced_custom_object(
        GROUP, VERSION, rset.namespace, PLURAL, rset.name, {"spec": {"standby": 1}}
    )
    replicas = len([r for r in rset.rows() if not r.standby])
    rset.wait_ready(replicas, timeout, standby=1)
    (spare,) = [r for r in rset.rows() if r.standby and not r.deleting]
    time.sleep(2.0)  # let the warm-up's CPU settle: the scale request should find an idle machine
    asked = time.time()
    rset.scale(replicas + 1)
    rows = rset.wait_ready(replicas + 1, timeout, interval=0.02)
    promoted = next(r for r in rows if r.name == spare.name)
    ready = tracker.times.get(promoted.name, {}).get("ready") or time.time()
    vllm.greedy_tokens(f"http://{promoted.ip}:30000", max_tokens=1)
    first_token = time.time()
    t = promoted.timing
    return {
        "pod": promoted.name,
        "request_to_ready_s": ready - asked,
        "request_to_first_token_s": first_token - asked,
        # its transfer, the agent's checksums, and the running vLLM mapping and proving the store
        "transfer_and_verification_s": t["engineAttached"] - t["transferStart"],
    }


def _held(row: PodRow, token: str) -> dict[str, Any]:
    engine = httpx.get(
        f"http://{row.ip}:18080/v1/engine", headers={"Authorization": f"Bearer {token}"}, timeout=10
    ).json()
    params, private = sum(engine["paramBytes"].values()), sum(engine["privateBytes"].values())
    return {
        "store_bytes": engine["storeBytes"],
        "engine_param_bytes": params,
        "engine_private_bytes": private,
        "held_over_engine_params": (engine["storeBytes"] + private) / params,
    }


def run(
    api: client.ApiClient,
    kubeconfig: Path,
    workdir: Path,
    model: Path,
    timeout: float,
    on_poll: Callable[[list[PodRow]], None] | None = None,
) -> VllmScaleOut:
    """The whole scenario in a fresh namespace; leaves nothing running."""
    namespace = new_namespace(api, "vllm-scaleout")
    install_agent_rbac(api, namespace)
    out = VllmScaleOut()
    with (
        LocalCluster(kubeconfig, namespace, workdir, images=vllm.image_env()) as cluster,
        PodTracker(api, namespace, SET_NAME) as tracker,
    ):
        rset = ReferenceSet(api, namespace, SET_NAME)

        def poll(rows: list[PodRow]) -> None:
            cluster.check_alive()
            if on_poll:
                on_poll(rows)

        rset.create(vllm.set_body(SET_NAME, model, replicas=1))
        firsts: dict[str, float] = {}
        tokens: dict[str, list[int]] = {}
        for replicas in (1, 2):
            if replicas > 1:
                rset.scale(replicas)
            for row in rset.wait_ready(replicas, timeout, poll, interval=0.1):
                if row.name not in firsts:
                    tokens[row.name] = vllm.greedy_tokens(f"http://{row.ip}:30000", max_tokens=1)
                    firsts[row.name] = time.time()
        out.standby = promote_standby(rset, tracker, timeout)
        token = rset.token()
        for row in rset.rows():
            if row.name not in firsts:  # the promoted standby (timed above) and the one that refilled
                continue
            out.pods.append(
                {
                    "pod": row.name,
                    "source": row.report.get("source"),
                    "phases_s": phases(tracker.times.get(row.name, {}), row.timing, firsts[row.name]),
                    **_held(row, token),
                    "first_token": tokens[row.name],
                }
            )
    return out
