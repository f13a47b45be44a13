"""Render an engine pod from a ModelReplicaSet: the user's template plus the pod contract. Pure.

What the operator adds (``seedfork_api.contract`` names every key):
- labels: owning set, fingerprint, managed-by; a controller ownerReference to the set;
- the initial ``Assignment`` in the assignment annotation;
- the readiness gate, so the pod is Ready only after the weights are verified;
- the static contract env vars in every container: pod name/namespace/IP through the
  downward API, the token through a secretKeyRef (never a literal);
- the agent, unless the template already runs it (a container named ``seedfork-agent`` or one whose
  command/args invoke it, e.g. ``seedfork-agent run -- python3 -m sglang.launch_server ...``):
  - engine ``sglang``: SGLang moves its own bytes and the agent launches and supervises it, so the agent
    becomes the entry point of the engine container (the first one): its command turns into
    ``seedfork-agent run -- <command> <args>``. The engine image must therefore contain seedfork.
  - other engines: an agent sidecar that moves the bytes into its own store.
"""

from __future__ import annotations

import copy
from typing import Any

from seedfork_api import contract as c
from seedfork_api.sglang_args import data_parallel_problem
from seedfork_api.spec import API_VERSION, KIND, ModelReplicaSetSpec

from .planner import resolve_backend

AGENT_CONTAINER = "seedfork-agent"
AGENT_COMMAND = ["seedfork-agent", "run"]
AGENT_ENTRY_POINT = [*AGENT_COMMAND, "--"]


class TemplateError(ValueError):
    """The template cannot become a pod; the message says why (shown in the Degraded condition)."""


def selector(set_name: str) -> str:
    """status.selector: the serialized label selector the scale subresource hands to HPA/KEDA."""
    return f"{c.LABEL_SET}={set_name}"


def pod_labels(set_name: str, fingerprint: str) -> dict[str, str]:
    return {c.LABEL_SET: set_name, c.LABEL_FINGERPRINT: fingerprint, c.LABEL_MANAGED_BY: c.MANAGED_BY}


