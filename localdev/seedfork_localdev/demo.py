"""``make demo``: a ModelReplicaSet of the reference engine scales 1 -> 4, the new replicas pull from seeds.

Development tool. Starts the local control plane, installs the CRD, runs the local pod runner (three
nodes, two zones) and the operator, writes the deterministic test model with the reference engine's
own command, creates a ModelReplicaSet with ``replicas: 1``, waits until it is Ready, then scales it
to 4 through the scale subresource (as ``kubectl scale`` or an HPA would), shows each pod's progress,
and prints where every replica got its weights, how long it took, and whether all replicas generate
the same text. Then it adds one replica twice more, each to a fresh set: once as a new (cold) pod and once
by promoting a warm standby (``spec.standby: 1``), and prints both times to Ready and to the first token,
phase by phase, with what they mean on this machine (``--no-standby`` skips this). Exits non-zero when
anything fails. ``--keep`` leaves everything running.

``--engine vllm`` runs the same story with real vLLM (its CPU build, from the environment ``make setup``
builds): a replica from storage, a cold seeded pod, then a promoted warm standby, each phase timed
(``vllmscaleout``), and what the figures mean on this machine.

    python -m seedfork_localdev.demo [--size small|tiny] [--backend transfer_engine|nccl] [--no-standby] [--keep]
    python -m seedfork_localdev.demo --engine vllm
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .cluster import LocalCluster, api_client_for, install_agent_rbac, install_crd, new_namespace
from .manifests import reference_set_body
from .pods import PodRow, PodTracker
from .referenceset import ReferenceSet
from .scenario import PROMPT, ScaleOut, format_table, make_model, model_bytes, scale_out
from .waiting import ScenarioError

SET_NAME = "llama"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


class Progress:
    """Prints one line whenever a pod's state, bytes or readiness changes (works in any terminal or log)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.last: dict[str, tuple] = {}

    def __call__(self, rows: list[PodRow]) -> None:
        for row in rows:
            key = (row.phase, row.state, row.bytes_done, row.ready, row.origin, row.attempt)
            if self.last.get(row.name) == key:
                continue
            self.last[row.name] = key
            total = f"/{human_bytes(row.bytes_total)}" if row.bytes_total else ""
            got = human_bytes(row.bytes_done) + total if row.bytes_done or row.bytes_total else "-"
            ready = "Ready" if row.ready else "not ready"
            origin = f"from {row.origin}" if row.origin != "-" else "unassigned"
            print(
                f"  +{time.time() - self.t0:6.2f}s  {row.name:<24} {row.phase:<8} {row.state:<12} {got:<18} "
                f"{origin:<30} {ready}",
                flush=True,
            )


def result_table(result: ScaleOut) -> str:
    rows = []
    for row in result.rows:
        b = result.breakdown_of(row.name)
        source = "storage" if row.source == "storage" else f"seed {row.seed_pod}"
        backend = row.backend or ("-" if row.source == "storage" else "?")
        rows.append(
            [
                row.name,
                row.node,
                source,
                backend,
                human_bytes(b.bytes),
                seconds(b.transfer),
                seconds(b.total),
                seconds(b.process_start),
                seconds(b.control_plane),
            ]
        )
    # The rest of created->Ready: the pod's processes starting (Python + torch imports) and the control plane.
    headers = ["pod", "node", "source", "backend", "bytes", "transfer", "created->Ready", "process start"]
    headers.append("control plane")
    return format_table(headers, rows)


def check_outputs(result: ScaleOut) -> bool:
    print(f'\nSame prompt to every replica: "{PROMPT}" (greedy; the new token ids):')
    for pod, ids in result.outputs.items():
        print(f"  {pod:<24} -> {ids}")
    if result.identical:
        print(f"OK: all {len(result.outputs)} replicas generate the same text.")
        return True
    print(f"FAIL: the replicas disagree ({len(set(result.outputs.values()))} different outputs).")
    return False


def print_keep(kubeconfig: Path, namespace: str, logs: Path) -> None:
    print(
        f"""
Everything keeps running until you press Ctrl-C.
  export KUBECONFIG={kubeconfig}
  kubectl -n {namespace} get mrs {SET_NAME}
  kubectl -n {namespace} get pods -o wide -L seedfork.io/set
  kubectl -n {namespace} get pod <pod> -o jsonpath='{{.metadata.annotations}}'
  kubectl -n {namespace} scale mrs/{SET_NAME} --replicas=6
Logs: {logs} (operator.log, pods/<namespace>_<pod>_<container>.log)
kubectl is not installed by seedfork: use your own (any version that speaks to Kubernetes 1.36)."""
    )


