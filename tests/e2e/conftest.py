"""End-to-end fixtures: the session's real control plane, the local pod runner (pods are real processes on
their own 127.0.0.x address) and the operator as its own process, one namespace per scenario.

Nothing is mocked: the engine is seedfork's reference engine (a real Llama-architecture model, the tiny
deterministic test model), the agent moves the bytes over the real TransferEngine (TCP) or real
torch.distributed (gloo on CPU).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from seedfork_localdev.cluster import LocalCluster, install_agent_rbac, new_namespace
from seedfork_localdev.pods import PodTracker
from seedfork_localdev.referenceset import ReferenceSet
from seedfork_localdev.scenario import make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The reference engine's tiny deterministic model (~0.5 MB), made with its own make-model command."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@dataclass
class Scenario:
    cluster: LocalCluster
    rset: ReferenceSet
    tracker: PodTracker

    @property
    def namespace(self) -> str:
        return self.cluster.namespace

    def diagnose(self) -> str:
        """The set, its pods, and the tail of the operator's and each container's log."""
        parts = [self.rset.describe(), "--- operator log ---", self.cluster.operator.tail(4000)]
        for row in self.rset.rows():
            for container in ("seedfork-agent", "engine"):
                parts += [f"--- {row.name}/{container} ---", self.cluster.pod_log(row.name, container)[-2500:]]
        return "\n".join(parts)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the test item, so a fixture can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def scenario(request, api_client, control_plane, crd, tmp_path) -> Iterator[Scenario]:
    """A fresh namespace with the agent's ServiceAccount, the pod runner, the operator process and a
    watcher on the pods of the set ``llama``. On failure the pods' and the operator's logs are printed."""
    namespace = new_namespace(api_client, "e2e")
    install_agent_rbac(api_client, namespace)
    workdir = tmp_path / "cluster"
    with (
        LocalCluster(control_plane.kubeconfig, namespace, workdir) as cluster,
        PodTracker(api_client, namespace, "llama") as tracker,
    ):
        s = Scenario(cluster, ReferenceSet(api_client, namespace, "llama"), tracker)
        yield s
        call = getattr(request.node, "report_call", None)
        failed = call is None or call.failed
        if failed:
            with contextlib.suppress(Exception):
                print(s.diagnose())  # shown with the failing test's captured output
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
