"""Pod rendering, status and CLI parsing: pure functions of the operator."""

from __future__ import annotations

import pytest

from seedfork_api import contract as c
from seedfork_api.spec import ModelReplicaSetSpec
from seedfork_operator import render
from seedfork_operator.__main__ import config_from, parse_args
from seedfork_operator.podview import PodView
from seedfork_operator.problem import Problem
from seedfork_operator.status import compute_status


def spec_with(template, kind="sglang", **transfer) -> ModelReplicaSetSpec:
    return ModelReplicaSetSpec.model_validate(
        {
            "model": {"name": "m", "uri": "/models/m"},
            "engine": {"kind": kind, "parallelism": {"tp": 2}},
            "transfer": transfer,
            "template": template,
        }
    )


def rendered(template, kind="sglang", **transfer):
    spec = spec_with(template, kind, **transfer)
    return render.render_pod(
        spec=spec,
        set_name="llama",
        set_uid="uid-1",
        namespace="ns",
        pod_name="llama-abc123",
        fingerprint=spec.fingerprint(),
        assignment=c.Assignment(attempt=1, source="storage", assigned_at=5.0),
        token_secret="llama-seedfork-token",
        agent_image="agent:1",
    )


ENGINE = {
    "name": "engine",
    "image": "sglang:1",
    "command": ["python3", "-m", "sglang.launch_server"],
    "env": [{"name": "KEEP", "value": "1"}, {"name": c.ENV_TP, "value": "9"}],
}


def test_pod_gets_contract_gate_labels_owner_and_agent_sidecar():
    pod = rendered({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [ENGINE]}}, "vllm", backend="auto")
    meta = pod["metadata"]
    assert meta["labels"] == {
        "app": "x",
        c.LABEL_SET: "llama",
        c.LABEL_FINGERPRINT: spec_with({}, "vllm").fingerprint(),
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_ROLE: c.ROLE_REPLICA,
    }
    assert meta["ownerReferences"][0]["uid"] == "uid-1" and meta["ownerReferences"][0]["controller"] is True
    assert c.Assignment.from_annotations(meta["annotations"]).source == "storage"
    assert pod["spec"]["readinessGates"] == [{"conditionType": c.READINESS_GATE}]
    engine, agent = pod["spec"]["containers"]
    assert agent["name"] == "seedfork-agent" and agent["command"] == ["seedfork-agent", "run"]
    assert agent["image"] == "agent:1"
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 18080}
    for ct in (engine, agent):
        env = {e["name"]: e for e in ct["env"]}
        assert env[c.ENV_POD_IP]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env[c.ENV_POD_NAME]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env[c.ENV_TOKEN] == {
            "name": c.ENV_TOKEN,
            "valueFrom": {"secretKeyRef": {"name": "llama-seedfork-token", "key": "token"}},
        }
        assert env[c.ENV_BACKEND]["value"] == "transfer_engine"  # auto resolves to TE
        assert env[c.ENV_TP]["value"] == "2"  # the contract wins over the template's value
        assert env[c.ENV_PORT_RANGE]["value"] == "28000-28099"
    assert {e["name"] for e in engine["env"]} >= {"KEEP"}
    pod_env = {e["name"]: e for e in engine["env"]}
    assert c.PodEnv.from_environ(
        {k: v.get("value", "x") for k, v in pod_env.items()} | {c.ENV_TOKEN: "t"}
    ).port_range == (28000, 28099)


@pytest.mark.parametrize(
    "container",
    [
        {"name": "seedfork-agent", "image": "a"},
        {"name": "engine", "image": "a", "command": ["/usr/local/bin/seedfork-agent", "run", "--", "sglang"]},
        {"name": "engine", "image": "a", "command": ["sh"], "args": ["seedfork-agent"]},
    ],
)
@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_no_sidecar_when_the_agent_is_the_entry_point(container, kind):
    pod = rendered({"spec": {"containers": [container]}}, kind)
    (got,) = pod["spec"]["containers"]
    assert got["name"] == container["name"]
    assert (got.get("command"), got.get("args")) == (container.get("command"), container.get("args"))  # not rewrapped


SGLANG = {
    "name": "engine",
    "image": "sglang-with-seedfork:1",
    "command": ["python3", "-m", "sglang.launch_server"],
    "args": ["--model-path", "/models/m", "--tp-size", "2"],
}


