"""The end-to-end scale-out scenario on a local cluster, shared by ``make demo``, the e2e tests and the benchmark.

Development/test tooling, not part of the product. A ``LocalCluster`` is the real local control plane
(etcd + kube-apiserver) with the CRD installed, the local pod runner playing scheduler and kubelet, and
the operator running as its own process, all scoped to one namespace. A ``ReferenceSet`` is one
ModelReplicaSet of seedfork's reference engine; ``PodTracker`` watches its pods and records when each
reached each milestone, which is what the time-to-Ready breakdown is computed from.

Every process is started in its own session (process group) and stopped with it, so leaving the
``with`` block leaves nothing running, also after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from seedfork_api import contract as c
from seedfork_api.spec import GROUP, PLURAL, VERSION

from .timetoready import Breakdown, breakdown

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "seedfork.io_modelreplicasets.yaml"
# The prompt every replica answers in the identical-output check.
PROMPT = "seedfork scales out by"

# Three nodes in two zones, so the operator's same-node / same-zone seed preference has something to choose.
DEFAULT_NODES = (
    "node-a:topology.kubernetes.io/zone=zone-1",
    "node-b:topology.kubernetes.io/zone=zone-1",
    "node-c:topology.kubernetes.io/zone=zone-2",
)


# Engine pods run as this ServiceAccount (see install_agent_rbac).
AGENT_SERVICE_ACCOUNT = "seedfork-agent"


class ScenarioError(RuntimeError):
    """A step of the scenario failed; the message says which and shows what the cluster looked like."""


# ---------------------------------------------------------------- processes


def child_env(kubeconfig: Path | str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for our child processes: this interpreter's bin dir first on PATH (``seedfork-agent``
    lives there), unbuffered output for the logs, and the kubeconfig."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """A child process in its own session, logging to a file; ``stop()`` ends its whole process group."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env or None,
                cwd=REPO,
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        proc = self.popen
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while children of its group linger: end the group for good.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.popen = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no chance to clean up."""
        self.stop(timeout=5, sig=signal.SIGKILL)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# ---------------------------------------------------------------- waiting


def wait_until(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.1,
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """Call ``check`` until it returns something truthy; on timeout raise with ``diagnose()`` attached."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            extra = f"\n{diagnose()}" if diagnose else ""
            raise ScenarioError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


# ---------------------------------------------------------------- pods


def condition_true(pod: Mapping[str, Any], kind: str) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond.get("status") == "True"
    return False


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return condition_true(pod, "Ready")


def _as_dict(model: c.Assignment | c.AgentReport | c.PodTiming | None) -> dict[str, Any]:
    """An annotation as its JSON said it (the keys it set), for tables and test messages."""
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True) if model is not None else {}


@dataclass
class PodRow:
    """One pod as the demo and the tests see it: where its weights came from and how far it got."""

    name: str
    node: str
    ip: str
    phase: str
    ready: bool
    gate: bool
    attempt: int
    source: str  # storage | seed
    seed_pod: str
    backend: str
    state: str  # the agent's report state for the current attempt
    bytes_done: int
    bytes_total: int
    error: str
    serving: bool
    deleting: bool
    assignment: dict[str, Any]
    report: dict[str, Any]
    timing: dict[str, Any]

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodRow:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        assignment, report, timing = c.read_annotations(meta.get("annotations"))
        # The state as the operator reads it (a verified report of a superseded attempt is verified), so the
        # harness never calls a pod pending that the operator rightly made Ready.
        weights = c.weights_report(assignment, report)
        queued = assignment is not None and assignment.source == "queued"
        return cls(
            name=meta.get("name", ""),
            node=spec.get("nodeName") or "",
            ip=status.get("podIP") or "",
            phase=status.get("phase") or "Pending",
            ready=pod_ready(pod),
            gate=condition_true(pod, c.READINESS_GATE),
            attempt=assignment.attempt if assignment else 0,
            source=(assignment.source if assignment else "") or "",
            seed_pod=(assignment.seed_pod if assignment else "") or "",
            backend=(assignment.backend if assignment else None) or (report.backend if report else None) or "",
            state="queued" if queued else (weights.state if weights else "pending"),
            bytes_done=weights.bytes_done if weights else 0,
            bytes_total=weights.bytes_total if weights else 0,
            error=(weights.error if weights else None) or (report.error if report else None) or "",
            serving=bool(report and report.serving),
            deleting=bool(meta.get("deletionTimestamp")),
            assignment=_as_dict(assignment),
            report=_as_dict(report),
            timing=_as_dict(timing),
        )

    @property
    def origin(self) -> str:
        """Where the weights came from, for a table: ``storage`` or the seed pod's name."""
        return self.seed_pod if self.source == "seed" and self.seed_pod else (self.source or "-")


