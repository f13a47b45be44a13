"""Shared fixtures: one real control plane per test session, a fresh namespace per test."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "seedfork.io_modelreplicasets.yaml"
_STARTED: list[str] = []


@pytest.fixture(scope="session")
def control_plane():
    """etcd + kube-apiserver on loopback, built from the Go module proxy and cached."""
    from seedfork_localdev.controlplane import ControlPlane

    with ControlPlane() as cp:
        _STARTED.append(f"kube-apiserver {cp.version()} (real, local) at {cp.url}")
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        yield cp


@pytest.fixture(scope="session")
def api_client(control_plane):
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def crd(api_client):
    """The ModelReplicaSet CRD, installed and Established."""
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)
    body = yaml.safe_load(CRD_FILE.read_text())
    ext.create_custom_resource_definition(body)
    name = body["metadata"]["name"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in (got.status.conditions or [])}
        if conditions.get("Established") == "True":
            # The discovery/OpenAPI caches settle slightly after Established.
            time.sleep(0.5)
            return got
        time.sleep(0.2)
    raise TimeoutError(f"CRD {name} not Established: {conditions}")


@pytest.fixture
def namespace(api_client) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    # No namespace controller runs locally, so the namespace would stay Terminating;
    # tests use fresh names and the whole control plane goes at session end.


# ---- vLLM (the `vllm` tier): its own environment, built by scripts/setup_vllm.sh and cached ----
# A test that asks for vLLM fails without it, never skips: a missing environment is a broken setup.


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The interpreter of vLLM's environment."""
    from seedfork_localdev import vllm

    try:
        return vllm.python()
    except vllm.VllmUnavailable as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def vllm_images() -> dict[str, dict[str, str]]:
    """vLLM's environment as the pod runner's stand-in for seedfork's vLLM image."""
    from seedfork_localdev import vllm

    try:
        return vllm.image_env()
    except vllm.VllmUnavailable as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory) -> Path:
    """The deterministic test model in the shape vLLM's CPU build runs (``vllm-tiny``)."""
    from seedfork_agent.engines.testmodel import make_model

    return make_model(tmp_path_factory.mktemp("vllm-tiny") / "model", "vllm-tiny")


def pytest_terminal_summary(terminalreporter):
    for line in _STARTED:
        terminalreporter.write_line(line)