def test_sglang_engine_gets_the_agent_as_its_entry_point_and_no_sidecar():
    """SGLang moves its own bytes: a byte-moving sidecar would hold a second copy of the weights."""
    logger = {"name": "logs", "image": "busybox", "command": ["tail", "-f", "/dev/null"]}
    pod = rendered({"spec": {"containers": [SGLANG, logger]}}, backend="nccl")
    engine, other = pod["spec"]["containers"]
    assert engine["command"] == [
        "seedfork-agent", "run", "--", "python3", "-m", "sglang.launch_server", "--model-path", "/models/m",
        "--tp-size", "2",
    ]  # fmt: skip
    assert "args" not in engine and render.runs_agent(engine)
    assert {e["name"]: e.get("value") for e in engine["env"]}[c.ENV_ENGINE] == "sglang"
    assert other["command"] == logger["command"] and "args" not in other  # only the first container is the engine
    assert SGLANG["args"] == ["--model-path", "/models/m", "--tp-size", "2"]  # the spec's template is not mutated


def test_sglang_engine_without_a_command_is_refused_with_what_to_write():
    entrypoint_only = {"name": "engine", "image": "sglang:1", "args": ["--model-path", "/m"]}
    with pytest.raises(render.TemplateError, match=r"needs an explicit command, e\.g\. command: \[python3"):
        rendered({"spec": {"containers": [entrypoint_only]}})
    # The reconciler's check before planning catches it too (a Degraded condition, not a failing render) ...
    with pytest.raises(render.TemplateError, match="needs an explicit command"):
        render.check_template({"spec": {"containers": [entrypoint_only]}}, "sglang")
    # ... and only for sglang, where the operator must wrap the command.
    render.check_template({"spec": {"containers": [entrypoint_only]}}, "reference")


def test_existing_readiness_gates_are_kept_and_ours_not_duplicated():
    gates = [{"conditionType": "x/y"}, {"conditionType": c.READINESS_GATE}]
    pod = rendered({"spec": {"containers": [ENGINE], "readinessGates": gates}})
    assert pod["spec"]["readinessGates"] == gates


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({}, "containers is empty"),
        ({"spec": {"containers": []}}, "containers is empty"),
        ({"spec": {"containers": [{"image": "x"}]}}, "needs a name"),
        ({"spec": {"containers": [ENGINE, ENGINE]}}, "unique"),
    ],
)
def test_bad_templates_are_refused_with_a_reason(template, message):
    with pytest.raises(render.TemplateError, match=message):
        rendered(template)


def test_token_secret_is_owned_and_never_in_the_pod():
    secret = render.render_token_secret(set_name="s", set_uid="u", namespace="ns", token="t0k3n")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u" and secret["stringData"] == {"token": "t0k3n"}
    assert "t0k3n" not in repr(rendered({"spec": {"containers": [ENGINE]}}))


def test_status_counts_and_condition_transitions():
    spec = spec_with({"spec": {"containers": [ENGINE]}})
    spec.replicas = 3
    verified = c.AgentReport(attempt=1, state="verified", serving=True)
    storage = c.Assignment(attempt=1, source="storage")
    pods = [
        PodView(name="a", ready=True, ip="1", fingerprint=spec.fingerprint(), assignment=storage, report=verified),
        PodView(name="b", assignment=storage),
        PodView(name="q", assignment=c.Assignment(attempt=1, source="queued")),  # waits: not loading
        PodView(name="z", deleting=True),
    ]
    args = dict(spec=spec, fingerprint=spec.fingerprint(), pods=pods, generation=3, selector="s=1", token_secret="t")
    st = compute_status(old={}, counts={"completed": 1}, degraded=None, now=100.0, **args)
    assert (st["replicas"], st["readyReplicas"], st["seeds"]) == (3, 1, 1)
    assert st["transfers"] == {"inFlight": 1, "queued": 1, "completed": 1, "failed": 0, "fellBack": 0}
    conds = {x["type"]: x for x in st["conditions"]}
    assert conds["Available"]["status"] == "False" and conds["Progressing"]["status"] == "True"
    assert conds["Degraded"]["status"] == "False" and conds["Degraded"]["reason"] == "AsExpected"
    gone = Problem("TokenSecretMissing", "gone")
    again = compute_status(old=st, counts={"failed": 2}, degraded=gone, now=200.0, **args)
    assert again["transfers"]["completed"] == 1 and again["transfers"]["failed"] == 2  # cumulative
    conds2 = {x["type"]: x for x in again["conditions"]}
    assert (
        conds2["Degraded"]["status"] == "True"
        and conds2["Degraded"]["lastTransitionTime"] != conds["Degraded"]["lastTransitionTime"]
    )
    assert conds2["Available"]["lastTransitionTime"] == conds["Available"]["lastTransitionTime"]  # no flip