# Milestones a PodTracker records, in the order a pod normally reaches them.
MILESTONES = ("created", "scheduled", "ip", "running", "transferring", "verified", "gate", "ready")


class PodTracker:
    """Watches the pods of one set and records when each first reached each milestone (wall clock).

    Kubernetes timestamps have one-second resolution, too coarse for a breakdown of a few seconds,
    so the times are taken when the watch event arrives (same clock as the agent's timing annotation).
    """

    def __init__(self, api: client.ApiClient, namespace: str, set_name: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.selector = f"{c.LABEL_SET}={set_name}"
        self.pods: dict[str, dict[str, Any]] = {}
        self.times: dict[str, dict[str, float]] = {}
        self.deleted: dict[str, float] = {}
        self.uids: dict[str, str] = {}  # the operator reuses a slot's name for the pod that replaces it
        self.history: dict[str, list[tuple[float, str, int]]] = {}  # (time, report state, attempt) changes
        # Every time a pod was seen Ready without verified weights: must stay empty.
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-tracker", daemon=True)

    def __enter__(self) -> PodTracker:
        self._thread.start()
        if not self._synced.wait(30):
            raise ScenarioError("pod watch did not start within 30s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        version = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector)
                    for pod in listed.items:
                        self._see(client.ApiClient().sanitize_for_serialization(pod))
                    version = listed.metadata.resource_version
                    self._synced.set()
                w = watch.Watch()
                for event in w.stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=version,
                    timeout_seconds=5,
                    _preload_content=False,
                    allow_watch_bookmarks=False,
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event["raw_object"] if "raw_object" in event else event["object"]
                    if not isinstance(obj, dict):
                        obj = client.ApiClient().sanitize_for_serialization(obj)
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event["type"] == "DELETED":
                        self._gone(obj)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._see(obj)
                    elif event["type"] == "ERROR":
                        version = None
                        break
            except ApiException as e:
                if e.status == 410:  # resource version too old: list again
                    version = None
                else:
                    time.sleep(0.2)
            except Exception:  # a dropped connection: re-list
                if not self._stop.is_set():
                    version = None
                    time.sleep(0.2)

    def _mark(self, name: str, milestone: str, now: float) -> None:
        self.times.setdefault(name, {}).setdefault(milestone, now)

    def _see(self, pod: dict[str, Any]) -> None:
        now = time.time()
        name = pod["metadata"]["name"]
        row = PodRow.from_pod(pod)
        uid = pod["metadata"].get("uid", "")
        with self._lock:
            if self.uids.setdefault(name, uid) != uid:  # a successor under the same name starts a new record
                self.uids[name] = uid
                self.times.pop(name, None)
                self.history.pop(name, None)
            self.pods[name] = pod
            self._mark(name, "created", now)
            if row.node:
                self._mark(name, "scheduled", now)
            if row.ip:
                self._mark(name, "ip", now)
            if row.phase == "Running":
                self._mark(name, "running", now)
            if row.state in ("transferring", "verified"):
                self._mark(name, "transferring", now)
            if row.state == "verified":
                self._mark(name, "verified", now)
            if row.gate:
                self._mark(name, "gate", now)
            if row.ready:
                self._mark(name, "ready", now)
                if not (row.gate and row.state == "verified"):
                    self.violations.append(f"{name} Ready with gate={row.gate} report={json.dumps(row.report)}")
            hist = self.history.setdefault(name, [])
            if not hist or hist[-1][1:] != (row.state, row.attempt):
                hist.append((now, row.state, row.attempt))

    def _gone(self, pod: dict[str, Any]) -> None:
        with self._lock:
            name = pod["metadata"]["name"]
            self.pods.pop(name, None)
            self.deleted.setdefault(name, time.time())

    # ---- reading
    def rows(self) -> list[PodRow]:
        with self._lock:
            pods = list(self.pods.values())
        return sorted((PodRow.from_pod(p) for p in pods), key=lambda r: (self.created(r.name), r.name))

    def created(self, name: str) -> float:
        return self.times.get(name, {}).get("created", float("inf"))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: json.loads(json.dumps(v)) for k, v in self.pods.items()}


# ---------------------------------------------------------------- the set


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


class ReferenceSet:
    """One ModelReplicaSet in one namespace: create, scale (through the scale subresource), read its pods."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str) -> None:
        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.name = name

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, dict(body))

    def get(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def status(self) -> dict[str, Any]:
        return self.get().get("status") or {}

    def scale(self, replicas: int) -> dict[str, Any]:
        """What ``kubectl scale`` or an HPA does: write spec.replicas through the scale subresource."""
        return self.custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, self.namespace, PLURAL, self.name, {"spec": {"replicas": replicas}}
        )

    def read_scale(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object_scale(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def pods(self) -> list[dict[str, Any]]:
        got = self.core.list_namespaced_pod(self.namespace, label_selector=f"{c.LABEL_SET}={self.name}")
        return [client.ApiClient().sanitize_for_serialization(p) for p in got.items]

    def rows(self) -> list[PodRow]:
        return sorted((PodRow.from_pod(p) for p in self.pods()), key=lambda r: r.name)

    def token(self) -> str:
        """The bearer token guarding the weight and engine endpoints (the operator's Secret)."""
        import base64

        secrets = self.core.list_namespaced_secret(self.namespace, label_selector=f"{c.LABEL_SET}={self.name}")
        for secret in secrets.items:
            data = secret.data or {}
            if c.TOKEN_SECRET_KEY in data:
                return base64.b64decode(data[c.TOKEN_SECRET_KEY]).decode()
        raise ScenarioError(f"no token Secret for set {self.name} in {self.namespace}")

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)

    def wait_ready(
        self,
        replicas: int,
        timeout: float,
        on_poll: Callable[[list[PodRow]], None] | None = None,
        interval: float = 0.25,
    ) -> list[PodRow]:
        """Until exactly ``replicas`` live pods exist and all are Ready; returns their rows."""

        def check() -> tuple[list[PodRow]] | None:
            rows = [r for r in self.rows() if not r.deleting]
            if on_poll:
                on_poll(rows)
            failed = [r for r in rows if r.phase == "Failed"]
            if failed:
                raise ScenarioError(f"pod {failed[0].name} failed:\n{self.describe()}")
            if len(rows) == replicas and all(r.ready for r in rows):
                return (rows,)  # truthy also when no pods are wanted
            return None

        (rows,) = wait_until(check, timeout, f"{replicas} Ready pods of {self.name}", interval, self.describe)
        return rows

    def describe(self) -> str:
        """A compact dump for failure messages: each pod's phase, conditions, assignment and report."""
        lines = []
        try:
            status = self.status()
            lines.append(f"set {self.name}: status {json.dumps(status, sort_keys=True)[:800]}")
        except ApiException as e:
            lines.append(f"set {self.name}: {e.status} {e.reason}")
        for row in self.rows():
            lines.append(
                f"  pod {row.name} node={row.node} ip={row.ip} phase={row.phase} ready={row.ready} gate={row.gate} "
                f"deleting={row.deleting} assignment={json.dumps(row.assignment)} report={json.dumps(row.report)}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------- engine calls


def generate(row: PodRow, token: str, prompt: str = PROMPT, max_new_tokens: int = 8, port: int = 30000) -> str:
    """Ask one replica's engine (on its pod IP) for a greedy completion; returns the new token ids as text
    (the test model's weights are random, so its bytes are rarely printable)."""
    r = httpx.post(
        f"http://{row.ip}:{port}/generate",
        json={"text": prompt, "sampling_params": {"max_new_tokens": max_new_tokens}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=300,
    )
    r.raise_for_status()
    return " ".join(str(t) for t in r.json()["output_ids"])


def generate_all(rows: Sequence[PodRow], token: str, prompt: str = PROMPT) -> dict[str, str]:
    """The same prompt to every replica at once; pod name -> output token ids."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(rows))) as pool:
        texts = list(pool.map(lambda row: generate(row, token, prompt), rows))
    return {row.name: text for row, text in zip(rows, texts, strict=True)}


def engine_info(row: PodRow, token: str, port: int = 30000) -> dict[str, Any]:
    """The engine's own view (mode, device, attach and re-check timings)."""
    r = httpx.get(f"http://{row.ip}:{port}/v1/engine", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    r.raise_for_status()
    return r.json()


# ---------------------------------------------------------------- the scenario


@dataclass
class ScaleOut:
    """What one scale-out run produced: the Ready pods, their outputs and their time-to-Ready breakdown."""

    set_name: str
    backend: str
    replicas_from: int
    replicas_to: int
    scale_requested_at: float
    rows: list[PodRow]
    outputs: dict[str, str]
    engines: dict[str, dict[str, Any]]
    breakdowns: list[Breakdown]
    seen: dict[str, dict[str, float]]
    scale_out_seconds: float  # scale request -> all target replicas Ready

    @property
    def identical(self) -> bool:
        return len(set(self.outputs.values())) == 1 and len(self.outputs) == self.replicas_to

    def breakdown_of(self, pod: str) -> Breakdown:
        return next(b for b in self.breakdowns if b.pod == pod)


def breakdowns_for(
    rows: Sequence[PodRow], tracker: PodTracker, engines: Mapping[str, Mapping[str, Any]]
) -> list[Breakdown]:
    return [
        breakdown(
            row.name,
            row.origin,
            tracker.times.get(row.name, {}),
            row.timing,
            (engines.get(row.name) or {}).get("timings"),
        )
        for row in rows
    ]


def scale_out(
    rset: ReferenceSet,
    tracker: PodTracker,
    *,
    body: Mapping[str, Any],
    replicas_to: int,
    timeout: float,
    on_poll: Callable[[list[PodRow]], None] | None = None,
    cluster: LocalCluster | None = None,
) -> ScaleOut:
    """Create the set (``body``, usually ``replicas: 1``), wait until it is Ready, scale it to
    ``replicas_to`` through the scale subresource, wait until all are Ready, then ask every replica
    for the same greedy completion."""

    def poll(rows: list[PodRow]) -> None:
        if cluster is not None:
            cluster.check_alive()
        if on_poll:
            on_poll(rows)

    replicas_from = int(body["spec"]["replicas"])
    rset.create(body)
    rset.wait_ready(replicas_from, timeout, poll)
    requested = time.time()
    rset.scale(replicas_to)
    rows = rset.wait_ready(replicas_to, timeout, poll)
    done = time.time()
    # The rows as the tracker last saw them carry the final annotations (timing is written with the report).
    token = rset.token()
    outputs = generate_all(rows, token)
    engines = {row.name: engine_info(row, token) for row in rows}
    rows = rset.rows()
    rows = [r for r in rows if not r.deleting]
    return ScaleOut(
        set_name=rset.name,
        backend=str(body["spec"]["transfer"]["backend"]),
        replicas_from=replicas_from,
        replicas_to=replicas_to,
        scale_requested_at=requested,
        rows=rows,
        outputs=outputs,
        engines=engines,
        breakdowns=breakdowns_for(rows, tracker, engines),
        seen={k: dict(v) for k, v in tracker.times.items()},
        scale_out_seconds=done - requested,
    )


# ---------------------------------------------------------------- models


def make_model(out: Path | str, size: str = "tiny") -> Path:
    """The deterministic test model, written by the reference engine's own ``make-model`` command."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    argv = [sys.executable, "-m", "seedfork_agent.engines.reference", "make-model", "--out", str(out), "--size", size]
    done = subprocess.run(argv, capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        raise ScenarioError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return out


def make_model_like(out: Path | str, **config: Any) -> Path:
    """A deterministic model of another shape than the named sizes (e.g. one big enough that a
    bandwidth-capped transfer lasts seconds), from the test model's own weight generator."""
    from safetensors.torch import save_file

    from seedfork_agent.engines.llama import LlamaConfig
    from seedfork_agent.engines.testmodel import make_weights

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**config)
    weights = make_weights(cfg)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(weights, "model.safetensors")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(cfg.to_json())
    return out


def model_bytes(model_dir: Path | str) -> int:
    index = Path(model_dir) / "model.safetensors.index.json"
    return int(json.loads(index.read_text())["metadata"]["total_size"])


# ---------------------------------------------------------------- the cluster


def install_crd(api: client.ApiClient, timeout: float = 30.0) -> None:
    """Create (or keep) the ModelReplicaSet CRD and wait until it is Established and served."""
    ext = client.ApiextensionsV1Api(api)
    body = yaml.safe_load(CRD_FILE.read_text())
    name = body["metadata"]["name"]
    try:
        ext.create_custom_resource_definition(body)
    except ApiException as e:
        if e.status != 409:
            raise

    def established() -> bool:
        got = ext.read_custom_resource_definition(name)
        return any(x.type == "Established" and x.status == "True" for x in (got.status.conditions or []))

    wait_until(established, timeout, f"CRD {name} Established", interval=0.2)
    custom = client.CustomObjectsApi(api)

    def served() -> bool:
        try:
            custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1)
            return True
        except ApiException:
            return False

    wait_until(served, timeout, f"{PLURAL} served", interval=0.2)


def new_namespace(api: client.ApiClient, prefix: str = "demo") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


def install_agent_rbac(api: client.ApiClient, namespace: str) -> None:
    """The engine pods' ServiceAccount: the agent reads, watches and patches its own pod, nothing more."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    meta = {"name": AGENT_SERVICE_ACCOUNT, "namespace": namespace}
    role = {"metadata": meta, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "watch", "patch"]}]}
    binding = {
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT_SERVICE_ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": AGENT_SERVICE_ACCOUNT, "namespace": namespace}],
    }
    for create, body in (
        (core.create_namespaced_service_account, {"metadata": meta}),
        (rbac.create_namespaced_role, role),
        (rbac.create_namespaced_role_binding, binding),
    ):
        try:
            create(namespace, body)
        except ApiException as e:
            if e.status != 409:
                raise


@dataclass
class LocalCluster:
    """The pod runner (in this process, its pods are child processes) and the operator (its own
    process) for one namespace of a running control plane.

    Use as a context manager: leaving it stops the operator first (so it creates nothing new), then
    the pod runner, which ends every pod process it started.
    """

    kubeconfig: Path
    namespace: str
    workdir: Path
    nodes: Sequence[str] = DEFAULT_NODES
    operator_interval: float = 5.0
    # Probe periods are capped so a pod turns Ready within ~0.2 s of its engine (Kubernetes' minimum is 1 s).
    probe_period: float = 0.2
    # "namespaces": a network namespace per pod, NetworkPolicies enforced (the pod runner's netns.py; root)
    pod_network: str = "loopback"
    images: Mapping[str, Mapping[str, str]] | None = None  # image repository -> environment standing in for it
    operator: Proc | None = None
    runner: Any = None

    def __enter__(self) -> LocalCluster:
        try:
            self.start_runner()
            self.start_operator()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def start_runner(self) -> Any:
        from .podrunner import PodRunner

        self.runner = PodRunner(
            self.kubeconfig,
            [self.namespace],
            nodes=list(self.nodes),
            logdir=self.logs / "pods",
            probe_period=self.probe_period,
            max_grace=2.0,
            network=self.pod_network,
            images=self.images,
        )
        self.runner.start()
        return self.runner

    def start_operator(self) -> Proc:
        argv = [
            sys.executable,
            "-m",
            "seedfork_operator",
            "--namespace",
            self.namespace,
            "--standalone",
            "--metrics-port",
            "0",
            "--interval",
            str(self.operator_interval),
        ]
        self.operator = Proc("operator", argv, self.logs / "operator.log", child_env(self.kubeconfig)).start()
        return self.operator

    def restart_operator(self, crash: bool = True) -> None:
        """End the operator (SIGKILL when ``crash``, as a node failure would) and start a fresh one."""
        if self.operator is not None:
            if crash:
                self.operator.kill()
            else:
                self.operator.stop()
        self.start_operator()

    def check_alive(self) -> None:
        if self.operator is not None and not self.operator.alive:
            code = self.operator.popen.returncode if self.operator.popen else None
            raise ScenarioError(f"the operator exited ({code}):\n{self.operator.tail()}")

    def pod_log(self, pod: str, container: str) -> str:
        path = self.logs / "pods" / f"{self.namespace}_{pod}_{container}.log"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.operator is not None:
            self.operator.stop(timeout=5)
        if self.runner is not None:
            self.runner.stop()
            self.runner = None


def api_client_for(kubeconfig: Path | str) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    body = [[str(x) for x in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(out)
