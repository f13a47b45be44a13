"""The ModelReplicaSet CRD on a real kube-apiserver: schema, defaults, CEL rules, subresources."""

from __future__ import annotations

import copy
import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from seedfork_api import spec as api

pytestmark = pytest.mark.cluster


def valid_body(name: str = "llama") -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "uri": "/models/llama"},
            "engine": {"kind": "reference"},
        },
    }


def create(api_client, namespace: str, body: dict) -> dict:
    return client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, body
    )


def test_valid_set_is_accepted_with_defaults(api_client, crd, namespace):
    created = create(api_client, namespace, valid_body())
    spec = created["spec"]
    assert spec["replicas"] == 1
    assert spec["model"]["revision"] == "main"
    assert spec["model"]["dtype"] == "bfloat16"
    assert spec["engine"]["parallelism"] == {"tp": 1, "pp": 1}
    assert spec["engine"]["port"] == 30000
    # Ports are per set and defaulted here; the policy fields stay unset for the operator to resolve
    # (the cluster's transferDefaults, else the built-in values).
    assert spec["transfer"] == {"agentPort": 18080, "ports": {"start": 28000, "end": 28099}}
    resolved = api.resolve_transfer(api.TransferSpec.model_validate(spec["transfer"]), None, "vllm")
    assert (resolved.backend, resolved.max_clients_per_seed, resolved.fallback) == ("auto", 4, "storage")
    assert resolved.topology_keys == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]


def test_apiserver_defaults_equal_model_defaults(api_client, crd, namespace):
    """One source of truth: what the apiserver fills in is what the pydantic model fills in."""
    body = valid_body("same-defaults")
    created = create(api_client, namespace, body)
    from_model = api.ModelReplicaSetSpec.model_validate(body["spec"]).to_api()
    admitted = copy.deepcopy(from_model)
    for field in api.TransferSpec.CLUSTER_DEFAULTED:  # left to the operator, not the apiserver
        admitted["transfer"].pop(api.TransferSpec.model_fields[field].alias, None)
    assert created["spec"] == admitted
    # and the stored object parses back into the model with the built-in defaults
    assert api.ModelReplicaSet.model_validate(created).spec.to_api() == from_model


def _set(body: dict, path: str, value) -> dict:
    out = copy.deepcopy(body)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return out


_DELETE = object()

# (description, path to change, new value, text the error must contain)
INVALID = [
    ("negative replicas", "spec.replicas", -1, "spec.replicas"),
    ("missing model", "spec.model", _DELETE, "spec.model"),
    ("empty model name", "spec.model.name", "", "spec.model.name"),
    ("unknown engine", "spec.engine.kind", "tgi", "spec.engine.kind"),
    ("unknown backend", "spec.transfer.backend", "carrier-pigeon", "spec.transfer.backend"),
    ("unknown fallback", "spec.transfer.fallback", "retry-forever", "spec.transfer.fallback"),
    ("unknown dtype", "spec.model.dtype", "int3", "spec.model.dtype"),
    ("tp zero", "spec.engine.parallelism.tp", 0, "spec.engine.parallelism.tp"),
    ("port below 1024", "spec.transfer.agentPort", 80, "spec.transfer.agentPort"),
    ("zero clients per seed", "spec.transfer.maxClientsPerSeed", 0, "spec.transfer.maxClientsPerSeed"),
    ("zero timeout", "spec.transfer.timeoutSeconds", 0, "spec.transfer.timeoutSeconds"),
    ("no storage loads", "spec.transfer.maxConcurrentStorageLoads", 0, "spec.transfer.maxConcurrentStorageLoads"),
    (
        "storage loads above 1000",
        "spec.transfer.maxConcurrentStorageLoads",
        1001,
        "spec.transfer.maxConcurrentStorageLoads",
    ),
    ("bad token secret name", "spec.transfer.tokenSecretName", "Not_A_Name", "spec.transfer.tokenSecretName"),
    ("reversed port range", "spec.transfer.ports", {"start": 41000, "end": 40000}, "ports.end must not be below"),
    ("reference engine without uri", "spec.model.uri", _DELETE, "model.uri is required"),
    ("negative standby", "spec.standby", -1, "spec.standby"),
    ("standby above its maximum", "spec.standby", api.MAX_STANDBY + 1, "spec.standby"),
    ("standby not a number", "spec.standby", "two", "spec.standby"),
]