def test_cli_flags():
    args = parse_args(["--namespace", "a", "-n", "b", "--metrics-port", "0", "--peering", "seedfork"])
    assert args.namespace == ["a", "b"] and args.peering == "seedfork" and not args.all_namespaces
    assert config_from(args).metrics_port == 0
    assert parse_args(["-A", "--standalone"]).all_namespaces
    with pytest.raises(SystemExit):
        parse_args([])  # a scope is required
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "x"])


VLLM = {
    "name": "engine",
    "image": "registry.example.com/seedfork/vllm:0.32.0",
    "args": ["--model=/models/m", "--tensor-parallel-size", "2", "--load-format", "dummy", "--port=8000"],
    "volumeMounts": [{"name": "models", "mountPath": "/models"}, {"name": "cache", "mountPath": "/root/.cache"}],
}


def test_vllm_engine_loads_through_seedfork_and_shares_memory_and_the_model_with_the_agent():
    """vLLM loads from the agent's store (--load-format seedfork), never dummy weights or its own copy from disk."""
    pod = rendered({"spec": {"containers": [VLLM], "volumes": [{"name": "models", "emptyDir": {}}]}}, "vllm")
    engine, agent = pod["spec"]["containers"]
    assert engine["args"] == [
        "--model=/models/m", "--tensor-parallel-size", "2", "--port=8000", "--load-format=seedfork",
        f"--middleware={render.VLLM_GUARD}",
    ]  # fmt: skip
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": 30000}  # vLLM's API up, not only weights
    shm = {"name": render.SHM_VOLUME, "mountPath": "/dev/shm"}
    assert shm in engine["volumeMounts"] and shm in agent["volumeMounts"]
    assert {"name": render.SHM_VOLUME, "emptyDir": {"medium": "Memory"}} in pod["spec"]["volumes"]
    # The agent reads model.uri (/models/m) for the first replica: the engine's mount holding it, read only.
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in agent["volumeMounts"]
    assert not any(m["name"] == "cache" for m in agent["volumeMounts"])
    assert agent["name"] == render.AGENT_CONTAINER and {e["name"] for e in agent["env"]} >= {c.ENV_TOKEN, c.ENV_POD_IP}
    assert VLLM["args"][3] == "--load-format"  # the spec's template is not mutated


