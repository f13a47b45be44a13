"""Kubelet and scheduler rules the local pod runner follows, as pure functions (no I/O).

Development/test component: the pod runner (``podrunner.py``) plays scheduler and
kubelet on a local control plane; these are the decisions it makes, kept apart so
they can be read and tested on their own. Each follows what Kubernetes does, in
the subset the runner supports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Downward-API field paths the runner can fill in (anything else fails the container).
SUPPORTED_FIELD_PATHS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.podIP",
    "status.hostIP",
)

# Condition types the runner owns on a pod; every other condition (readiness gates
# included) belongs to someone else and is never written by the runner.
OWN_CONDITIONS = ("Initialized", "ContainersReady", "Ready")


class ContainerConfigError(Exception):
    """The container cannot be started as specified (kubelet reason ``CreateContainerConfigError``)."""

    reason = "CreateContainerConfigError"


@dataclass(frozen=True)
class NodeSpec:
    """A node the runner registers and schedules onto."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | NodeSpec) -> NodeSpec:
        """From ``{"name": ..., "labels": {...}, "capacity": {...}}`` or ``"name:key=value,key=value"``."""
        if isinstance(value, NodeSpec):
            return value
        if isinstance(value, str):
            name, _, rest = value.partition(":")
            labels = dict(item.split("=", 1) for item in rest.split(",") if item)
            return cls(name=name, labels=labels)
        unknown = set(value) - {"name", "labels", "capacity"}
        if unknown or not value.get("name"):
            raise ValueError(f"node needs a name and only name/labels/capacity, got {dict(value)!r}")
        return cls(
            name=value["name"], labels=dict(value.get("labels") or {}), capacity=dict(value.get("capacity") or {})
        )

    def all_labels(self) -> dict[str, str]:
        return {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", **self.labels}


def node_status(node: NodeSpec, *, cpus: str, host_ip: str, now: str, runtime: str) -> dict[str, Any]:
    """The status a kubelet reports for its node: capacity, addresses, Ready, and what runs it."""
    resources = {"cpu": cpus, "memory": "16Gi", "pods": "110", **node.capacity}
    return {
        "capacity": resources,
        "allocatable": resources,
        "addresses": [{"type": "InternalIP", "address": host_ip}, {"type": "Hostname", "address": node.name}],
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "seedfork local pod runner (development only)",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ],
        "nodeInfo": {
            "machineID": node.name,
            "systemUUID": node.name,
            "bootID": node.name,
            "kernelVersion": os.uname().release,
            "osImage": "seedfork local pod runner",
            "containerRuntimeVersion": f"{runtime}://0",
            "kubeletVersion": "v0.0.0-seedfork-podrunner",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": os.uname().machine,
        },
    }


# ---- scheduling --------------------------------------------------------------------------


def choose_node(
    nodes: Sequence[NodeSpec], node_selector: Mapping[str, str] | None, load: Mapping[str, int]
) -> str | None:
    """The least-loaded node whose labels match the pod's nodeSelector; ties go to the earlier node.

    Returns None when no node matches (the pod stays Pending/Unschedulable). Affinity,
    taints and resources are not considered.
    """
    selector = node_selector or {}
    fitting = [n for n in nodes if all(n.all_labels().get(k) == v for k, v in selector.items())]
    if not fitting:
        return None
    return min(fitting, key=lambda n: load.get(n.name, 0)).name


# ---- environment ---------------------------------------------------------------------------

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand_refs(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, unknown ones kept, ``$$`` escapes ``$``."""

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _REF.sub(sub, text)


def field_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """A downward-API ``fieldRef`` value; the IPs come from the runner (status may not be written yet)."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    values = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.hostIP": host_ip,
    }
    if path not in values:
        raise ContainerConfigError(
            f"fieldRef {path!r} is not supported by the local pod runner (supported: {', '.join(values)})"
        )
    return values[path]