def _sglang(backend: str, **transfer) -> dict:
    body = valid_body()
    body["spec"]["engine"] = {"kind": "sglang", "parallelism": {"tp": 2, "pp": 1}}
    body["spec"]["transfer"] = {"backend": backend, **transfer}
    return body


CEL_INVALID = [
    (
        "sglang + transfer_engine + pp 2",
        _set(_sglang("transfer_engine"), "spec.engine.parallelism", {"tp": 2, "pp": 2}),
        "spec.engine.parallelism.pp",
        "pp must be 1 for engine sglang with backend transfer_engine",
    ),
    (
        "sglang + nccl + 4 clients per seed",
        _sglang("nccl", maxClientsPerSeed=4),
        "spec.transfer.maxClientsPerSeed",
        "maxClientsPerSeed must be 1",
    ),
    (
        "port range smaller than tp",
        _set(_sglang("transfer_engine", ports={"start": 40000, "end": 40000}), "spec.engine.parallelism.tp", 4),
        "spec.transfer.ports",
        "at least one port per rank",
    ),
    (
        "port range without TransferEngine's four ports",
        _set(valid_body(), "spec.transfer.ports", {"start": 28000, "end": 28003}),
        "spec.transfer.ports",
        "plus four per rank for TransferEngine",
    ),
    (
        "agent port inside the group port range",
        _set(valid_body(), "spec.transfer", {"agentPort": api.PortRange().start + 10}),
        "spec.transfer.agentPort",
        "must lie outside transfer.ports",
    ),
    (
        "standby for engine sglang",
        _set(_sglang("nccl", maxClientsPerSeed=1), "spec.standby", 2),
        "spec.standby",
        "spec.standby must be 0 for engine sglang: standby replicas are built for engine reference and vllm only",
    ),
    (
        "engine port equals agent port",
        _set(valid_body(), "spec.engine.port", 18080),
        "spec.engine.port",
        "must differ",
    ),
]


