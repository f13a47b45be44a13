"""Render an engine pod from a ModelReplicaSet: the user's template plus the pod contract. Pure.

What the operator adds (``seedfork_api.contract`` names every key):
- labels: owning set, fingerprint, managed-by, role (replica or standby); a controller ownerReference to the set;
- the initial ``Assignment`` in the assignment annotation;
- the readiness gate, so the pod is Ready only after the weights are verified;
- the static contract env vars in every container: pod name/namespace/IP through the
  downward API, the token through a secretKeyRef (never a literal);
- the agent, unless the template already runs it (a container named ``seedfork-agent`` or one whose
  command/args invoke it, e.g. ``seedfork-agent run -- python3 -m sglang.launch_server ...``), as the engine's
  row in ``seedfork_api.engines`` says (``Engine.agent``):
  - ``entry_point`` (engine ``sglang``): SGLang moves its own bytes and the agent launches and supervises it, so
    the agent becomes the entry point of the engine container (the first one): its command turns into
    ``seedfork-agent run -- <command> <args>``. The engine image must therefore contain seedfork.
  - ``store_loader`` (engine ``vllm``): an agent sidecar that moves the bytes into its store, and vLLM loads them
    from that store inside its own processes (``--load-format seedfork``, seedfork's model loader for vLLM): the
    engine container's ``--load-format`` is set to it, both containers mount one memory-backed
    ``/dev/shm`` (the store on CPU), the sidecar mounts the engine's volumes that hold ``model.uri``
    (read only, for the first replica), and the engine gets a readiness probe on vLLM's ``/health``
    unless it has one; ``--middleware`` adds seedfork's guard (``vllm_guard``), so vLLM's API refuses
    requests until the agent has verified the weights inside the engine.
  - ``sidecar`` (engine ``reference``): an agent sidecar that moves the bytes into its own store.
"""

from __future__ import annotations

import copy
from typing import Any

from seedfork_api import contract as c
from seedfork_api import engines
from seedfork_api.sglang_args import data_parallel_problem
from seedfork_api.spec import API_VERSION, KIND, ModelReplicaSetSpec

from .planner import resolve_backend

AGENT_CONTAINER = "seedfork-agent"
AGENT_COMMAND = ["seedfork-agent", "run"]
AGENT_ENTRY_POINT = [*AGENT_COMMAND, "--"]
VLLM_LOAD_FORMAT = "seedfork"  # registered by seedfork_agent.engines.vllm_loader in vLLM's processes
# vLLM 0.32.0 saves its AOT-compiled artifact but cannot load it back ("Compiling model again due to a load
# failure"), so with it a pod given the seed's cache still re-traces the model: 2.17x shorter compile/warm-up
# instead of 3.97x without it (bench/engine_cache.py). Off unless the template says otherwise.
VLLM_AOT_COMPILE = "VLLM_USE_AOT_COMPILE"
# vLLM's API refuses requests until the agent verified the weights (a warm standby answers /health first).
VLLM_GUARD = "seedfork_agent.engines.vllm_guard.guard"
SHM_VOLUME = "seedfork-shm"
SHM_PATH = "/dev/shm"


class TemplateError(ValueError):
    """The template cannot become a pod; the message says why (shown in the Degraded condition)."""


def selector(set_name: str) -> str:
    """status.selector: the serialized label selector the scale subresource hands to HPA/KEDA. Standbys are no
    replicas; ``!=`` also matches pods made before the role label existed."""
    return f"{c.LABEL_SET}={set_name},{c.LABEL_ROLE}!={c.ROLE_STANDBY}"


def pod_labels(set_name: str, fingerprint: str, role: str = c.ROLE_REPLICA) -> dict[str, str]:
    return {
        c.LABEL_SET: set_name,
        c.LABEL_FINGERPRINT: fingerprint,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_ROLE: role,
    }


def role(assignment: c.Assignment) -> str:
    return c.ROLE_STANDBY if assignment.source == "standby" else c.ROLE_REPLICA