def container_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    *,
    pod_ip: str,
    host_ip: str,
    secret_value: Callable[[str, str], str | None],
    config_map_value: Callable[[str, str], str | None],
) -> dict[str, str]:
    """The container's env vars in order, with ``$(VAR)`` expansion over the ones defined before.

    ``secret_value(name, key)`` / ``config_map_value(name, key)`` return None when the
    object or key is missing. Raises ContainerConfigError for a missing required
    reference or a source the runner does not support (``envFrom``, ``resourceFieldRef``...).
    """
    if container.get("envFrom"):
        raise ContainerConfigError("envFrom is not supported by the local pod runner; list env vars one by one")
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        name = var["name"]
        source = var.get("valueFrom")
        if source is None:
            env[name] = expand_refs(var.get("value") or "", env)
            continue
        if "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind, ref = (
                ("secret", source["secretKeyRef"])
                if "secretKeyRef" in source
                else (
                    "configmap",
                    source["configMapKeyRef"],
                )
            )
            lookup = secret_value if kind == "secret" else config_map_value
            value = lookup(ref["name"], ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f"{kind} {ref['name']!r} has no key {ref['key']!r} (env {name})")
            env[name] = value
        else:
            raise ContainerConfigError(
                f"env {name}: valueFrom {sorted(source)} is not supported by the local pod runner "
                "(supported: value, fieldRef, secretKeyRef, configMapKeyRef)"
            )
    return env


def image_repository(image: str | None) -> str:
    """``registry/name:tag`` or ``name@sha256:...`` without its tag or digest."""
    if not image:
        return ""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.split(':', 1)[0]}" if head else tail.split(":", 1)[0]


def image_env(image: str | None, images: Mapping[str, Mapping[str, str]], path: str) -> dict[str, str]:
    """The environment standing in for ``image`` (its ``PATH`` put before ``path``); empty if none does."""
    stand_in = images.get(image_repository(image))
    if not stand_in:
        return {}
    env = dict(stand_in)
    if "PATH" in env:
        env["PATH"] = os.pathsep.join([env["PATH"], path])
    return env


def empty_dir_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], env: Mapping[str, str], pod_dir: str | Path
) -> dict[str, str]:
    """The runner mounts nothing: an ``emptyDir`` volume (not ``medium: Memory``, which is /dev/shm here) that
    ``container`` mounts is a directory of the pod's own, ``<pod_dir>/<volume>``, and every env value that
    names a path under its ``mountPath`` is rewritten to point there. So two pods never share what each
    would keep in its own volume (e.g. the engine cache), while engine and agent of one pod do."""
    volumes = {
        v.get("name")
        for v in (pod.get("spec") or {}).get("volumes") or []
        if "emptyDir" in v and (v.get("emptyDir") or {}).get("medium") != "Memory"
    }
    out: dict[str, str] = {}
    for m in container.get("volumeMounts") or []:
        if m.get("name") not in volumes or not m.get("mountPath"):
            continue
        mount = str(m["mountPath"]).rstrip("/")
        local = Path(pod_dir) / str(m["name"])
        for name, value in env.items():
            if value == mount or value.startswith(mount + "/"):
                out[name] = str(local) + value[len(mount) :]
                local.mkdir(parents=True, exist_ok=True)
    return out


def container_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with ``$(VAR)`` expansion. Images are not run, so a command is required."""
    command = list(container.get("command") or [])
    if not command:
        raise ContainerConfigError(
            f"container {container.get('name')!r} has no command: the local pod runner ignores images "
            "and runs the command on this machine"
        )
    return [expand_refs(part, env) for part in [*command, *(container.get("args") or [])]]


# ---- restarts and phase ---------------------------------------------------------------------


def should_restart(restart_policy: str, exit_code: int) -> bool:
    if restart_policy == "Always":
        return True
    if restart_policy == "OnFailure":
        return exit_code != 0
    return False


def restart_delay(restarts: int, base: float, cap: float) -> float:
    """Exponential back-off before the next start: base, 2*base, 4*base, ... up to cap."""
    return min(cap, base * (2 ** max(0, restarts)))


def pod_phase(states: Sequence[tuple[str, int | None, bool]]) -> str:
    """Pod phase from (kind, last exit code, will-restart) per container, as the kubelet computes it.

    kind is ``waiting`` (never started yet), ``running`` or ``stopped`` (exited; maybe
    waiting to restart). Pending while a container has not started; Running while one
    runs or will be restarted; then Succeeded if all exited 0, else Failed.
    """
    if not states or any(kind == "waiting" for kind, _, _ in states):
        return "Pending"
    if any(kind == "running" or restarting for kind, _, restarting in states):
        return "Running"
    return "Succeeded" if all(code == 0 for _, code, _ in states) else "Failed"


def termination_grace(pod: Mapping[str, Any], max_grace: float | None) -> float:
    """Seconds between SIGTERM and SIGKILL: the deletion's grace, else the pod's, else 30; capped by ``max_grace``."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    grace = meta.get("deletionGracePeriodSeconds")
    if grace is None:
        grace = spec.get("terminationGracePeriodSeconds", 30)
    return min(float(grace), max_grace) if max_grace is not None else float(grace)


