"""The operator's writes against the real apiserver: done without decoding the answers, errors still raised."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from seedfork_operator.kubeapi import Kube, api_message


@pytest.fixture
def kube(control_plane):
    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    api.configuration.connection_pool_maxsize = 1
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 1
    api.rest_client.pool_manager.connection_pool_kw["block"] = True  # a connection never released would hang
    decoded: list[str] = []
    real = api.response_deserialize

    def counting(*args, **kwargs):
        decoded.append("answer")
        return real(*args, **kwargs)

    api.response_deserialize = counting
    yield Kube(api, timeout=10), decoded
    api.close()


def pod(name: str) -> dict:
    return {
        "metadata": {"name": name, "labels": {"app": "w"}},
        "spec": {"containers": [{"name": "c", "image": "x"}], "readinessGates": [{"conditionType": "x.io/ok"}]},
    }


def test_writes_land_without_decoding_their_answers_and_refusals_still_raise(kube, namespace, api_client):
    k, decoded = kube
    core = client.CoreV1Api(api_client)

    async def writes() -> None:
        for i in range(3):  # more writes than the pool's one blocking connection: each is released
            await k.create_pod(namespace, pod(f"p{i}"))
        await k.patch_pod(namespace, "p0", {"metadata": {"labels": {"seen": "yes"}}})
        condition = {"type": "x.io/ok", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        assert await k.set_pod_condition(namespace, "p0", condition) is True
        assert await k.set_pod_condition(namespace, "gone", condition) is False  # 404: the pod is gone
        await k.create_secret(namespace, {"metadata": {"name": "s"}, "stringData": {"token": "a"}})
        await k.patch_secret(namespace, "s", {"stringData": {"token": "b"}})
        await k.delete_pod(namespace, "p1")
        await k.delete_pod(namespace, "p1")  # 404: gone already
        with pytest.raises(ApiException) as conflict:
            await k.create_pod(namespace, pod("p0"))
        assert conflict.value.status == 409 and "already exists" in api_message(conflict.value)  # what callers show
        with pytest.raises(ApiException) as missing:
            await k.patch_pod(namespace, "nobody", {"metadata": {"labels": {"a": "b"}}})
        assert missing.value.status == 404

    asyncio.run(asyncio.wait_for(writes(), 60))
    assert decoded == []  # nothing the operator wrote came back as models
    got = core.read_namespaced_pod("p0", namespace)
    assert got.metadata.labels["seen"] == "yes"
    assert {c.type: c.status for c in got.status.conditions or []}.get("x.io/ok") == "True"
    assert sorted(p.metadata.name for p in core.list_namespaced_pod(namespace).items) == ["p0", "p2"]
    assert core.read_namespaced_secret("s", namespace).data["token"] == "Yg=="  # base64 of "b"