@pytest.mark.parametrize(("what", "path", "value", "expect"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_field_is_rejected_with_its_name(api_client, crd, namespace, what, path, value, expect):
    body = _set(valid_body(), path, value)
    with pytest.raises(ApiException) as err:
        create(api_client, namespace, body)
    assert err.value.status == 422, err.value.body
    message = json.loads(err.value.body)["message"]
    assert expect in message, message


@pytest.mark.parametrize(("what", "body", "field", "expect"), CEL_INVALID, ids=[c[0] for c in CEL_INVALID])
def test_cross_field_rules_reject_with_a_clear_message(api_client, crd, namespace, what, body, field, expect):
    with pytest.raises(ApiException) as err:
        create(api_client, namespace, body)
    assert err.value.status == 422, err.value.body
    message = json.loads(err.value.body)["message"]
    assert field in message and expect in message, message


def test_valid_sglang_layouts_pass_the_cel_rules(api_client, crd, namespace):
    ok = create(api_client, namespace, _set(_sglang("nccl", maxClientsPerSeed=1), "metadata.name", "sg-nccl"))
    assert ok["spec"]["transfer"]["maxClientsPerSeed"] == 1
    ok = create(api_client, namespace, _set(_sglang("transfer_engine"), "metadata.name", "sg-te"))
    assert ok["spec"]["transfer"]["backend"] == "transfer_engine"


def test_standby_is_accepted_for_the_reference_engine_and_vllm_and_refused_later_for_sglang(
    api_client, crd, namespace
):
    ok = create(api_client, namespace, _set(valid_body("warm"), "spec.standby", 2))
    assert ok["spec"]["standby"] == 2
    vllm = _set(_set(valid_body("warm-vllm"), "spec.engine", {"kind": "vllm"}), "spec.standby", 1)
    assert create(api_client, namespace, vllm)["spec"]["standby"] == 1
    plain = create(api_client, namespace, _set(_sglang("nccl", maxClientsPerSeed=1), "metadata.name", "cold"))
    assert plain["spec"]["standby"] == 0  # the admission default
    objs = client.CustomObjectsApi(api_client)
    with pytest.raises(ApiException) as err:  # an update is checked as a create is
        objs.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, "cold", {"spec": {"standby": 1}}
        )
    assert err.value.status == 422
    message = json.loads(err.value.body)["message"]
    assert "spec.standby" in message and "engine sglang" in message, message


def test_model_identity_is_immutable(api_client, crd, namespace):
    create(api_client, namespace, valid_body("fixed"))
    objs = client.CustomObjectsApi(api_client)
    with pytest.raises(ApiException) as err:
        objs.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, "fixed", {"spec": {"model": {"revision": "v2"}}}
        )
    assert err.value.status == 422
    assert "model identity" in json.loads(err.value.body)["message"]
    # replicas stay mutable
    patched = objs.patch_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "fixed", {"spec": {"replicas": 3}}
    )
    assert patched["spec"]["replicas"] == 3


def test_scale_subresource_reads_and_writes_replicas(api_client, crd, namespace):
    """What `kubectl scale`, an HPA and KEDA use."""
    objs = client.CustomObjectsApi(api_client)
    create(api_client, namespace, valid_body("scaled"))
    status = {"replicas": 1, "selector": "seedfork.io/set=scaled"}
    objs.patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "scaled", {"status": status}
    )
    scale = objs.get_namespaced_custom_object_scale(api.GROUP, api.VERSION, namespace, api.PLURAL, "scaled")
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 1
    assert scale["status"] == {"replicas": 1, "selector": "seedfork.io/set=scaled"}

    objs.patch_namespaced_custom_object_scale(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "scaled", {"spec": {"replicas": 4}}
    )
    got = objs.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "scaled")
    assert got["spec"]["replicas"] == 4

    with pytest.raises(ApiException) as err:
        objs.patch_namespaced_custom_object_scale(
            api.GROUP, api.VERSION, namespace, api.PLURAL, "scaled", {"spec": {"replicas": -2}}
        )
    assert err.value.status == 422


def test_status_cannot_be_written_through_the_main_resource(api_client, crd, namespace):
    objs = client.CustomObjectsApi(api_client)
    create(api_client, namespace, valid_body("guarded"))
    objs.patch_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "guarded", {"status": {"readyReplicas": 7}}
    )
    got = objs.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "guarded")
    assert got.get("status", {}).get("readyReplicas") in (None, 0)
    objs.patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "guarded", {"status": {"readyReplicas": 7}}
    )
    got = objs.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "guarded")
    assert got["status"]["readyReplicas"] == 7


def test_printer_columns_are_served(api_client, crd, namespace):
    create(api_client, namespace, valid_body("columns"))
    path = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{namespace}/{api.PLURAL}"
    headers = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    api_client.update_params_for_auth(headers, [], ["BearerToken"], path, "GET", None)
    resp = api_client.call_api("GET", api_client.configuration.host + path, header_params=headers)
    table = json.loads(resp.read())
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:6] == ["Name", "Desired", "Ready", "Seeds", "Standby", "Backend"]
    assert "Age" in names
    row = next(r for r in table["rows"] if r["object"]["metadata"]["name"] == "columns")
    assert row["cells"][names.index("Standby")] is None  # status.standbyWarm, unset until the operator writes it