# ---- readiness -----------------------------------------------------------------------------


@dataclass
class ProbeState:
    """Readiness of one container from its probe results (success/failure thresholds)."""

    success_threshold: int = 1
    failure_threshold: int = 3
    ready: bool = False
    successes: int = 0
    failures: int = 0

    def record(self, ok: bool) -> bool:
        """Take one probe result; returns the container's readiness after it."""
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.success_threshold:
                self.ready = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= self.failure_threshold:
                self.ready = False
        return self.ready


def readiness_conditions(
    observed: Sequence[Mapping[str, Any]],
    readiness_gates: Sequence[Mapping[str, Any]],
    containers_ready: Mapping[str, bool],
    now: str,
) -> list[dict[str, Any]]:
    """The runner's own pod conditions: Initialized, ContainersReady and Ready.

    Ready is ContainersReady AND every readiness-gate condition True, as Kubernetes
    computes it. Gate conditions are read from ``observed`` but never returned: they
    belong to whoever sets them. lastTransitionTime is kept while a status is unchanged.
    """
    by_type = {c.get("type"): c for c in observed}
    unready = sorted(name for name, ready in containers_ready.items() if not ready)
    all_ready = bool(containers_ready) and not unready
    missing_gates, false_gates = [], []
    for gate in readiness_gates:
        cond = by_type.get(gate["conditionType"])
        if cond is None:
            missing_gates.append(gate["conditionType"])
        elif cond.get("status") != "True":
            false_gates.append(gate["conditionType"])

    def cond(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        previous = by_type.get(kind) or {}
        changed = previous.get("status") != status
        out: dict[str, Any] = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": now
            if changed or not previous.get("lastTransitionTime")
            else previous["lastTransitionTime"],
        }
        if not ok:
            out["reason"], out["message"] = reason, message
        return out

    containers_msg = f"containers with unready status: [{' '.join(unready)}]"
    if not all_ready:
        ready = cond("Ready", False, "ContainersNotReady", containers_msg)
    elif missing_gates:
        ready = cond(
            "Ready",
            False,
            "ReadinessGatesNotReady",
            f"corresponding condition of pod readiness gate {missing_gates[0]!r} does not exist.",
        )
    elif false_gates:
        ready = cond(
            "Ready",
            False,
            "ReadinessGatesNotReady",
            f'the status of pod readiness gate {false_gates[0]!r} is not "True", but False',
        )
    else:
        ready = cond("Ready", True)
    return [
        cond("Initialized", True),
        cond("ContainersReady", all_ready, "ContainersNotReady", containers_msg),
        ready,
    ]


def status_signature(status: Mapping[str, Any]) -> tuple:
    """What must match between the written and the observed pod status (times and defaults ignored)."""
    conds = tuple(
        sorted((c["type"], c["status"]) for c in status.get("conditions") or [] if c.get("type") in OWN_CONDITIONS)
    )
    containers = tuple(
        (c["name"], c.get("ready"), c.get("restartCount"), tuple(c.get("state") or {}))
        for c in status.get("containerStatuses") or []
    )
    return status.get("phase"), status.get("podIP"), conds, containers
