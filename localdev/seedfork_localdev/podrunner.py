"""Local pod runner: plays scheduler and kubelet for a local control plane (development/test component).

Not part of the product. The local control plane (``controlplane.py``) has no
scheduler, kubelet or controller-manager, so pods would stay Pending forever.
For the namespaces it is given, the runner:

- registers Node objects (default one, ``local-node``; each with a
  ``kubernetes.io/hostname`` label and any labels asked for) and binds
  unscheduled pods to the least-loaded node matching their ``nodeSelector``
  through the ``pods/binding`` subresource, as the scheduler does;
- for each pod bound to one of its nodes: gives it its own loopback address
  127.0.0.x (``podaddresses.py``: x from 2 up, unique among runners on this
  machine), starts each container's
  ``command`` + ``args`` as a process in its own process group (the image is
  ignored; PATH is the runner's plus the runner's Python environment ``bin``),
  with the env the pod asks for: literal values, ``$(VAR)`` references, the
  downward-API ``fieldRef`` paths in ``podrules.SUPPORTED_FIELD_PATHS``,
  ``secretKeyRef`` and ``configMapKeyRef`` read through the API. Any other source
  fails the container with reason ``CreateContainerConfigError``;
- writes pod status with a strategic-merge patch of ``pods/status`` (so
  conditions set by others, such as readiness gates, are kept): pod and host
  IP, phase, start time, container states and readiness, and the
  ``Initialized``, ``ContainersReady`` and ``Ready`` conditions. Ready is
  ContainersReady AND every readiness-gate condition True; the runner reads
  gate conditions and never writes them;
- runs readiness probes (httpGet, tcpSocket, exec) at their period; ``probe_period``
  caps period and initial delay to speed tests up. Liveness and startup
  probes, init containers, volumes and resources are not supported, but for ``emptyDir``
  volumes named in env values (``podrules.empty_dir_env``: a directory of the pod's own);
- restarts exited containers by ``restartPolicy`` with exponential back-off;
  when a container's main process exits, the rest of its process group is killed
  (a container's processes end with it), and so is any process carrying the
  container's ``SEEDFORK_PODRUNNER_MARK`` env value (one that left the group);
- on graceful deletion: SIGTERM to every container's process group, waits the
  grace period (capped by ``max_grace``), SIGKILL, then deletes the pod object with
  grace 0 (what the kubelet's confirmation does) and frees the address;
- keeps one log file per container: ``<logdir>/<namespace>_<pod>_<container>.log``
  (stdout and stderr, appended across restarts);
- with ``network="namespaces"`` (root): gives each pod a network namespace of its own
  instead of a loopback address, and enforces the namespace's NetworkPolicies there
  (``netns.py``); ``pod_netns`` names a pod's namespace for test code.

Containers see none of the runner's environment but ``PATH`` and ``PASSTHROUGH_ENV``,
plus ``env`` given to the runner (e.g. ``CUDA_VISIBLE_DEVICES``), under the pod's own.
Images are not run, but ``images`` can stand in for one: a container whose image repository is a key
there gets that environment first (its ``PATH`` before the runner's), e.g. vLLM's own virtualenv for
containers of seedfork's vLLM image.
Pods get ``KUBERNETES_SERVICE_HOST``/``_PORT`` for the API server. A pod with a
``serviceAccountName`` gets a token bound to it (TokenRequest) in a kubeconfig
named by ``KUBECONFIG``, so its API access is that ServiceAccount's RBAC; with
``pod_credentials="admin"`` pods without one get the runner's kubeconfig instead.

Use in-process (the loop runs in threads)::

    with PodRunner(kubeconfig, namespaces=["demo"], nodes=[{"name": "node-a"}], logdir="logs") as runner:
        ...  # create pods; runner.pod_ip("demo", "p"), runner.container_pids("demo", "p")

or from a shell::

    python -m seedfork_localdev.podrunner --kubeconfig KUBECONFIG --namespace demo --node node-a:zone=z1

Leaving the context (or SIGINT/SIGTERM for the CLI) kills every process the runner started;
pod objects stay as they are (as when a kubelet stops). Run one runner per namespace:
two runners given the same namespace would both run its pods. A pod no node matches
gets ``PodScheduled=False`` (``Unschedulable``). Container IDs read
``seedfork-podrunner://<pid>``; the PID is also the container's process group id.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from .controlplane import kubeconfig_for
from .podaddresses import AddressLease, lease_address
from .podrules import (
    ContainerConfigError,
    NodeSpec,
    ProbeState,
    choose_node,
    container_argv,
    container_env,
    empty_dir_env,
    image_env,
    node_status,
    pod_phase,
    readiness_conditions,
    restart_delay,
    should_restart,
    status_signature,
    termination_grace,
)
from .probes import run_probe
from .processes import MARK_ENV, kill_group, kill_marked
from .watching import ListWatch

log = logging.getLogger("seedfork.podrunner")

SMP = "application/strategic-merge-patch+json"
HOST_IP = "127.0.0.1"
DEFAULT_NODE = "local-node"
CONTAINER_ID_SCHEME = "seedfork-podrunner"
# Environment passed through from the runner to every container (containers get nothing else of it).
PASSTHROUGH_ENV = ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "TERM")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Container:
    spec: dict[str, Any]
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    proc: subprocess.Popen | None = None
    pid: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    logfile: TextIO | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    restarts: int = 0
    last_terminated: dict[str, Any] | None = None
    next_start: float = 0.0
    done: bool = False  # terminated for good (no restart)
    probe: ProbeState = field(default_factory=ProbeState)
    probe_due: float = 0.0
    probe_future: Future | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def phase_kind(self) -> str:
        """waiting (never started), running, or stopped (exited, maybe restarting) for the pod phase."""
        if self.state == "running":
            return "running"
        return "stopped" if self.state == "terminated" or self.last_terminated else "waiting"

    @property
    def ready(self) -> bool:
        if self.state != "running":
            return False
        return self.probe.ready if self.spec.get("readinessProbe") else True


@dataclass
class _Pod:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    address: AddressLease | None  # the loopback address held for the pod; None in a network namespace
    restart_policy: str
    start_time: str
    containers: list[_Container]
    extra_env: dict[str, str] | None = None  # API access env, made once per pod
    terminating: bool = False
    last_key: Any = None
    last_write: float = 0.0


class PodRunner:
    """Scheduler + kubelet for the pods of ``namespaces`` on a local control plane (dev/test only)."""

    def __init__(
        self,
        kubeconfig: str | os.PathLike,
        namespaces: Iterable[str],
        nodes: Iterable[str | Mapping[str, Any] | NodeSpec] | None = None,
        logdir: str | os.PathLike | None = None,
        *,
        probe_period: float | None = None,
        max_grace: float | None = None,
        restart_backoff: tuple[float, float] = (1.0, 30.0),
        pod_credentials: str = "serviceaccount",
        env: Mapping[str, str] | None = None,
        tick: float = 0.05,
        ip_range: tuple[int, int] = (2, 254),
        network: str = "loopback",
        images: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        if pod_credentials not in ("serviceaccount", "admin"):
            raise ValueError("pod_credentials must be 'serviceaccount' or 'admin'")
        if network not in ("loopback", "namespaces"):
            raise ValueError("network must be 'loopback' (127.0.0.x) or 'namespaces' (netns.py, policies enforced)")
        self.network_mode = network
        self.network = None  # netns.PodNetwork with network="namespaces", made at start
        self.kubeconfig = Path(kubeconfig)
        self.namespaces = list(namespaces)
        if not self.namespaces:
            raise ValueError("PodRunner needs at least one namespace")
        self.nodes = [NodeSpec.parse(n) for n in (nodes or [DEFAULT_NODE])]
        if len({n.name for n in self.nodes}) != len(self.nodes):
            raise ValueError("node names must be unique")
        self.logdir = Path(logdir) if logdir else Path(tempfile.mkdtemp(prefix="seedfork-pod-logs-"))
        self.probe_period = probe_period
        self.max_grace = max_grace
        self.restart_backoff = restart_backoff
        self.pod_credentials = pod_credentials
        self.env = dict(env or {})  # given to every container, under the pod's own env
        self.images = {k: dict(v) for k, v in (images or {}).items()}  # image repository -> its environment
        self.tick = tick
        self.ip_range = ip_range
        self.started_pids: list[int] = []  # every process group this runner ever started
        self._procs: list[subprocess.Popen] = []
        self._id = f"{os.getpid()}-{secrets.token_hex(4)}"

        self._events: queue.Queue = queue.Queue()
        self._seen: dict[tuple[str, str], dict[str, Any]] = {}  # latest object per pod
        self._bound: dict[str, str] = {}  # pod uid -> node, for bindings not yet seen in an event
        self._unschedulable: set[str] = set()  # pod uids already marked PodScheduled=False
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._deleting: set[str] = set()  # uids already deleted with grace 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._enders: list[threading.Thread] = []
        self._watches: list[ListWatch] = []
        self._probes = ThreadPoolExecutor(max_workers=8, thread_name_prefix="podrunner-probe")
        self._state_dir: tempfile.TemporaryDirectory | None = None
        self._api = None
        self._core = None
        self._started = False

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> PodRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        from kubernetes import client, config

        self.logdir.mkdir(parents=True, exist_ok=True)
        self._state_dir = tempfile.TemporaryDirectory(prefix="seedfork-podrunner-")
        self._api = config.new_client_from_config(config_file=str(self.kubeconfig))
        self._core = client.CoreV1Api(self._api)
        self._server = self._api.configuration.host
        self._ca = self._api.configuration.ssl_ca_cert
        self._started = True
        atexit.register(self.stop)
        try:
            if self.network_mode == "namespaces":
                from .netns import PodNetwork

                host, _, port = self._server.removeprefix("https://").rpartition(":")
                self.network = PodNetwork(self._id, (host, int(port)), self._network_policies)
                self.network.start()
            self._register_nodes()
            for ns in self.namespaces:
                watch = self._watch(ns)
                self._watches.append(watch)
                self._spawn_thread(watch.run, f"podrunner-watch-{ns}")
            self._spawn_thread(self._loop, "podrunner-loop")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the loop and kill every process this runner started (idempotent)."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        self._stop.set()
        for watch in self._watches:
            watch.close()
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            pods = list(self._pods.values())
        grace = min(5.0, self.max_grace if self.max_grace is not None else 5.0)
        self._kill_pods(pods, grace)
        for thread in self._enders:
            thread.join(timeout=grace + 10)
        for proc in self._procs:  # safety net: nothing this runner started outlives it
            if proc.poll() is None:
                kill_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        kill_marked(f"{self._id}/", signal.SIGKILL)
        with self._lock:
            for pod in self._pods.values():
                self._release(pod)
            self._pods.clear()
        self._probes.shutdown(wait=True, cancel_futures=True)  # exec probes end within their timeout
        if self.network is not None:
            self.network.stop()
        if self._api is not None:
            self._api.close()
        if self._state_dir is not None:
            self._state_dir.cleanup()

    def _spawn_thread(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ---- queries (tests, demo) ---------------------------------------------------------------

    def pod_ip(self, namespace: str, name: str) -> str | None:
        with self._lock:
            pod = self._pods.get((namespace, name))
            return pod.ip if pod else None

    def container_pids(self, namespace: str, name: str) -> dict[str, int]:
        """PID (= process group id) of each running container of the pod."""
        with self._lock:
            pod = self._pods.get((namespace, name))
            if pod is None:
                return {}
            return {c.name: c.pid for c in pod.containers if c.state == "running" and c.pid is not None}

    def pod_netns(self, namespace: str, name: str) -> str | None:
        """The pod's network namespace (network="namespaces"), for running test code inside it."""
        return self.network.netns_of((namespace, name)) if self.network is not None else None

    def _network_policies(self, namespace: str) -> list[dict[str, Any]]:
        from kubernetes import client

        resp = client.NetworkingV1Api(self._api).list_namespaced_network_policy(namespace, _preload_content=False)
        return json.loads(resp.data)["items"]

    def _volume_dir(self, pod: _Pod) -> Path:
        return self.logdir / "volumes" / f"{pod.namespace}_{pod.name}_{pod.uid}"

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        return self.logdir / f"{namespace}_{pod}_{container}.log"

    # ---- nodes -------------------------------------------------------------------------------

    def _register_nodes(self) -> None:
        from kubernetes.client import ApiException

        cpus = str(os.cpu_count() or 1)
        for node in self.nodes:
            body = {"metadata": {"name": node.name, "labels": node.all_labels()}, "spec": {}}
            try:
                self._core.create_node(body, _preload_content=False)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self._core.patch_node(node.name, {"metadata": {"labels": node.all_labels()}}, _content_type=SMP)
            status = node_status(node, cpus=cpus, host_ip=HOST_IP, now=_now(), runtime=CONTAINER_ID_SCHEME)
            self._core.patch_node_status(node.name, {"status": status}, _content_type=SMP, _preload_content=False)

    # ---- watching ----------------------------------------------------------------------------

    def _watch(self, namespace: str) -> ListWatch:
        """The namespace's pods, as events for the loop: a relist replaces what the loop knows of them."""
        return ListWatch(
            self._core.list_namespaced_pod,
            namespace,
            on_list=lambda items: self._events.put(("RELIST", namespace, items)),
            on_event=lambda kind, obj: self._events.put((kind, namespace, obj)),
        )

    # ---- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain_events()
                for key in list(self._seen):
                    self._sync(key)
            except Exception:
                log.exception("pod runner loop error (continuing)")
                self._stop.wait(0.5)

    def _drain_events(self) -> None:
        try:
            event = self._events.get(timeout=self.tick)
        except queue.Empty:
            return
        while True:
            self._on_event(*event)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _on_event(self, kind: str, namespace: str, payload: Any) -> None:
        log.debug(
            "event %s %s/%s", kind, namespace, payload.get("metadata", {}).get("name") if kind != "RELIST" else ""
        )
        if kind == "RELIST":
            names = {item["metadata"]["name"] for item in payload}
            for key in [k for k in self._seen if k[0] == namespace and k[1] not in names]:
                self._on_event("DELETED", namespace, self._seen[key])
            for item in payload:
                self._on_event("MODIFIED", namespace, item)
            return
        key = (namespace, payload["metadata"]["name"])
        uid = payload["metadata"].get("uid")
        with self._lock:
            pod = self._pods.get(key)
        if pod is not None and not pod.terminating and (kind == "DELETED" or pod.uid != uid):
            # Gone without our confirmation (force-deleted, or replaced by a pod of the same name).
            self._begin_termination(pod, payload, delete=False)
        if kind == "DELETED":
            self._seen.pop(key, None)
            self._bound.pop(uid, None)
            self._unschedulable.discard(uid)
        else:
            self._seen[key] = payload

    def _sync(self, key: tuple[str, str]) -> None:
        obj = self._seen.get(key)
        if obj is None:
            return
        meta, spec = obj["metadata"], obj.get("spec") or {}
        node = spec.get("nodeName") or self._bound.get(meta.get("uid"))
        with self._lock:
            pod = self._pods.get(key)
        if pod is not None and pod.uid != meta.get("uid"):
            return  # the old pod is still being stopped
        if meta.get("deletionTimestamp"):
            if pod is not None and not pod.terminating:
                self._begin_termination(pod, obj, delete=True)
            elif pod is None and node in self._node_names() and meta["uid"] not in self._deleting:
                self._confirm_deletion(key[0], key[1], meta["uid"])
            return
        if not node:
            self._schedule(key, obj)
            return
        if node not in self._node_names():
            return
        if pod is None:
            if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            pod = self._admit(key, obj, node)
            if pod is None:
                return
        if not pod.terminating:
            self._step(pod, obj)

    def _node_names(self) -> set[str]:
        return {n.name for n in self.nodes}

    # ---- scheduling --------------------------------------------------------------------------

    def _schedule(self, key: tuple[str, str], obj: dict[str, Any]) -> None:
        spec = obj.get("spec") or {}
        if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        load: dict[str, int] = {}
        for other in self._seen.values():
            other_node = (other.get("spec") or {}).get("nodeName") or self._bound.get(other["metadata"].get("uid"))
            if other_node and (other.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                load[other_node] = load.get(other_node, 0) + 1
        node = choose_node(self.nodes, spec.get("nodeSelector"), load)
        uid = obj["metadata"]["uid"]
        if node is None:  # stays Pending, marked the way the scheduler marks it
            if uid not in self._unschedulable:
                self._unschedulable.add(uid)
                condition = {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": f"0/{len(self.nodes)} nodes match the pod's nodeSelector",
                    "lastTransitionTime": _now(),
                }
                self._patch_status(key[0], key[1], uid, {"conditions": [condition]})
            return
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": key[1], "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        from kubernetes.client import ApiException

        try:
            self._core.create_namespaced_pod_binding(key[1], key[0], body, _preload_content=False)
        except ApiException as exc:
            if exc.status in (404, 409):  # gone, or bound meanwhile; the next event tells
                return
            raise
        self._bound[uid] = node
        log.info("bound %s/%s to %s", key[0], key[1], node)

    # ---- starting a pod ----------------------------------------------------------------------

    def _admit(self, key: tuple[str, str], obj: dict[str, Any], node: str) -> _Pod | None:
        spec = obj["spec"]
        if self.network is not None:
            ip, address = self.network.add_pod(key, obj["metadata"].get("labels") or {}), None
        else:
            address = lease_address(*self.ip_range)
            ip = address.ip
        containers = [_Container(spec=c) for c in spec.get("containers") or []]
        pod = _Pod(
            namespace=key[0],
            name=key[1],
            uid=obj["metadata"]["uid"],
            node=node,
            ip=ip,
            address=address,
            restart_policy=spec.get("restartPolicy") or "Always",
            start_time=_now(),
            containers=containers,
        )
        if spec.get("initContainers"):
            for c in containers:
                c.reason, c.message = "CreateContainerConfigError", "init containers are not supported by the runner"
                c.next_start = float("inf")
        with self._lock:
            self._pods[key] = pod
        log.info("admitted %s/%s on %s with IP %s", key[0], key[1], node, ip)
        return pod

    def _release(self, pod: _Pod) -> None:
        shutil.rmtree(self._volume_dir(pod), ignore_errors=True)  # the pod's emptyDir volumes end with it
        if self.network is not None:
            self.network.remove_pod((pod.namespace, pod.name), pod.ip)
        if pod.address is not None:
            pod.address.release()

    def _api_env(self, pod: _Pod, obj: dict[str, Any]) -> dict[str, str]:
        """API server address and credentials for the pod's processes (made once per pod)."""
        if pod.extra_env is not None:
            return pod.extra_env
        host, _, port = self._server.removeprefix("https://").rpartition(":")
        env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
        spec = obj["spec"]
        sa = spec.get("serviceAccountName")
        if sa and spec.get("automountServiceAccountToken") is not False:
            from kubernetes.client import ApiException

            try:
                resp = self._core.create_namespaced_service_account_token(
                    sa,
                    pod.namespace,
                    {
                        "spec": {
                            "expirationSeconds": 86400,
                            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.name, "uid": pod.uid},
                        }
                    },
                    _preload_content=False,
                )
            except ApiException as exc:
                raise ContainerConfigError(f"token for serviceaccount {sa!r}: {exc.status} {exc.reason}") from exc
            token = json.loads(resp.data)["status"]["token"]
            path = Path(self._state_dir.name) / f"{pod.namespace}_{pod.name}_{pod.uid[:8]}.kubeconfig"
            path.write_text(yaml.safe_dump(kubeconfig_for(self._server, self._ca, sa, token)))
            path.chmod(0o600)
            env["KUBECONFIG"] = str(path)
        elif self.pod_credentials == "admin":
            env["KUBECONFIG"] = str(self.kubeconfig)
        pod.extra_env = env
        return env

    def _lookup(self, kind: str, namespace: str, name: str, key: str) -> str | None:
        import base64

        from kubernetes.client import ApiException

        read = self._core.read_namespaced_secret if kind == "secret" else self._core.read_namespaced_config_map
        try:
            obj = json.loads(read(name, namespace, _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if kind == "secret":
            raw = (obj.get("data") or {}).get(key)
            return base64.b64decode(raw).decode() if raw is not None else None
        return (obj.get("data") or {}).get(key)

    def _start_container(self, pod: _Pod, c: _Container, obj: dict[str, Any]) -> None:
        if self._stop.is_set():
            return
        now = time.monotonic()
        try:
            own = container_env(
                obj,
                c.spec,
                pod_ip=pod.ip,
                host_ip=HOST_IP,
                secret_value=lambda n, k: self._lookup("secret", pod.namespace, n, k),
                config_map_value=lambda n, k: self._lookup("configmap", pod.namespace, n, k),
            )
            argv = container_argv(c.spec, own)
            if self.network is not None:
                argv = self.network.wrap((pod.namespace, pod.name), argv)
            api_env = self._api_env(pod, obj)
        except ContainerConfigError as exc:
            c.state, c.reason, c.message = "waiting", exc.reason, str(exc)
            c.next_start = now + 2.0  # the kubelet retries too: the Secret may appear later
            return
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", os.defpath)])
        env["HOSTNAME"] = pod.name
        env.update(self.env)
        env.update(image_env(c.spec.get("image"), self.images, env["PATH"]))
        env.update(api_env)
        env.update(own)
        env.update(empty_dir_env(obj, c.spec, env, self._volume_dir(pod)))
        env[MARK_ENV] = self._mark(pod, c)
        c.env = env
        logfile = open(self.log_path(pod.namespace, pod.name, c.name), "a", buffering=1)  # noqa: SIM115
        cwd = c.spec.get("workingDir") or None
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group, killed as a whole
            )
        except OSError as exc:
            logfile.close()
            self._on_exit(pod, c, 128, reason="StartError", message=f"{argv[0]}: {exc}")
            return
        self.started_pids.append(proc.pid)
        self._procs.append(proc)
        c.proc, c.pid, c.logfile = proc, proc.pid, logfile
        c.state, c.reason, c.message, c.exit_code = "running", "", "", None
        c.started_at, c.finished_at = _now(), None
        probe = c.spec.get("readinessProbe") or {}
        c.probe = ProbeState(
            success_threshold=int(probe.get("successThreshold") or 1),
            failure_threshold=int(probe.get("failureThreshold") or 3),
        )
        c.probe_due = now + self._period(probe.get("initialDelaySeconds") or 0)
        shown = " ".join(argv)
        shown = shown if len(shown) < 200 else shown[:200] + "..."
        log.info("started %s/%s container %s pid %d: %s", pod.namespace, pod.name, c.name, proc.pid, shown)

    def _mark(self, pod: _Pod, c: _Container | None = None) -> str:
        # Matched by prefix: "<id>/" is the runner, "<id>/<uid>/" a pod, "<id>/<uid>/<name>/" a container.
        return f"{self._id}/{pod.uid}/" + (f"{c.name}/" if c is not None else "")

    def _period(self, seconds: float) -> float:
        return min(seconds, self.probe_period) if self.probe_period is not None else seconds

    # ---- running a pod -----------------------------------------------------------------------

    def _step(self, pod: _Pod, obj: dict[str, Any]) -> None:
        now = time.monotonic()
        for c in pod.containers:
            if c.proc is None:
                if not c.done and now >= c.next_start:
                    self._start_container(pod, c, obj)
                continue
            code = c.proc.poll()
            if code is not None:
                self._on_exit(pod, c, code, reason="Completed" if code == 0 else "Error")
                continue
            self._probe(pod, c, now)
        self._write_status(pod, obj)

    def _on_exit(self, pod: _Pod, c: _Container, code: int, *, reason: str, message: str = "") -> None:
        if c.proc is not None:
            kill_group(c.proc.pid, signal.SIGKILL)  # the container ends with its main process
            kill_marked(self._mark(pod, c), signal.SIGKILL)
        if c.logfile is not None:
            c.logfile.close()
        finished = _now()
        terminated = {
            "exitCode": code,
            "reason": reason,
            "startedAt": c.started_at,
            "finishedAt": finished,
            **({"message": message} if message else {}),
        }
        c.proc, c.logfile, c.probe_future = None, None, None
        c.exit_code, c.finished_at = code, finished
        c.probe = ProbeState()
        if should_restart(pod.restart_policy, code):
            c.last_terminated = terminated
            c.next_start = time.monotonic() + restart_delay(c.restarts, *self.restart_backoff)
            c.restarts += 1
            c.state, c.reason, c.message = "waiting", "CrashLoopBackOff", f"restarting after exit code {code}"
        else:
            c.state, c.reason, c.message, c.done = "terminated", reason, message, True
        log.info("%s/%s container %s exited with %d (%s)", pod.namespace, pod.name, c.name, code, reason)

    def _probe(self, pod: _Pod, c: _Container, now: float) -> None:
        probe = c.spec.get("readinessProbe")
        if not probe:
            return
        if c.probe_future is not None:
            if not c.probe_future.done():
                return
            ok, message = c.probe_future.result()
            c.probe_future = None
            c.probe.record(ok)
            if not ok:
                log.debug("%s/%s %s readiness probe failed: %s", pod.namespace, pod.name, c.name, message)
            c.probe_due = now + self._period(probe.get("periodSeconds") or 10)
        if now >= c.probe_due and c.probe_future is None:
            probes = self.network.probe_pool((pod.namespace, pod.name)) if self.network is not None else self._probes
            c.probe_future = probes.submit(
                run_probe,
                probe,
                pod_ip=pod.ip,
                container_ports=c.spec.get("ports") or [],
                env=c.env,
                cwd=c.spec.get("workingDir") or None,
            )

    # ---- status ------------------------------------------------------------------------------

    def _desired_status(self, pod: _Pod, obj: dict[str, Any]) -> dict[str, Any]:
        observed = (obj.get("status") or {}).get("conditions") or []
        statuses = []
        for c in pod.containers:
            if c.state == "running":
                state = {"running": {"startedAt": c.started_at}}
            elif c.state == "terminated":
                state = {
                    "terminated": {
                        "exitCode": c.exit_code,
                        "reason": c.reason,
                        "startedAt": c.started_at,
                        "finishedAt": c.finished_at,
                        **({"message": c.message} if c.message else {}),
                    }
                }
            else:
                state = {"waiting": {"reason": c.reason, **({"message": c.message} if c.message else {})}}
            statuses.append(
                {
                    "name": c.name,
                    "image": c.spec.get("image") or "",
                    "imageID": "",
                    "containerID": f"{CONTAINER_ID_SCHEME}://{c.pid}" if c.pid else None,
                    "ready": c.ready,
                    "started": c.state == "running",
                    "restartCount": c.restarts,
                    "state": state,
                    "lastState": {"terminated": c.last_terminated} if c.last_terminated else {},
                }
            )
        phase = pod_phase([(c.phase_kind, c.exit_code, not c.done) for c in pod.containers])
        conditions = readiness_conditions(
            observed,
            (obj.get("spec") or {}).get("readinessGates") or [],
            {c.name: c.ready for c in pod.containers},
            _now(),
        )
        return {
            "phase": phase,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "startTime": pod.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        }

    def _write_status(self, pod: _Pod, obj: dict[str, Any]) -> None:
        desired = self._desired_status(pod, obj)
        # Transition times change on every call until our write is observed: leave them out of the key.
        untimed = {**desired, "conditions": [{**c, "lastTransitionTime": None} for c in desired["conditions"]]}
        key = json.dumps(untimed, sort_keys=True)
        observed_drift = status_signature(desired) != status_signature(obj.get("status") or {})
        if key == pod.last_key and not (observed_drift and time.monotonic() - pod.last_write > 1.0):
            return
        self._patch_status(pod.namespace, pod.name, pod.uid, desired)
        pod.last_key, pod.last_write = key, time.monotonic()

    def _patch_status(self, namespace: str, name: str, uid: str, status: dict[str, Any]) -> None:
        """Strategic-merge patch of pods/status: conditions merge by type, so others' conditions stay."""
        from kubernetes.client import ApiException

        body = {"metadata": {"uid": uid}, "status": status}  # the uid guards against a same-name successor
        try:
            self._core.patch_namespaced_pod_status(name, namespace, body, _content_type=SMP, _preload_content=False)
        except ApiException as exc:
            if exc.status not in (404, 409, 422):
                raise
            log.info("status of %s/%s not written: %s", namespace, name, exc.reason)

    # ---- stopping a pod ----------------------------------------------------------------------

    def _begin_termination(self, pod: _Pod, obj: dict[str, Any], *, delete: bool) -> None:
        pod.terminating = True
        log.info("stopping %s/%s (%s)", pod.namespace, pod.name, "deleting" if delete else "already deleted")
        grace = termination_grace(obj, self.max_grace)
        thread = threading.Thread(
            target=self._terminate, args=(pod, grace, delete), name=f"podrunner-stop-{pod.name}", daemon=True
        )
        self._enders.append(thread)
        thread.start()

    def _terminate(self, pod: _Pod, grace: float, delete: bool) -> None:
        try:
            self._kill_pods([pod], grace)
            if delete and not self._stop.is_set():
                self._confirm_deletion(pod.namespace, pod.name, pod.uid)
        except Exception:
            log.exception("stopping %s/%s", pod.namespace, pod.name)
        finally:
            with self._lock:
                if self._pods.get((pod.namespace, pod.name)) is pod:
                    del self._pods[(pod.namespace, pod.name)]
                self._release(pod)

    def _kill_pods(self, pods: list[_Pod], grace: float) -> None:
        """SIGTERM every container's process group, wait up to ``grace`` s, then SIGKILL what is left."""
        procs = [(c.proc.pid, c.proc) for pod in pods for c in pod.containers if c.proc is not None]
        marks = [self._mark(pod) for pod in pods]
        for pgid, _ in procs:
            kill_group(pgid, signal.SIGTERM)
        for mark in marks:
            kill_marked(mark, signal.SIGTERM, skip_groups={pgid for pgid, _ in procs})
        deadline = time.monotonic() + grace
        for _, proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for pgid, proc in procs:
            kill_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for mark in marks:
            kill_marked(mark, signal.SIGKILL)
        for pod in pods:
            for c in pod.containers:
                if c.logfile is not None:
                    c.logfile.close()
                    c.logfile = None

    def _confirm_deletion(self, namespace: str, name: str, uid: str) -> None:
        """Delete with grace 0: the kubelet's "containers are gone" that lets the object go."""
        from kubernetes.client import ApiException

        self._deleting.add(uid)
        try:
            self._core.delete_namespaced_pod(
                name,
                namespace,
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or a new pod of the same name
                raise
            log.info("deleting %s/%s: %s %s", namespace, name, exc.status, exc.reason)


# ---- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seedfork_localdev.podrunner",
        description="Development only: schedule and run the pods of the given namespaces as local processes.",
    )
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required="KUBECONFIG" not in os.environ)
    parser.add_argument("--namespace", "-n", action="append", required=True, help="repeat for several namespaces")
    parser.add_argument("--node", action="append", help="NAME[:label=value,...]; repeat for several nodes")
    parser.add_argument("--logdir", help="one log file per container: <logdir>/<namespace>_<pod>_<container>.log")
    parser.add_argument("--probe-period", type=float, help="cap probe periods and initial delays (seconds)")
    parser.add_argument("--max-grace", type=float, help="cap termination grace periods (seconds)")
    parser.add_argument(
        "--pod-credentials",
        choices=["serviceaccount", "admin"],
        default="serviceaccount",
        help="admin: pods without a serviceAccountName get the runner's own kubeconfig",
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for every container; repeatable")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    runner = PodRunner(
        args.kubeconfig,
        args.namespace,
        nodes=args.node,
        logdir=args.logdir,
        probe_period=args.probe_period,
        max_grace=args.max_grace,
        pod_credentials=args.pod_credentials,
        env=dict(item.split("=", 1) for item in args.env),
    )
    with runner:
        print(f"pod runner: namespaces {', '.join(runner.namespaces)}; nodes {', '.join(n.name for n in runner.nodes)}")
        print(f"pod logs: {runner.logdir}")
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
