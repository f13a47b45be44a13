"""Real vLLM on the local cluster: a replica loaded from storage and one loaded from a seed, in one run.

A fresh namespace, a ModelReplicaSet of vLLM (its CPU build, from the environment ``scripts/setup_vllm.sh``
builds) with ``replicas: 1``; once Ready, scaled to 2. Every pod's time from creation to Ready and to its
first token is split into:

- start: created -> Running (scheduling, the pod runner starting the containers);
- vllm_init: Running -> vLLM asks seedfork's loader for the weights (vLLM's imports, engine core and
  worker processes, model construction);
- weights: the agent's storage read or pull (transfer start -> end);
- verify: the agent's checksums of its store;
- engine_load: vLLM's worker maps the store, checksums it, loads it, checksums its own parameters, and
  the agent accepts the proof (the later of verified and vLLM's ask -> accepted);
- kv_and_api: accepted -> Ready (vLLM's weight post-processing, KV cache, API server up, probe, gate);
- first_token: Ready -> the first greedy completion answered.

With it, per pod, what it holds for weights (issue "one copy of the weights"): the agent's store against
the engine's own parameter bytes (host memory; vLLM's CPU build repacks linear weights into its own
oneDNN layout after the load, so the engine's copy cannot be the agent's memory here).

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
            token = rset.token()
            for row in rset.rows():
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
                        "held_over_engine_params": (engine["storeBytes"] + params) / params,
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
    doc = {
        "benchmark": "vllm_scaleout",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vllm": vllm.VERSION,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_end": os.getloadavg()[0]},
        "model": "vllm-tiny (float32, 7.3 MB)",
        "pods": rows_out,
        "seeded_over_storage_ready": ratio,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, sort_keys=True))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