def standby_summary(cold, warm, torch_import_s: float | None) -> str:
    """What the two added replicas' figures mean here, and where the GPU figures are."""
    imports = f"{torch_import_s:.1f} s" if torch_import_s else "several seconds"
    return f"""
What these figures mean on this machine:
  - The cold pod's {cold.ready_s:.1f} s are mostly its two processes (agent and engine) starting: Python
    and torch imports, about {imports} each on this machine's CPUs, shared with every other pod process.
    A standby did all of that before the scale request: its {warm.ready_s:.1f} s are the promotion itself
    (the assignment, the transfer, the agent's and the engine's checksums, the readiness gate and probe).
  - Here weights move over TCP on loopback between processes on 2 CPU cores, and the test model is small,
    so the transfer is a small part of either figure; a seeded pod can even be slower here than a pod
    reading the model from storage out of the page cache. A standby's refill starts once the promoted pod
    is Ready, so it does not take the CPUs from it.
  - On GPUs the balance is starker: an engine takes tens of seconds to minutes to start (imports,
    compilation, graph capture) while a TransferEngine pull moved 16 GB in 75 ms between two H200s. The
    GPU figures and what a standby costs (a warm engine holds its GPUs) are in README.md, "Standby replicas"."""


def compare_standby(api, kubeconfig: Path, workdir: Path, model_dir: Path, device: str, timeout: float) -> bool:
    from .startup import PHASES, add_one

    print("\nOne more replica, twice: a new pod (cold) and a promoted warm standby (spec.standby: 1) ...", flush=True)
    cases = {}
    for mode in ("cold", "standby"):
        print(f"  {mode}: a fresh set, Ready with 1 replica{' and 1 warm standby' if mode == 'standby' else ''}, "
              "then scaled to 2", flush=True)  # fmt: skip
        cases[mode] = add_one(
            api, kubeconfig, workdir / f"startup-{mode}", model_dir, standby=mode == "standby", timeout=timeout,
            device=device,
        )  # fmt: skip
    cold, warm = cases["cold"], cases["standby"]

    def at(x: float | None) -> str:
        return "-" if x is None else f"{x:+.2f} s"

    rows = [[ph, at(cold.phases.get(ph)), at(warm.phases.get(ph))] for ph in PHASES]
    print("\nThe added pod's startup phases, after the scale request (negative: done before it):")
    print(format_table(["phase", "cold pod", "promoted standby"], rows))
    print(
        f"\nscale request -> Ready:       cold {cold.ready_s:6.2f} s   standby {warm.ready_s:6.2f} s   "
        f"({cold.ready_s / warm.ready_s:.1f}x)\n"
        f"scale request -> first token: cold {cold.first_token_s:6.2f} s   standby {warm.first_token_s:6.2f} s"
    )
    if warm.transfer_verify_s:
        print(f"the standby's transfer + verification: {warm.transfer_verify_s:.2f} s")
    try:
        import subprocess

        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        torch_import_s: float | None = time.perf_counter() - t
    except Exception:
        torch_import_s = None
    print(standby_summary(cold, warm, torch_import_s))
    return warm.source == "seed" and warm.ready_s < cold.ready_s


def vllm_summary(result) -> str:
    seeded, promoted = result.pod("seed")["phases_s"], result.standby
    total, init, ready = seeded["total_ready"], seeded["vllm_init"], promoted["request_to_ready_s"]
    return f"""
What these figures mean on this machine:
  - A new vLLM pod's {total:.0f} s are vLLM starting: {init:.0f} s of imports, engine core
    and worker processes and model construction before it asks for weights, then KV cache and API server
    ({seeded["kv_and_api"]:.1f} s). The weights themselves ({seeded["weights"]:.2f} s here) are a small part.
  - A warm standby did all of that before the scale request, with no weights (its API refused every request):
    the promotion moved the weights into the running vLLM and proved them, Ready in {ready:.2f} s,
    {result.cold_seeded_over_promoted:.0f}x sooner than the cold pod; its transfer and verification took
    {promoted["transfer_and_verification_s"]:.2f} s of that.
  - vLLM runs on 2 CPU cores here, with a 7 MB model. On GPUs vLLM spends tens of seconds to minutes on
    compilation and CUDA graph capture, which a standby (and the engine caches a new pod fetches from its
    seed) takes off the scale-up's clock. README.md, "Standby replicas", says what a standby costs."""


