"""Operator benchmark: seed decision + pod render latency, and a 1→100 scale-out on the real apiserver.

1. Pure functions: one planning pass that decides the source of one new pod, and the render of
   that pod, with 100 sets x 10 pods and with one set of 1,000 pods (all verified seeds spread
   over 50 nodes in 5 zones). Target: ≤ 1 ms per decision at 1,000 pods.
2. Real kube-apiserver + etcd (local control plane), operator in-process: a set with one Ready
   seed is scaled 1→100 through the scale subresource (what ``kubectl scale`` does); per pod, the
   time from the scale call until the pod exists with its assignment (seen by a watch), and where
   the assignments send the pods: the seed, storage, or queued for a seed slot. No agent runs, so
   nothing verifies: the planner decides from its defaults and the one seed.

    .venv/bin/python bench/operator_bench.py [--pods 100] [--skip-cluster]

Prints a table and writes ``bench/results/operator_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from seedfork_api import contract as c
from seedfork_api.spec import ModelReplicaSetSpec
from seedfork_operator import planner, render
from seedfork_operator.podview import PodView

RESULTS = Path(__file__).resolve().parent / "results"
TEMPLATE = {"spec": {"containers": [{"name": "engine", "image": "engine:1", "command": ["engine"]}]}}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def spec_for(replicas: int) -> ModelReplicaSetSpec:
    return ModelReplicaSetSpec.model_validate(
        {
            "replicas": replicas,
            "model": {"name": "m", "uri": "/m"},
            "engine": {"kind": "reference"},
            "transfer": {"maxClientsPerSeed": 4},
            "template": TEMPLATE,
        }
    )


def fleet(n: int, fp: str) -> tuple[list[PodView], dict]:
    nodes = {
        f"node-{i}": {"kubernetes.io/hostname": f"node-{i}", "topology.kubernetes.io/zone": f"z{i % 5}"}
        for i in range(50)
    }
    pods = [
        PodView(
            name=f"p{i}",
            created=float(i),
            node=f"node-{i % 50}",
            ip=f"10.0.{i // 250}.{i % 250}",
            fingerprint=fp,
            ready=True,
            gate=True,
            assignment=c.Assignment(attempt=1, source="storage", assigned_at=0.0),
            report=c.AgentReport(attempt=1, state="verified", serving=True),
        )
        for i in range(n)
    ]
    return pods, nodes


def decide_and_render(
    spec: ModelReplicaSetSpec, fp: str, pods: list[PodView], nodes: dict, rule: planner.Rule = "expected"
) -> tuple[float, float]:
    t0 = time.perf_counter()
    result = planner.plan(spec, fp, pods, nodes, time.time(), lambda: "new-pod", "node-7", rule=rule)
    t1 = time.perf_counter()
    ((name, assignment),) = result.create
    assert assignment.source == "seed"
    render.render_pod(
        spec=spec,
        set_name="s",
        set_uid="u",
        namespace="ns",
        pod_name=name,
        fingerprint=fp,
        assignment=assignment,
        token_secret="s-seedfork-token",
        agent_image="agent:1",
    )
    return t1 - t0, time.perf_counter() - t1


def batch_decisions(per_set: int, batch: int, repeat: int = 20) -> dict:
    """One pass deciding ``batch`` new pods at once (a scale-out): the pass cost per decision."""
    spec = spec_for(per_set + batch)
    fp = spec.fingerprint()
    pods, nodes = fleet(per_set, fp)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        counter = iter(range(10**9))
        result = planner.plan(spec, fp, pods, nodes, time.time(), lambda c=counter: f"n{next(c)}", "node-7")
        times.append(time.perf_counter() - t0)
        assert len(result.create) == batch
    return {
        "case": f"1 set x {per_set} pods, {batch} decided in one pass",
        "decisions": batch * repeat,
        "pass_p50_ms": statistics.median(times) * 1e3,
        "per_decision_p50_ms": statistics.median(times) * 1e3 / batch,
    }


def queued_decisions(per_set: int, repeat: int = 20) -> dict:
    """One seed, ``per_set - 1`` pods queued behind it, one seed client just verified: one pass re-decides the
    whole queue (the forecast's path), which is what every pass of a large scale-up does."""
    spec = spec_for(per_set + 1)
    fp = spec.fingerprint()
    seeds, nodes = fleet(2, fp)
    queued = [
        PodView(
            name=f"q{i}",
            created=float(i),
            node=f"node-{i % 50}",
            fingerprint=fp,
            assignment=c.Assignment(
                attempt=1, source="queued", assigned_at=time.time() - 1, waitUntil=time.time() + 60
            ),
        )
        for i in range(per_set - 1)
    ]
    pods = [*seeds, *queued]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = planner.plan(spec, fp, pods, nodes, time.time(), lambda: "n", "node-7")
        times.append(time.perf_counter() - t0)
        assert [a.source for _, a in result.assign] == ["seed", "seed"] and not result.create
    return {
        "case": f"1 set x {per_set} pods, {per_set - 1} queued re-decided in one pass",
        "decisions": (per_set - 1) * repeat,
        "pass_p50_ms": statistics.median(times) * 1e3,
        "per_decision_p50_ms": statistics.median(times) * 1e3 / (per_set - 1),
    }


def bench_pure(repeat: int = 200) -> list[dict]:
    """Both rules, interleaved, so they share the machine's load: the decision by expected time against the
    rule it replaced."""
    rows = []
    for sets, per_set in ((100, 10), (1, 1000)):
        spec = spec_for(per_set + 1)
        fp = spec.fingerprint()
        pods, nodes = fleet(per_set, fp)
        decide: dict[str, list[float]] = {"expected": [], "legacy": []}
        rend: list[float] = []
        for i in range(max(1, repeat // sets)):
            for _ in range(sets):  # each set is planned on its own, as the operator does
                for rule in ("expected", "legacy") if i % 2 else ("legacy", "expected"):  # neither always first
                    d, r = decide_and_render(spec, fp, pods, nodes, rule)
                    decide[rule].append(d)
                    rend.append(r)
        rows.append(
            {
                "case": f"{sets} sets x {per_set} pods",
                "decisions": len(decide["expected"]),
                "decide_p50_ms": statistics.median(decide["expected"]) * 1e3,
                "decide_p99_ms": pct(decide["expected"], 99) * 1e3,
                "legacy_decide_p50_ms": statistics.median(decide["legacy"]) * 1e3,
                "legacy_decide_p99_ms": pct(decide["legacy"], 99) * 1e3,
                "render_p50_ms": statistics.median(rend) * 1e3,
                "render_p99_ms": pct(rend, 99) * 1e3,
            }
        )
    return rows


def bench_cluster(target: int) -> dict:
    import yaml
    from kubernetes import client, config, watch

    from seedfork_localdev.controlplane import ControlPlane
    from seedfork_operator.config import OperatorConfig
    from seedfork_operator.runner import OperatorThread

    crd_file = Path(__file__).resolve().parents[1] / "crds" / "seedfork.io_modelreplicasets.yaml"
    with ControlPlane() as cp:
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        core, objects = client.CoreV1Api(api), client.CustomObjectsApi(api)
        ext = client.ApiextensionsV1Api(api)
        ext.create_custom_resource_definition(yaml.safe_load(crd_file.read_text()))
        time.sleep(2)
        ns = "bench"
        core.create_namespace({"metadata": {"name": ns}})
        group, version, plural = "seedfork.io", "v1alpha1", "modelreplicasets"
        body = {
            "apiVersion": f"{group}/{version}",
            "kind": "ModelReplicaSet",
            "metadata": {"name": "scale"},
            "spec": {
                "replicas": 1,
                "model": {"name": "m", "uri": "/m"},
                "engine": {"kind": "reference"},
                "transfer": {"maxClientsPerSeed": 4},
                "template": TEMPLATE,
            },
        }
        seen: dict[str, float] = {}
        stop = threading.Event()

        def watcher() -> None:  # first time each pod is seen with its assignment
            w = watch.Watch()
            try:
                for ev in w.stream(core.list_namespaced_pod, ns, timeout_seconds=120):
                    pod = ev["object"]
                    if (pod.metadata.annotations or {}).get(c.ANN_ASSIGNMENT):
                        seen.setdefault(pod.metadata.name, time.time())
                    if stop.is_set():
                        w.stop()
            except Exception:  # the control plane is going away at the end of the run
                pass

        cfg = OperatorConfig(interval=2.0, metrics_port=0)
        with OperatorThread([ns], cfg):
            objects.create_namespaced_custom_object(group, version, ns, plural, body)
            deadline = time.time() + 60
            while not core.list_namespaced_pod(ns).items and time.time() < deadline:
                time.sleep(0.05)
            first = core.list_namespaced_pod(ns).items[0].metadata.name
            # play kubelet + agent for the first pod only: it becomes the one seed, its timing saying it loaded
            # 16 GB from storage in 11.1 s (as measured from local disk)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            loaded = c.PodTiming(transferStart=time.time() - 11.1, verified=time.time(), bytes=16 * 10**9)
            report = c.AgentReport(attempt=1, state="verified", source="storage", serving=True)
            core.patch_namespaced_pod(first, ns, c.annotation_patch(report=report, timing=loaded))
            status = {"phase": "Running", "podIP": "127.0.0.2", "conditions": [{"type": "Ready", "status": "True"}]}
            status["conditions"][0]["lastTransitionTime"] = now
            core.patch_namespaced_pod_status(first, ns, {"status": status})
            while (
                objects.get_namespaced_custom_object(group, version, ns, plural, "scale").get("status", {}).get("seeds")
                != 1
                and time.time() < deadline
            ):
                time.sleep(0.05)
            thread = threading.Thread(target=watcher, daemon=True)
            thread.start()
            time.sleep(0.5)
            t0 = time.time()
            objects.patch_namespaced_custom_object_scale(
                group, version, ns, plural, "scale", {"spec": {"replicas": target}}
            )
            while len(seen) < target and time.time() < t0 + 120:
                time.sleep(0.01)
            total = time.time() - t0
            stop.set()
            pods = core.list_namespaced_pod(ns).items
        lat = [seen[p.metadata.name] - t0 for p in pods if p.metadata.name != first and p.metadata.name in seen]
        added = [p for p in pods if p.metadata.name != first]
        sources = [c.Assignment.from_annotations(p.metadata.annotations).source for p in added]
        return {
            "pods": len(pods),
            "assigned": len(lat),
            "wall_s": total,
            "per_pod_p50_s": statistics.median(lat),
            "per_pod_p99_s": pct(lat, 99),
            "per_pod_max_s": max(lat),
            "from_seed": sources.count("seed"),
            "from_storage": sources.count("storage"),
            "queued": sources.count("queued"),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=100)
    p.add_argument("--skip-cluster", action="store_true")
    args = p.parse_args()
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0]},
        "pure": bench_pure(),
        "batch": [batch_decisions(1000, 100), batch_decisions(10, 100), queued_decisions(1000)],
    }
    print(
        f"{'case':<22} {'decisions':>9} {'decide p50':>11} {'p99':>8} {'legacy p50':>11} {'p99':>8}"
        f" {'render p50':>11} {'p99':>8}  (ms)"
    )
    for r in out["pure"]:
        print(
            f"{r['case']:<22} {r['decisions']:>9} {r['decide_p50_ms']:>11.3f} {r['decide_p99_ms']:>8.3f}"
            f" {r['legacy_decide_p50_ms']:>11.3f} {r['legacy_decide_p99_ms']:>8.3f}"
            f" {r['render_p50_ms']:>11.3f} {r['render_p99_ms']:>8.3f}"
        )
    for r in out["batch"]:
        print(f"{r['case']:<55} pass p50 {r['pass_p50_ms']:.2f} ms = {r['per_decision_p50_ms']:.3f} ms/decision")
    if not args.skip_cluster:
        out["scale_out"] = s = bench_cluster(args.pods)
        print(
            f"scale 1->{args.pods} on the real apiserver: every pod assigned after {s['wall_s']:.2f}s; "
            f"per pod p50 {s['per_pod_p50_s']:.3f}s p99 {s['per_pod_p99_s']:.3f}s "
            f"({s['from_seed']} from the seed, {s['from_storage']} from storage, {s['queued']} queued for a seed)"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "operator_bench.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
