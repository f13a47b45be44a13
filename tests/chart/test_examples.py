"""Every file in examples/ is valid: ModelReplicaSets against the real CRD (schema + CEL, server-side),
the HPA against the apiserver, the KEDA ScaledObject against a strict schema of KEDA's documented
fields (KEDA itself is not installed here), and all of them with kubeconform -strict."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from kubernetes import client

from seedfork_api import spec as api

# The first test that needs kubeconform builds it once from the Go module proxy (minutes, cold).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

SETS = ["reference-engine.yaml", "sglang-transfer-engine.yaml", "sglang-nccl.yaml", "vllm.yaml"]


def _load(tools, name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((tools.EXAMPLES / name).read_text()) if d]
    return doc


def _custom(api_client) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def test_examples_cover_every_engine_and_backend(tools):
    files = sorted(p.name for p in tools.EXAMPLES.glob("*.yaml"))
    assert files == sorted([*SETS, "hpa.yaml", "keda-scaledobject.yaml"])
    shapes = {
        (d["spec"]["engine"]["kind"], d["spec"]["transfer"]["backend"]) for d in map(lambda n: _load(tools, n), SETS)
    }
    assert shapes == {("reference", "auto"), ("sglang", "transfer_engine"), ("sglang", "nccl"), ("vllm", "auto")}


@pytest.mark.parametrize("name", SETS)
def test_model_replica_set_example_is_accepted_by_the_crd(tools, api_client, crd, namespace, name):
    body = _load(tools, name)
    custom = _custom(api_client)
    dry = custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body, dry_run="All")
    assert dry["spec"]["replicas"] == body["spec"]["replicas"]
    # Nothing the example says was pruned as unknown by the schema.
    for key, value in body["spec"]["transfer"].items():
        assert dry["spec"]["transfer"][key] == value, key
    assert dry["spec"]["template"] == body["spec"]["template"]
    api.ModelReplicaSet.model_validate(dry)  # and the operator's own model parses what the apiserver stored
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
    scale = custom.get_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, namespace, api.PLURAL, body["metadata"]["name"]
    )
    assert scale["spec"]["replicas"] == body["spec"]["replicas"]


def test_breaking_an_sglang_nccl_rule_in_the_example_is_rejected(tools, api_client, crd, namespace):
    from kubernetes.client.exceptions import ApiException

    body = copy.deepcopy(_load(tools, "sglang-nccl.yaml"))
    body["spec"]["transfer"]["maxClientsPerSeed"] = 2
    with pytest.raises(ApiException) as err:
        _custom(api_client).create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body, dry_run="All"
        )
    assert err.value.status == 422
    assert "maxClientsPerSeed must be 1" in json.loads(err.value.body)["message"]


def test_hpa_example_scales_its_model_replica_set(tools, api_client, crd, namespace):
    hpa = _load(tools, "hpa.yaml")
    target = _load(tools, "sglang-transfer-engine.yaml")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (api.API_VERSION, api.KIND, target["metadata"]["name"])
    custom = _custom(api_client)
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, target)
    created = client.AutoscalingV2Api(api_client).create_namespaced_horizontal_pod_autoscaler(namespace, hpa)
    assert created.spec.max_replicas == hpa["spec"]["maxReplicas"]
    # What the HPA controller does through the scale subresource: read the selector the operator
    # publishes in status, then write the replica count.
    name = ref["name"]
    custom.patch_namespaced_custom_object_status(
        api.GROUP,
        api.VERSION,
        namespace,
        api.PLURAL,
        name,
        {"status": {"replicas": 2, "selector": "seedfork.io/set=" + name}},
    )
    scale = custom.get_namespaced_custom_object_scale(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    assert scale["status"] == {"replicas": 2, "selector": "seedfork.io/set=" + name}
    custom.patch_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"spec": {"replicas": hpa["spec"]["maxReplicas"]}}
    )
    got = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
    assert got["spec"]["replicas"] == hpa["spec"]["maxReplicas"]


def test_keda_scaled_object_targets_a_scalable_model_replica_set(tools, api_client, crd, namespace):
    scaled = _load(tools, "keda-scaledobject.yaml")
    ref = scaled["spec"]["scaleTargetRef"]
    target = _load(tools, "sglang-nccl.yaml")
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (api.API_VERSION, api.KIND, target["metadata"]["name"])
    # KEDA's only requirement on a custom target is the /scale subresource.
    custom = _custom(api_client)
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, target)
    scale = custom.get_namespaced_custom_object_scale(api.GROUP, api.VERSION, namespace, api.PLURAL, ref["name"])
    assert scale["spec"]["replicas"] == target["spec"]["replicas"]
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_all_examples_pass_kubeconform_strict(tools, kubeconform_bin, schema_dir):
    text = "\n---\n".join(
        (tools.EXAMPLES / n).read_text() for n in sorted(p.name for p in tools.EXAMPLES.glob("*.yaml"))
    )
    proc = tools.kubeconform(kubeconform_bin, schema_dir, text)
    summary = json.loads(proc.stdout)["summary"]
    assert proc.returncode == 0, proc.stdout
    assert summary == {"valid": 6, "invalid": 0, "errors": 0, "skipped": 0}
    # Negative controls: a misspelt field in the ScaledObject, an unknown field in a set.
    for good, bad in (("minReplicaCount:", "minReplicas:"), ("    maxClientsPerSeed: 1", "    maxClientPerSeed: 1")):
        proc = tools.kubeconform(kubeconform_bin, schema_dir, text.replace(good, bad, 1))
        assert proc.returncode != 0 and json.loads(proc.stdout)["summary"]["invalid"] == 1, bad


@pytest.mark.parametrize("name", ["sglang-transfer-engine.yaml", "sglang-nccl.yaml"])
def test_sglang_example_renders_a_pod_whose_agent_accepts_the_engine_command(tools, name):
    """The operator wraps the example's engine command; the agent must then render R-Fork flags from it for a
    storage seed and for a seed client (a --host the agent does not own, say, would fail every pod)."""
    from seedfork_agent.engines.sglang import render_for_pod
    from seedfork_api import contract as c
    from seedfork_operator.render import render_pod

    body = _load(tools, name)
    spec = api.ModelReplicaSetSpec.model_validate(body["spec"])
    pod = render_pod(
        spec=spec, set_name=body["metadata"]["name"], set_uid="u", namespace="ns", pod_name="p-0",
        fingerprint=spec.fingerprint(), assignment=c.Assignment(attempt=1, source="storage"), token_secret="t",
        agent_image="agent:1",
    )  # fmt: skip
    (engine, *others) = pod["spec"]["containers"]
    assert not [ct for ct in others if ct["name"] == "seedfork-agent"]  # no byte-moving sidecar
    assert engine["command"][:3] == ["seedfork-agent", "run", "--"] and "args" not in engine
    env = {e["name"]: e.get("value", "x") for e in engine["env"]} | {c.ENV_POD_IP: "10.0.0.2", c.ENV_TOKEN: "t"}
    pod_env = c.PodEnv.from_environ(env)
    backend = spec.transfer.backend
    ports = list(range(spec.transfer.ports.start, spec.transfer.ports.start + spec.engine.parallelism.tp))
    client = c.Assignment(attempt=1, source="seed", backend=backend, seedIP="10.0.0.1", groupPorts=ports)
    for assignment in (c.Assignment(attempt=1, source="storage"), client):
        launch = render_for_pod(engine["command"][3:], pod_env, assignment)
        argv = launch.argv
        assert argv[argv.index("--host") + 1] == "10.0.0.2" and argv[argv.index("--port") + 1] == str(spec.engine.port)


# Run in vLLM's own environment: parse the engine command with vLLM's own `vllm serve` parser, load vLLM's
# plugins as its processes do, and look the load format up in vLLM's own loader registry.
_VLLM_PARSE = """
import json, sys
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.model_executor.model_loader import get_model_loader
from vllm.config.load import LoadConfig
from vllm.plugins import load_general_plugins
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = ServeSubcommand().subparser_init(FlexibleArgumentParser().add_subparsers())
args = parser.parse_args(json.loads(sys.argv[1]))
load_general_plugins()
loader = get_model_loader(LoadConfig(load_format=args.load_format))
print(json.dumps({"model": args.model_tag or args.model, "load_format": args.load_format,
                  "tp": args.tensor_parallel_size, "host": args.host, "port": args.port,
                  "loader": type(loader).__module__ + "." + type(loader).__name__, "middleware": args.middleware}))
