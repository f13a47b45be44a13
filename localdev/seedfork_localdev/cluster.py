"""A local cluster for one namespace: the CRD, the agent's RBAC, the pod runner and the operator process."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from seedfork_api.spec import GROUP, PLURAL, VERSION

from .manifests import AGENT_SERVICE_ACCOUNT
from .processes import REPO, Proc, child_env
from .waiting import ScenarioError, wait_until

CRD_FILE = REPO / "crds" / "seedfork.io_modelreplicasets.yaml"

# Three nodes in two zones, so the operator's same-node / same-zone seed preference has something to choose.
DEFAULT_NODES = (
    "node-a:topology.kubernetes.io/zone=zone-1",
    "node-b:topology.kubernetes.io/zone=zone-1",
    "node-c:topology.kubernetes.io/zone=zone-2",
)


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
