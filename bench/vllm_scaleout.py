"""Real vLLM on the local cluster: a replica loaded from storage and one loaded from a seed, in one run.

A fresh namespace, a ModelReplicaSet of vLLM (its CPU build, from the environment ``scripts/setup_vllm.sh``
builds) with ``replicas: 1``; once Ready, scaled to 2 (a cold seeded pod); then given ``standby: 1`` and, once
that standby's vLLM is warm, scaled to 3: the promotion, timed from the scale request to Ready and to its first
token, against its own transfer and verification and against the cold seeded pod (issue "time to first
token": >= 10x faster than cold, <= 1.5x its transfer and verification). Every replica's time from creation
to Ready and to its first token is split into:

- start: created -> Running (scheduling, the pod runner starting the containers);
- vllm_init: Running -> vLLM asks seedfork's loader for the weights (vLLM's imports, engine core and
  worker processes, model construction);
- weights: the agent's storage read or pull (transfer start -> end);
- verify: the agent's checksums of its store;
- engine_load: vLLM's worker maps the store, checksums it, loads it, checksums its own parameters, and
  the agent accepts the proof (the later of verified and vLLM's ask -> accepted);
- kv_and_api: accepted -> Ready (vLLM's weight post-processing, KV cache, API server up, probe, gate);
- first_token: Ready -> the first greedy completion answered.

With it, per pod, what it holds for weights (issue "one copy of the weights"): the store the agent serves
(whose memory the engine's parameters are) plus what each engine rank holds outside it (a private or
repacked copy, as the rank measured it), against the engine's own parameter bytes (host memory).
Target: <= 1.02.

    .venv/bin/python bench/vllm_scaleout.py [--timeout 900]

Prints a table; writes ``bench/results/vllm_scaleout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx

from seedfork_agent.engines.testmodel import make_model
from seedfork_api.spec import GROUP, PLURAL, VERSION
from seedfork_localdev import vllm
from seedfork_localdev.cluster import LocalCluster, api_client_for, install_agent_rbac, install_crd, new_namespace
from seedfork_localdev.controlplane import ControlPlane
from seedfork_localdev.pods import PodTracker
from seedfork_localdev.referenceset import ReferenceSet
from seedfork_localdev.scenario import format_table

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("start", "vllm_init", "weights", "verify", "engine_load", "kv_and_api", "first_token")


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


def _promote_standby(rset: ReferenceSet, tracker: PodTracker, timeout: float) -> dict[str, float | str]:
    """Add one standby, wait until its vLLM is warm, scale up by one: the promotion, timed from the request."""
    rset.custom.patch_namespaced_custom_object(
        GROUP, VERSION, rset.namespace, PLURAL, rset.name, {"spec": {"standby": 1}}
    )
    replicas = len([r for r in rset.rows() if not r.standby])
    rset.wait_ready(replicas, timeout, standby=1)
    (spare,) = [r for r in rset.rows() if r.standby and not r.deleting]
    asked = time.time()
    rset.scale(replicas + 1)
    rows = rset.wait_ready(replicas + 1, timeout, interval=0.1)
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


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(RESULTS / "vllm_scaleout.json"))
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    images = vllm.image_env()
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="seedfork-vllm-bench-") as tmp, ControlPlane() as cp:
        work = Path(tmp)
        api = api_client_for(cp.kubeconfig)
        install_crd(api)
        model = make_model(work / "model", "vllm-tiny")
        ns = new_namespace(api, "vbench")
        install_agent_rbac(api, ns)
        with (
            LocalCluster(cp.kubeconfig, ns, work / "cluster", images=images) as cluster,
            PodTracker(api, ns, "tiny") as tracker,
        ):
            rset = ReferenceSet(api, ns, "tiny")
            rset.create(vllm.set_body("tiny", model, replicas=1))
            firsts: dict[str, float] = {}
            tokens: dict[str, list[int]] = {}
            for replicas in (1, 2):
                if replicas > 1:
                    rset.scale(replicas)
                for row in rset.wait_ready(replicas, args.timeout, interval=0.1):
                    if row.name not in firsts:
                        tokens[row.name] = vllm.greedy_tokens(f"http://{row.ip}:30000", max_tokens=1)
                        firsts[row.name] = time.time()
            standby = _promote_standby(rset, tracker, args.timeout)
            token = rset.token()
            for row in rset.rows():
                if row.name not in firsts:  # the standby that refilled: no replica
                    continue
                engine = httpx.get(
                    f"http://{row.ip}:18080/v1/engine", headers={"Authorization": f"Bearer {token}"}, timeout=10
                ).json()
                params = sum(engine["paramBytes"].values())
                rows_out.append(
                    {
                        "pod": row.name,
                        "source": row.report.get("source"),
                        "phases_s": phases(tracker.times.get(row.name, {}), row.timing, firsts[row.name]),
                        "store_bytes": engine["storeBytes"],
                        "engine_param_bytes": params,
                        "engine_private_bytes": sum(engine["privateBytes"].values()),
                        "held_over_engine_params": (engine["storeBytes"] + sum(engine["privateBytes"].values()))
                        / params,
                        "first_token": tokens[row.name],
                    }
                )
            del cluster
    figures = ["total_ready", "total_first_token", *PHASES]
    print(
        format_table(
            ["pod", "source", *[f"{f} s" for f in figures], "held/params"],
            [
                [
                    r["pod"],
                    r["source"],
                    *["-" if r["phases_s"][f] is None else f"{r['phases_s'][f]:.2f}" for f in figures],
                    f"{r['held_over_engine_params']:.2f}",
                ]
                for r in rows_out
            ],
        )
    )
    storage = next(r for r in rows_out if r["source"] == "storage")
    seeded = next(r for r in rows_out if r["source"] == "seed")
    ratio = seeded["phases_s"]["total_ready"] / storage["phases_s"]["total_ready"]
    print(f"\nseeded / storage, creation -> Ready: {ratio:.2f} (same run, same machine)")
    standby["cold_seeded_over_promoted"] = seeded["phases_s"]["total_ready"] / standby["request_to_ready_s"]
    standby["promoted_over_transfer_and_verification"] = (
        standby["request_to_ready_s"] / standby["transfer_and_verification_s"]
    )
    print(
        f"promoted standby: scale request -> Ready {standby['request_to_ready_s']:.2f} s, first token "
        f"{standby['request_to_first_token_s']:.2f} s; cold seeded pod / promoted "
        f"{standby['cold_seeded_over_promoted']:.1f} (target >= 10); promoted / its transfer and verification "
        f"{standby['promoted_over_transfer_and_verification']:.1f} (target <= 1.5)"
    )
    doc = {
        "benchmark": "vllm_scaleout",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vllm": vllm.VERSION,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "model": "vllm-tiny (float32, 7.3 MB)",
        "pods": rows_out,
        "seeded_over_storage_ready": ratio,
        "standby": standby,
        "targets": {"cold_seeded_over_promoted_min": 10.0, "promoted_over_transfer_and_verification_max": 1.5},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