"""


@pytest.mark.vllm
def test_vllm_example_renders_an_engine_command_vllm_parses_with_seedforks_loader(tools):
    """The operator's rendering of examples/vllm.yaml, read by the vLLM release the README supports: every flag
    known to vLLM's parser, and --load-format resolving to seedfork's loader through vLLM's plugin mechanism."""
    from seedfork_api import contract as c
    from seedfork_localdev import vllm
    from seedfork_operator.render import render_pod

    body = _load(tools, "vllm.yaml")
    assert body["spec"]["engine"]["version"] == vllm.VERSION
    assert body["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f"{vllm.IMAGE}:{vllm.VERSION}")
    spec = api.ModelReplicaSetSpec.model_validate(body["spec"])
    pod = render_pod(
        spec=spec, set_name="v", set_uid="u", namespace="ns", pod_name="v-0", fingerprint=spec.fingerprint(),
        assignment=c.Assignment(attempt=1, source="storage"), token_secret="t", agent_image="agent:1",
    )  # fmt: skip
    engine = pod["spec"]["containers"][0]
    words = [*engine["command"], *engine.get("args", [])]
    assert words[:2] == ["vllm", "serve"]
    argv = [w.replace("$(SEEDFORK_POD_IP)", "10.0.0.2") for w in words[2:]]
    got = vllm.run_script(_VLLM_PARSE, json.dumps(argv))  # a missing vLLM environment fails, never skips
    assert got == {
        "model": "/models/Qwen2.5-32B-Instruct",
        "load_format": "seedfork",
        "tp": 2,
        "host": "10.0.0.2",
        "port": 8000,
        "loader": "seedfork_agent.engines.vllm_loader.SeedforkModelLoader",
        "middleware": ["seedfork_agent.engines.vllm_guard.guard"],
    }