def check_template(template: dict[str, Any], engine: str = "") -> None:
    """Refuse a template that cannot become an engine pod; the reconciler runs this before planning, so the
    reason lands in the Degraded condition instead of failing every pod's render."""
    containers = (template.get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers:
        raise TemplateError("spec.template.spec.containers is empty: the template needs the engine container")
    names = [ct.get("name") for ct in containers if isinstance(ct, dict)]
    if len(names) != len(containers) or not all(isinstance(n, str) and n for n in names):
        raise TemplateError("every container in spec.template.spec.containers needs a name")
    if len(set(names)) != len(names):
        raise TemplateError("container names in spec.template.spec.containers must be unique")
    engine_container = containers[0]
    if engine == "sglang" and not any(runs_agent(ct) for ct in containers) and not engine_container.get("command"):
        raise TemplateError(
            f"engine sglang: container {engine_container['name']!r} needs an explicit command, e.g. "
            "command: [python3, -m, sglang.launch_server]; the operator runs it as "
            "seedfork-agent run -- <command> <args> and cannot see the image's entrypoint"
        )
    if engine == "sglang":
        argv = [*(engine_container.get("command") or []), *(engine_container.get("args") or [])]
        problem = data_parallel_problem([w for w in argv if isinstance(w, str)])
        if problem:
            raise TemplateError(f"engine sglang: container {engine_container['name']!r}: {problem}")


def runs_agent(container: dict[str, Any]) -> bool:
    if container.get("name") == AGENT_CONTAINER:
        return True
    words = [*(container.get("command") or []), *(container.get("args") or [])]
    return any(isinstance(w, str) and w.rsplit("/", 1)[-1] == "seedfork-agent" for w in words)


def contract_env(spec: ModelReplicaSetSpec, set_name: str, fingerprint: str, token_secret: str) -> list[dict]:
    t = spec.transfer
    values = {
        c.ENV_SET: set_name,
        c.ENV_FINGERPRINT: fingerprint,
        c.ENV_AGENT_PORT: str(t.agent_port),
        c.ENV_ENGINE_PORT: str(spec.engine.port),
        c.ENV_ENGINE: spec.engine.kind,
        c.ENV_BACKEND: resolve_backend(spec),
        c.ENV_PROTOCOL: t.protocol,
        c.ENV_PORT_RANGE: f"{t.ports.start}-{t.ports.end}",
        c.ENV_MODEL_URI: spec.model.uri,
        c.ENV_TP: str(spec.engine.parallelism.tp),
        c.ENV_PP: str(spec.engine.parallelism.pp),
        c.ENV_TIMEOUT_SECONDS: str(t.timeout_seconds),
        c.ENV_BANDWIDTH_LIMIT_MBPS: str(t.bandwidth_limit_mbps) if t.bandwidth_limit_mbps else None,
    }
    fields = {c.ENV_POD_NAME: "metadata.name", c.ENV_POD_NAMESPACE: "metadata.namespace", c.ENV_POD_IP: "status.podIP"}
    env = [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": f}}} for n, f in fields.items()]
    env += [{"name": n, "value": v} for n, v in values.items() if v is not None]
    env.append({"name": c.ENV_TOKEN, "valueFrom": {"secretKeyRef": {"name": token_secret, "key": c.TOKEN_SECRET_KEY}}})
    return env


def _with_env(container: dict[str, Any], env: list[dict]) -> dict[str, Any]:
    ours = {e["name"] for e in env}
    # The contract wins over a same-named variable in the template; the template's other vars stay.
    container["env"] = [e for e in container.get("env") or [] if e.get("name") not in ours] + copy.deepcopy(env)
    return container


def wrap_engine(container: dict[str, Any]) -> dict[str, Any]:
    """The engine container with the agent as its entry point: ``seedfork-agent run -- <command> <args>``.

    Wrapping keeps the template a plain SGLang container; the agent adds the R-Fork flags per assignment.
    ``check_template`` made sure the container has a command.
    """
    container["command"] = [*AGENT_ENTRY_POINT, *container["command"], *(container.get("args") or [])]
    container.pop("args", None)
    return container


def agent_container(spec: ModelReplicaSetSpec, image: str, env: list[dict]) -> dict[str, Any]:
    port = spec.transfer.agent_port
    return {
        "name": AGENT_CONTAINER,
        "image": image,
        "command": list(AGENT_COMMAND),
        "env": copy.deepcopy(env),
        "ports": [{"name": "sf-agent", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": port}, "periodSeconds": 2, "failureThreshold": 3},
    }


def render_pod(
    *,
    spec: ModelReplicaSetSpec,
    set_name: str,
    set_uid: str,
    namespace: str,
    pod_name: str,
    fingerprint: str,
    assignment: c.Assignment,
    token_secret: str,
    agent_image: str,
) -> dict[str, Any]:
    template = copy.deepcopy(spec.template)
    check_template(template, spec.engine.kind)
    meta = template.get("metadata") or {}
    pod_spec = template["spec"]
    env = contract_env(spec, set_name, fingerprint, token_secret)

    containers = [_with_env(ct, env) for ct in pod_spec["containers"]]
    if not any(runs_agent(ct) for ct in containers):
        if spec.engine.kind == "sglang":
            containers[0] = wrap_engine(containers[0])
        else:
            containers.append(agent_container(spec, agent_image, env))
    pod_spec["containers"] = containers
    gates = [g for g in pod_spec.get("readinessGates") or [] if g.get("conditionType") != c.READINESS_GATE]
    pod_spec["readinessGates"] = [*gates, {"conditionType": c.READINESS_GATE}]

    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in (c.ANN_REPORT, c.ANN_TIMING)}
    annotations[c.ANN_ASSIGNMENT] = assignment.to_json()
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": {**(meta.get("labels") or {}), **pod_labels(set_name, fingerprint)},
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": set_name,
                    "uid": set_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }


def token_secret_name(set_name: str) -> str:
    return f"{set_name}-seedfork-token"


def render_token_secret(*, set_name: str, set_uid: str, namespace: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": token_secret_name(set_name),
            "namespace": namespace,
            "labels": {c.LABEL_SET: set_name, c.LABEL_MANAGED_BY: c.MANAGED_BY},
            "ownerReferences": [
                {"apiVersion": API_VERSION, "kind": KIND, "name": set_name, "uid": set_uid, "controller": True}
            ],
        },
        "stringData": {c.TOKEN_SECRET_KEY: token},
    }
