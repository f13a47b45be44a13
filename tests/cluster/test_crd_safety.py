"""Admission refuses what would break a live set later: long names, null replicas, a reference engine with
more than one rank, port changes under running pods. Real kube-apiserver, the generated CRD."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from seedfork_api import spec as api

pytestmark = pytest.mark.cluster


def body(name: str = "safe", **spec) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "model": {"name": "m/tiny", "uri": "/models/tiny"},
            "engine": {"kind": "reference"},
            **spec,
        },
    }


def objects(api_client) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def create(api_client, namespace, b):
    return objects(api_client).create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, b)


def patch(api_client, namespace, name, p):
    return objects(api_client).patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name, p)


def refused(fn) -> str:
    with pytest.raises(ApiException) as err:
        fn()
    assert err.value.status == 422, err.value.body
    return err.value.body


def test_set_names_longer_than_a_label_value_are_refused(api_client, crd, namespace):
    message = refused(lambda: create(api_client, namespace, body("x" * 64)))
    assert "metadata.name must be at most 63 characters" in message
    create(api_client, namespace, body("x" * 63))  # the longest that fits a label value


def test_null_replicas_are_refused_not_defaulted(api_client, crd, namespace):
    omitted = body("omitted")
    del omitted["spec"]["replicas"]
    for name, b in (("omitted", omitted), ("null", body("null", replicas=None))):
        message = refused(lambda b=b: create(api_client, namespace, b))
        assert "spec.replicas: Required value" in message, name
    create(api_client, namespace, body("eight", replicas=8))
    # a merge patch with null removes the field: it must not fall back to a default of 1
    message = refused(lambda: patch(api_client, namespace, "eight", {"spec": {"replicas": None}}))
    assert "spec.replicas: Required value" in message
    assert (
        objects(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "eight")[
            "spec"
        ]["replicas"]
        == 8
    )


@pytest.mark.parametrize("parallelism", [{"tp": 2}, {"pp": 2}])
def test_reference_engine_serves_one_rank(api_client, crd, namespace, parallelism):
    b = body("ranks")
    b["spec"]["engine"]["parallelism"] = parallelism
    message = refused(lambda: create(api_client, namespace, b))
    assert "tp and pp must be 1 for engine reference" in message


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"engine": {"port": 31000}}, "engine.port is immutable"),
        ({"transfer": {"agentPort": 19090}}, "transfer.agentPort is immutable"),
    ],
)
def test_ports_of_a_live_set_are_immutable(api_client, crd, namespace, change, complaint):
    create(api_client, namespace, body("ports"))
    message = refused(lambda: patch(api_client, namespace, "ports", {"spec": change}))
    assert complaint in message
