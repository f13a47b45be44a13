"""Time-to-Ready breakdown of a scale-out, end to end on the local cluster (the ``make demo`` scenario).

For each run: a fresh namespace, a ModelReplicaSet of the reference engine with ``replicas: 1``, Ready,
then scaled to N through the scale subresource. Every pod's path from creation to Ready is split into:
schedule (created -> bound), start (bound -> Running), process start (Running -> agent up: Python and
torch imports), handshake (agent up -> transfer starts), transfer, verify, attach (engine maps the store
and re-checks it), ready lag (-> Ready: report, readiness gate, probe). The overhead is the total minus
transfer, verify and attach; its control-plane part is the overhead minus process start. Times come from
a pod watcher and the agent's timing annotation, on one clock.

    .venv/bin/python bench/e2e_scaleout.py [--backend transfer_engine|nccl] [--size tiny|small] [--runs 3]

Prints a per-pod table and p50/p99 per figure; writes ``bench/results/e2e_scaleout_<backend>_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seedfork_localdev.cluster import LocalCluster, api_client_for, install_agent_rbac, install_crd, new_namespace
from seedfork_localdev.controlplane import ControlPlane
from seedfork_localdev.manifests import reference_set_body
from seedfork_localdev.pods import PodTracker
from seedfork_localdev.referenceset import ReferenceSet
from seedfork_localdev.scenario import format_table, make_model, model_bytes, scale_out
from seedfork_localdev.timetoready import FIGURES, Breakdown, percentile, summary

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_OVERHEAD_P99_S = 1.0


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "loadavg_1m_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_import_s": torch_import_seconds(),
    }


def torch_import_seconds(runs: int = 3) -> float:
    """Median time of a new interpreter that imports torch, on the idle machine: the floor under a pod's
    process start (each reference-engine pod starts two such processes, agent and engine)."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="transfer_engine", choices=["transfer_engine", "nccl"])
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--out", help="JSON path (default bench/results/e2e_scaleout_<backend>_<size>.json)")
    args = p.parse_args(argv)
    # SIGTERM (a timeout) unwinds like Ctrl-C, so the pod runner and the control plane stop their processes.
    signal.signal(signal.SIGTERM, _interrupt)

    env = machine()
    runs = []
    failures = []
    with tempfile.TemporaryDirectory(prefix="seedfork-bench-") as tmp, ControlPlane() as cp:
        work = Path(tmp)
        api = api_client_for(cp.kubeconfig)
        install_crd(api)
        model = make_model(work / "model", args.size)
        nbytes = model_bytes(model)
        for i in range(args.runs):
            ns = new_namespace(api, "bench")
            install_agent_rbac(api, ns)
            body = reference_set_body(
                "llama", model, backend=args.backend, replicas=1, device=args.device, agent_device=args.device
            )
            try:
                with (
                    LocalCluster(cp.kubeconfig, ns, work / f"run{i}") as cluster,
                    PodTracker(api, ns, "llama") as tracker,
                ):
                    rset = ReferenceSet(api, ns, "llama")
                    result = scale_out(
                        rset, tracker, body=body, replicas_to=args.replicas, timeout=args.timeout, cluster=cluster
                    )
                    rset.scale(0)  # stop the pods before the next run so runs do not share the CPU
                    rset.wait_ready(0, args.timeout)
            except Exception as e:  # report, keep the other runs
                failures.append(f"run {i}: {type(e).__name__}: {str(e)[:2000]}")
                print(f"run {i} failed: {e}", file=sys.stderr)
                continue
            seen = result.seen
            pods = []
            for row, b in zip(result.rows, result.breakdowns, strict=True):
                created = seen.get(row.name, {}).get("created")
                pods.append(
                    {
                        **b.as_dict(),
                        "run": i,
                        "backend": row.backend or None,
                        "scaled": row.source == "seed",
                        # scale request -> pod seen: how fast the operator reacts (scaled-out pods only)
                        "react": (created - result.scale_requested_at) if row.source == "seed" and created else None,
                        "seen": seen.get(row.name, {}),
                        "timing": row.timing,
                        "assignment": row.assignment,
                    }
                )
            runs.append(
                {
                    "run": i,
                    "scale_out_seconds": result.scale_out_seconds,
                    "identical_outputs": result.identical,
                    "pods": pods,
                }
            )
            print(
                f"run {i}: {args.replicas} Ready {result.scale_out_seconds:.2f} s after the scale request; "
                f"outputs identical: {result.identical}",
                flush=True,
            )

    fields = set(Breakdown.__dataclass_fields__)
    scaled = [
        Breakdown(**{k: v for k, v in pod.items() if k in fields}) for r in runs for pod in r["pods"] if pod["scaled"]
    ]
    stats = summary(scaled)
    reacts = sorted(pod["react"] for r in runs for pod in r["pods"] if pod["react"] is not None)

    headers = ["run", "pod", "source", *[f"{f} ms" for f in FIGURES]]
    table = [[pod["run"], pod["pod"], pod["source"], *[ms(pod[f]) for f in FIGURES]] for r in runs for pod in r["pods"]]
    print()
    print(format_table(headers, table))
    print(f"\nscaled-out pods (n={len(scaled)}):")
    print(
        format_table(
            ["figure", "p50 ms", "p99 ms", "max ms"],
            [[f, ms(stats[f]["p50"]), ms(stats[f]["p99"]), ms(stats[f]["max"])] for f in FIGURES],
        )
    )
    overhead_p99 = stats["overhead"]["p99"]
    p99_wo = stats["control_plane"]["p99"]
    met = overhead_p99 is not None and overhead_p99 <= TARGET_OVERHEAD_P99_S
    met_cp = p99_wo is not None and p99_wo <= TARGET_OVERHEAD_P99_S
    target = f"target <= {TARGET_OVERHEAD_P99_S * 1000:.0f} ms"
    print(
        f"\noverhead per pod (all but transfer, verify, attach): p50 {ms(stats['overhead']['p50'])} ms, "
        f"p99 {ms(overhead_p99)} ms ({target}: {'met' if met else 'NOT met'})"
    )
    print(
        f"  control plane (overhead less the pods' process start, i.e. Python + torch imports): "
        f"p50 {ms(stats['control_plane']['p50'])} ms, p99 {ms(p99_wo)} ms ({target}: {'met' if met_cp else 'NOT met'})"
    )
    print(
        f"  a new interpreter importing torch takes {env['torch_import_s']:.2f} s on this idle machine "
        f"({env['cpus']} CPUs); every scaled pod starts two (agent and engine), {args.replicas - 1} pods at once"
    )
    if reacts:
        print(f"scale request -> pod created: p50 {ms(percentile(reacts, 50))} ms, max {ms(reacts[-1])} ms")

    out = Path(args.out) if args.out else RESULTS / f"e2e_scaleout_{args.backend}_{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result_doc = {
        "benchmark": "e2e_scaleout",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": args.backend,
        "model_size": args.size,
        "model_bytes": nbytes,
        "replicas": args.replicas,
        "device": args.device,
        "machine": env,
        "target": {"overhead_p99_s": TARGET_OVERHEAD_P99_S},
        "summary_scaled_pods_s": stats,
        "overhead_without_process_start_p99_s": p99_wo,
        "react_s": {"p50": percentile(reacts, 50), "max": reacts[-1] if reacts else None},
        "overhead_target_met": met,
        "control_plane_target_met": met_cp,
        "runs": runs,
        "failures": failures,
    }
    out.write_text(json.dumps(result_doc, indent=2, sort_keys=True))
    print(f"\nwrote {out}")
    return 0 if runs and not failures and all(r["identical_outputs"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