def test_vllm_keeps_a_shared_memory_mount_and_probe_the_template_has():
    mine = {**VLLM, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
            "readinessProbe": {"httpGet": {"path": "/v1/models", "port": 8000}}}  # fmt: skip
    pod = rendered({"spec": {"containers": [mine], "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}},
                   "vllm")  # fmt: skip
    engine, agent = pod["spec"]["containers"]
    assert engine["readinessProbe"] == mine["readinessProbe"]
    assert agent["volumeMounts"][0] == {"name": "dshm", "mountPath": "/dev/shm"}
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["dshm", c.ENGINE_CACHE_VOLUME]


def test_vllm_engine_and_agent_share_one_compile_cache_directory():
    """vLLM, Inductor and Triton write under the directory the agent fills from the seed and serves from."""
    pod = rendered({"spec": {"containers": [VLLM], "volumes": [{"name": "models", "emptyDir": {}}]}}, "vllm")
    engine, agent = pod["spec"]["containers"]
    mount = {"name": c.ENGINE_CACHE_VOLUME, "mountPath": c.ENGINE_CACHE_PATH}
    assert mount in engine["volumeMounts"] and mount in agent["volumeMounts"]
    assert {"name": c.ENGINE_CACHE_VOLUME, "emptyDir": {}} in pod["spec"]["volumes"]
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env[c.ENV_ENGINE_CACHE_DIR] == c.ENGINE_CACHE_PATH
    assert env["VLLM_CACHE_ROOT"].startswith(c.ENGINE_CACHE_PATH + "/")
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(c.ENGINE_CACHE_PATH + "/")
    assert env["TRITON_CACHE_DIR"].startswith(c.ENGINE_CACHE_PATH + "/")
    assert {e["name"]: e.get("value") for e in agent["env"]}[c.ENV_ENGINE_CACHE_DIR] == c.ENGINE_CACHE_PATH
    assert env[c.ENV_ENGINE_VERSION] == spec_with({}, "vllm").engine.version  # part of the cache's key
    assert env[render.VLLM_AOT_COMPILE] == "0"  # the AOT artifact this vLLM cannot load back would waste the cache
    mine = {**VLLM, "env": [{"name": render.VLLM_AOT_COMPILE, "value": "1"}]}
    pod = rendered({"spec": {"containers": [mine], "volumes": [{"name": "models", "emptyDir": {}}]}}, "vllm")
    env = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == render.VLLM_AOT_COMPILE]
    assert env == [{"name": render.VLLM_AOT_COMPILE, "value": "1"}]  # the template's choice stays


def test_sglang_engine_keeps_its_cache_root_in_the_directory_its_agent_fills_and_serves():
    """SGLang's agent is its entry point: one container holds both, with SGLang's one cache root under the
    directory the agent serves (SGLang puts Triton, Inductor, DeepGEMM and FlashInfer under it itself)."""
    pod = rendered({"spec": {"containers": [SGLANG]}}, backend="nccl")
    (engine,) = pod["spec"]["containers"]
    assert {"name": c.ENGINE_CACHE_VOLUME, "emptyDir": {}} in pod["spec"]["volumes"]
    assert engine["volumeMounts"] == [{"name": c.ENGINE_CACHE_VOLUME, "mountPath": c.ENGINE_CACHE_PATH}]
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env[c.ENV_ENGINE_CACHE_DIR] == c.ENGINE_CACHE_PATH
    assert env["SGLANG_CACHE_DIR"] == f"{c.ENGINE_CACHE_PATH}/sglang"
    assert render.VLLM_AOT_COMPILE not in env and "TRITON_CACHE_DIR" not in env  # a template's own stays SGLang's
    assert env[c.ENV_ENGINE_VERSION] == spec_with({}, "sglang").engine.version  # part of the cache's key


def test_engines_that_do_not_compile_get_no_engine_cache():
    pod = rendered({"spec": {"containers": [ENGINE]}}, "reference")
    assert not any(v["name"] == c.ENGINE_CACHE_VOLUME for v in pod["spec"].get("volumes") or [])
    assert all(e["name"] != c.ENV_ENGINE_CACHE_DIR for ct in pod["spec"]["containers"] for e in ct["env"])


def test_vllm_load_format_in_the_command_is_replaced_there():
    cmd = {"name": "engine", "image": "v", "command": ["vllm", "serve", "/models/m", "--load_format=dummy"]}
    (engine, _agent) = rendered({"spec": {"containers": [cmd]}}, "vllm")["spec"]["containers"]
    assert engine["command"] == [
        "vllm", "serve", "/models/m", "--load-format=seedfork", f"--middleware={render.VLLM_GUARD}",
    ] and "args" not in engine  # fmt: skip


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"name": "VLLM_SERVER_DEV_MODE", "value": "1"}, "VLLM_SERVER_DEV_MODE"),
        ({"name": "VLLM_PLUGINS", "value": "other"}, "VLLM_PLUGINS"),
    ],
)
def test_vllm_templates_that_would_expose_or_skip_the_loader_are_refused(env, match):
    with pytest.raises(render.TemplateError, match=match):
        render.check_template({"spec": {"containers": [{**VLLM, "env": [env]}]}}, "vllm")
    render.check_template({"spec": {"containers": [{**VLLM, "env": [{"name": "VLLM_PLUGINS", "value": "seedfork"}]}]}},
                          "vllm")  # fmt: skip


def test_standby_pod_is_labelled_standby_and_excluded_by_the_scale_selector():
    spec = spec_with({"spec": {"containers": [ENGINE]}}, "reference")
    pod = render.render_pod(
        spec=spec, set_name="llama", set_uid="u", namespace="ns", pod_name="llama-1", fingerprint=spec.fingerprint(),
        assignment=c.Assignment(attempt=1, source="standby"), token_secret="t", agent_image="a",
    )  # fmt: skip
    assert pod["metadata"]["labels"][c.LABEL_ROLE] == c.ROLE_STANDBY
    assert render.selector("llama") == f"{c.LABEL_SET}=llama,{c.LABEL_ROLE}!={c.ROLE_STANDBY}"