def run_vllm(args: argparse.Namespace) -> int:
    from seedfork_agent.engines.testmodel import make_model

    from . import vllm, vllmscaleout
    from .controlplane import ControlPlane

    try:
        vllm.image_env()
    except vllm.VllmUnavailable as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="seedfork-demo-"))
    print(f"seedfork demo with vLLM {vllm.VERSION} (CPU build), work dir {workdir}")
    print("A vLLM set: 1 replica from storage, scaled to 2 (a cold pod pulls from the seed), then given a warm")
    print("standby and scaled to 3 (the standby is promoted). vLLM starts in tens of seconds here ...", flush=True)
    ok = False
    try:
        with ControlPlane(workdir=workdir / "controlplane") as cp:
            api = api_client_for(cp.kubeconfig)
            install_crd(api)
            model = make_model(workdir / "models" / "vllm-tiny", "vllm-tiny")
            result = vllmscaleout.run(api, cp.kubeconfig, workdir, model, args.timeout)
        rows = [
            [r["pod"], r["source"], f"{r['phases_s']['total_ready']:.1f} s", f"{r['phases_s']['vllm_init']:.1f} s",
             f"{r['phases_s']['weights']:.2f} s", f"{r['held_over_engine_params']:.2f}x", r["first_token"]]
            for r in result.pods
        ]  # fmt: skip
        print()
        print(format_table(["pod", "weights from", "created -> Ready", "vLLM init", "weights", "held", "token"], rows))
        promoted = result.standby
        print(
            f"\nscale request -> Ready: promoted standby {promoted['request_to_ready_s']:.2f} s, "
            f"first token {promoted['request_to_first_token_s']:.2f} s "
            f"(a cold seeded pod: {result.pod('seed')['phases_s']['total_ready']:.1f} s created -> Ready)"
        )
        print(vllm_summary(result))
        same = len({tuple(r["first_token"]) for r in result.pods}) == 1
        ok = same and result.cold_seeded_over_promoted > 1
        if not same:
            print("FAIL: the replicas generate different tokens.", file=sys.stderr)
        elif not ok:
            print("FAIL: the promoted standby was not faster than the cold pod.", file=sys.stderr)
    except ScenarioError as e:
        print(f"\nFAIL: {e}", file=sys.stderr)
        print(f"Logs are in {workdir / 'logs'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; cleaned up.")
        return 130
    finally:
        if ok and not args.workdir and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print("Done: nothing left running." if ok else f"Logs are in {workdir / 'logs'}")
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return run_vllm(args)
    # The agent's own default device (imported here: it loads torch), so agent and engine pick the same one.
    from seedfork_agent.server import default_device

    from .controlplane import ControlPlane

    device = args.device if args.device != "auto" else default_device()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="seedfork-demo-"))
    print(f"seedfork demo: device {device}, backend {args.backend}, model size {args.size}, work dir {workdir}")
    ok = False
    try:
        t = time.time()
        print("Starting the local control plane (etcd + kube-apiserver) ...", flush=True)
        with ControlPlane(workdir=workdir / "controlplane") as cp:
            print(f"  kube-apiserver {cp.version()} at {cp.url} ({time.time() - t:.1f} s)")
            api = api_client_for(cp.kubeconfig)
            install_crd(api)
            namespace = new_namespace(api, "demo")
            install_agent_rbac(api, namespace)
            print(f"  CRD installed; namespace {namespace}")
            t = time.time()
            model_dir = make_model(workdir / "models" / args.size, args.size)
            print(f"Test model: {model_dir} ({human_bytes(model_bytes(model_dir))}, {time.time() - t:.1f} s)")
            body = reference_set_body(
                SET_NAME, model_dir, backend=args.backend, replicas=1, device=device, agent_device=device
            )
            with LocalCluster(cp.kubeconfig, namespace, workdir) as cluster:
                print(f"Pod runner nodes: {', '.join(n.name for n in cluster.runner.nodes)}; operator started")
                rset = ReferenceSet(api, namespace, SET_NAME)
                with PodTracker(api, namespace, SET_NAME) as tracker:
                    progress = Progress(time.time())
                    print(f"\nCreating ModelReplicaSet {SET_NAME} (replicas: 1), then scaling it to {args.replicas}:")
                    result = scale_out(
                        rset,
                        tracker,
                        body=body,
                        replicas_to=args.replicas,
                        timeout=args.timeout,
                        on_poll=progress,
                        cluster=cluster,
                    )
                print(
                    f"\nAll {args.replicas} replicas Ready {result.scale_out_seconds:.2f} s after the scale request.\n"
                )
                print(result_table(result))
                ok = check_outputs(result)
                if args.keep:
                    print_keep(cp.kubeconfig, namespace, cluster.logs)
                    wait_forever()
                print("\nCleaning up ...", flush=True)
            if ok and not args.no_standby:
                ok = compare_standby(api, cp.kubeconfig, workdir, model_dir, device, args.timeout)
                if not ok:
                    print("FAIL: the promoted standby was not faster than the cold pod.", file=sys.stderr)
    except ScenarioError as e:
        print(f"\nFAIL: {e}", file=sys.stderr)
        print(f"Logs are in {workdir / 'logs'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted; cleaned up.")
        return 0 if ok else 130
    finally:
        if ok and not args.workdir and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print("Done: nothing left running.")
    return 0 if ok else 1


def wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seedfork_localdev.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="reference", choices=["reference", "vllm"], help="default reference")
    parser.add_argument("--size", default="small", choices=["tiny", "small"], help="test model size (default small)")
    parser.add_argument("--backend", default="transfer_engine", choices=["transfer_engine", "nccl", "auto"])
    parser.add_argument("--replicas", type=int, default=4, help="scale to this many replicas (default 4)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when there is a GPU)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for each step")
    parser.add_argument("--workdir", help="keep the control plane, model and logs here (default: a temp dir)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp work dir even on success")
    parser.add_argument("--keep", action="store_true", help="leave everything running; Ctrl-C ends it")
    parser.add_argument("--no-standby", action="store_true", help="skip the cold pod against standby comparison")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (the demo scales out from 1)")
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so every process group is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