def check_template(template: dict[str, Any], engine: str) -> None:
    """Refuse a template that cannot become an engine pod; the reconciler runs this before planning, so the
    reason lands in the Degraded condition instead of failing every pod's render. Beyond the pod shape's rule
    (``Engine.agent``), the checks read the engine's own flags and variables, so they go by kind."""
    containers = (template.get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers:
        raise TemplateError("spec.template.spec.containers is empty: the template needs the engine container")
    names = [ct.get("name") for ct in containers if isinstance(ct, dict)]
    if len(names) != len(containers) or not all(isinstance(n, str) and n for n in names):
        raise TemplateError("every container in spec.template.spec.containers needs a name")
    if len(set(names)) != len(names):
        raise TemplateError("container names in spec.template.spec.containers must be unique")
    engine_container = containers[0]
    if engine == "vllm":
        _check_vllm(engine_container)
    wrapped = engines.of(engine).agent == "entry_point"
    if wrapped and not any(runs_agent(ct) for ct in containers) and not engine_container.get("command"):
        raise TemplateError(
            f"engine {engine}: container {engine_container['name']!r} needs an explicit command, e.g. "
            "command: [python3, -m, sglang.launch_server]; the operator runs it as "
            "seedfork-agent run -- <command> <args> and cannot see the image's entrypoint"
        )
    if engine == "sglang":
        argv = [*(engine_container.get("command") or []), *(engine_container.get("args") or [])]
        problem = data_parallel_problem([w for w in argv if isinstance(w, str)])
        if problem:
            raise TemplateError(f"engine sglang: container {engine_container['name']!r}: {problem}")


def _env_value(container: dict[str, Any], name: str) -> str | None:
    for e in container.get("env") or []:
        if isinstance(e, dict) and e.get("name") == name:
            return str(e.get("value", ""))
    return None


def _check_vllm(container: dict[str, Any]) -> None:
    name = container.get("name")
    if _env_value(container, "VLLM_SERVER_DEV_MODE") not in (None, "", "0"):
        raise TemplateError(
            f"engine vllm: container {name!r} sets VLLM_SERVER_DEV_MODE; its routes (/collective_rpc, "
            "/sleep, /weight_checker) change weights without any token, and seedfork needs none of them"
        )
    plugins = _env_value(container, "VLLM_PLUGINS")
    if plugins is not None and VLLM_LOAD_FORMAT not in [p.strip() for p in plugins.split(",")]:
        raise TemplateError(
            f"engine vllm: container {name!r} sets VLLM_PLUGINS={plugins!r} without {VLLM_LOAD_FORMAT!r}: "
            "vLLM would not load seedfork's model loader"
        )


def _set_flag(words: list[str], flag: str, value: str) -> list[str]:
    """``words`` with every ``flag VALUE`` / ``flag=VALUE`` (dashes or underscores) replaced by ``flag=value``."""
    spellings = {flag, flag.replace("-", "_").replace("__", "--", 1)}
    out: list[str] = []
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        head = w.split("=", 1)[0]
        if head in spellings:
            skip = "=" not in w
            continue
        out.append(w)
    return [*out, f"{flag}={value}"]


def vllm_engine(container: dict[str, Any], engine_port: int) -> dict[str, Any]:
    """vLLM's container loading its weights through seedfork's loader, probed on ``/health``."""
    if container.get("args") or not container.get("command"):
        container["args"] = _set_flag(list(container.get("args") or []), "--load-format", VLLM_LOAD_FORMAT)
        container["command"] = _drop_flag(list(container.get("command") or []), "--load-format") or None
        if container["command"] is None:
            container.pop("command")
    else:
        container["command"] = _set_flag(list(container["command"]), "--load-format", VLLM_LOAD_FORMAT)
    words = "args" if container.get("args") else "command"
    if f"--middleware={VLLM_GUARD}" not in container[words]:  # beside any middleware of the template's
        container[words] = [*container[words], f"--middleware={VLLM_GUARD}"]
    if not container.get("readinessProbe"):
        container["readinessProbe"] = {
            "httpGet": {"path": "/health", "port": engine_port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        }
    return container


def _drop_flag(words: list[str], flag: str) -> list[str]:
    return _set_flag(words, flag, "")[:-1]


def _shared_memory(pod_spec: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any]:
    """The mount of the engine's ``/dev/shm`` (a memory-backed emptyDir, added if the template has none)."""
    for m in engine.get("volumeMounts") or []:
        if m.get("mountPath") == SHM_PATH:
            return {"name": m["name"], "mountPath": SHM_PATH}
    pod_spec["volumes"] = [*(pod_spec.get("volumes") or []), {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    mount = {"name": SHM_VOLUME, "mountPath": SHM_PATH}
    engine["volumeMounts"] = [*(engine.get("volumeMounts") or []), dict(mount)]
    return mount


def _model_mounts(engine: dict[str, Any], uri: str | None) -> list[dict[str, Any]]:
    """The engine's mounts that hold ``model.uri``, read only, for the agent's storage load."""
    if not uri:
        return []
    out = []
    for m in engine.get("volumeMounts") or []:
        path = str(m.get("mountPath", "")).rstrip("/")
        if path and path != SHM_PATH and (uri == path or uri.startswith(path + "/")):
            out.append({**m, "readOnly": True})
    return out


def _engine_cache(pod_spec: dict[str, Any], kind: str, engine: dict[str, Any], agent: dict[str, Any] | None) -> None:
    """One directory for the engine's compile caches (vLLM's torch.compile, Inductor and Triton; SGLang's
    cache root), a volume of the pod mounted in engine and agent (one container where the agent is the
    engine's entry point): the agent fills it from the seed before the engine compiles, and serves it to
    later pods once the engine is up (engine_cache in the agent)."""
    volumes = pod_spec.get("volumes") or []
    if not any(v.get("name") == c.ENGINE_CACHE_VOLUME for v in volumes):  # a template may bring its own
        pod_spec["volumes"] = [*volumes, {"name": c.ENGINE_CACHE_VOLUME, "emptyDir": {}}]
    mount = {"name": c.ENGINE_CACHE_VOLUME, "mountPath": c.ENGINE_CACHE_PATH}
    cache_env = [{"name": c.ENV_ENGINE_CACHE_DIR, "value": c.ENGINE_CACHE_PATH}]
    engine_env = [{"name": k, "value": v} for k, v in c.engine_cache_env(kind, c.ENGINE_CACHE_PATH).items()]
    _with_env(engine, [*cache_env, *engine_env])
    if agent is not None:
        _with_env(agent, cache_env)
    # a template's own choice stays
    if kind == "vllm" and not any(e.get("name") == VLLM_AOT_COMPILE for e in engine["env"]):
        engine["env"] = [*engine["env"], {"name": VLLM_AOT_COMPILE, "value": "0"}]
    for ct in (engine, agent) if agent is not None else (engine,):
        mounts = [m for m in ct.get("volumeMounts") or [] if m.get("mountPath") != c.ENGINE_CACHE_PATH]
        ct["volumeMounts"] = [*mounts, dict(mount)]


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
        c.ENV_MAX_CLIENTS_PER_SEED: str(t.max_clients_per_seed),
        c.ENV_ENGINE_VERSION: spec.engine.version,
    }
    fields = {c.ENV_POD_NAME: "metadata.name", c.ENV_POD_NAMESPACE: "metadata.namespace", c.ENV_POD_IP: "status.podIP"}
    env = [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": f}}} for n, f in fields.items()]
    env += [{"name": n, "value": v} for n, v in values.items() if v is not None]
    env.append({"name": c.ENV_TOKEN, "valueFrom": {"secretKeyRef": {"name": token_secret, "key": c.TOKEN_SECRET_KEY}}})
    # Present only during a rotation's grace period (tokensecret): optional, so a Secret without it still starts pods.
    previous = {"name": token_secret, "key": c.TOKEN_PREVIOUS_KEY, "optional": True}
    env.append({"name": c.ENV_TOKEN_PREVIOUS, "valueFrom": {"secretKeyRef": previous}})
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
    token_digest: str = "",
) -> dict[str, Any]:
    template = copy.deepcopy(spec.template)
    check_template(template, spec.engine.kind)
    meta = template.get("metadata") or {}
    pod_spec = template["spec"]
    env = contract_env(spec, set_name, fingerprint, token_secret)

    containers = [_with_env(ct, env) for ct in pod_spec["containers"]]
    joins = engines.of(spec.engine.kind).agent
    if not any(runs_agent(ct) for ct in containers):
        if joins == "entry_point":  # SGLang: the agent launches the engine in its own container
            containers[0] = wrap_engine(containers[0])
            _engine_cache(pod_spec, spec.engine.kind, containers[0], None)
        elif joins == "store_loader":  # the shape built for vLLM's loader
            engine = containers[0] = vllm_engine(containers[0], spec.engine.port)
            agent = agent_container(spec, agent_image, env)
            agent["volumeMounts"] = [_shared_memory(pod_spec, engine), *_model_mounts(engine, spec.model.uri)]
            _engine_cache(pod_spec, spec.engine.kind, engine, agent)
            containers.append(agent)
        else:
            containers.append(agent_container(spec, agent_image, env))
    pod_spec["containers"] = containers
    gates = [g for g in pod_spec.get("readinessGates") or [] if g.get("conditionType") != c.READINESS_GATE]
    pod_spec["readinessGates"] = [*gates, {"conditionType": c.READINESS_GATE}]

    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in (c.ANN_REPORT, c.ANN_TIMING)}
    annotations[c.ANN_ASSIGNMENT] = assignment.to_json()
    if token_digest:
        annotations[c.ANN_TOKEN_DIGEST] = token_digest
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": {**(meta.get("labels") or {}), **pod_labels(set_name, fingerprint, role(assignment))},
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
    """The operator's own token Secret; labelled with the set so the operator's Secret watch sees it."""
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
