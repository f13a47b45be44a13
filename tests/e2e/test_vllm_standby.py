"""A warm vLLM standby promoted on the real apiserver: the operator, the pod runner, real agents, vLLM's CPU build.

The standby's vLLM starts, warms up and answers /health without weights; its API refuses requests meanwhile
(seedfork's guard in vLLM's own middleware). On scale-up the operator promotes it: its agent pulls the seed's
engine-layout store, the same running vLLM makes its parameters views of it and proves them rank by rank, and
only then is the pod Ready, generating the seed's tokens, holding the weights once. A new standby refills.
"""

from __future__ import annotations

import time

import httpx
import pytest

from seedfork_localdev import vllm
from seedfork_localdev.cluster import LocalCluster, install_agent_rbac, new_namespace
from seedfork_localdev.pods import PodTracker
from seedfork_localdev.referenceset import ReferenceSet

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1500)]
READY_S = 600  # vLLM starts in 18-40 s on an idle core; two at once on two busy cores take minutes


def _restarts(api_client, namespace: str, pod: str) -> dict[str, int]:
    from kubernetes import client

    status = client.CoreV1Api(api_client).read_namespaced_pod(pod, namespace).status
    return {c.name: c.restart_count for c in status.container_statuses or []}


def test_a_warm_vllm_standby_is_promoted_in_its_running_engine(
    api_client, control_plane, crd, tmp_path, vllm_images, vllm_model
):
    namespace = new_namespace(api_client, "vllm-standby")
    install_agent_rbac(api_client, namespace)
    with (
        LocalCluster(control_plane.kubeconfig, namespace, tmp_path / "cluster", images=vllm_images) as cluster,
        PodTracker(api_client, namespace, "warm") as tracker,
    ):
        rset = ReferenceSet(api_client, namespace, "warm")
        try:
            rset.create(vllm.set_body("warm", vllm_model, replicas=1, standby=1))
            (seed,) = rset.wait_ready(1, READY_S, standby=1)
            (spare,) = [r for r in rset.rows() if r.standby and not r.deleting]
            engine = f"http://{spare.ip}:30000"
            assert httpx.get(f"{engine}/health", timeout=10).status_code == 200  # warm
            r = httpx.post(f"{engine}/v1/completions", json={"model": vllm.SERVED_NAME, "prompt": "w1"}, timeout=30)
            assert r.status_code == 503, r.text  # no request reaches placeholder weights
            assert not spare.ready
            want = vllm.greedy_tokens(f"http://{seed.ip}:30000")
            restarts = _restarts(api_client, namespace, spare.name)

            t0 = time.monotonic()
            rset.scale(2)
            rows = rset.wait_ready(2, READY_S)
            promote_s = time.monotonic() - t0
            promoted = next(r for r in rows if r.name == spare.name)
            assert promoted.report["source"] == "seed" and promoted.report["seedPod"] == seed.name
            assert _restarts(api_client, namespace, spare.name) == restarts  # the same vLLM took the weights
            assert vllm.greedy_tokens(engine) == want
            token = rset.token()
            auth = {"Authorization": f"Bearer {token}"}
            mine = httpx.get(f"http://{spare.ip}:18080/v1/engine", headers=auth, timeout=10).json()
            theirs = httpx.get(f"http://{seed.ip}:18080/v1/engine", headers=auth, timeout=10).json()
            assert mine["ranks"] == theirs["ranks"] and set(mine["privateBytes"].values()) == {0}
            assert tracker.violations == []
            print(f"scale request -> promoted vLLM standby Ready: {promote_s:.1f} s")
            rset.wait_ready(2, READY_S, standby=1)  # refilled with a new warm standby
        except BaseException:
            print(rset.describe())
            for r in rset.rows():
                for container in ("seedfork-agent", "engine"):
                    print(f"--- {r.name}/{container} ---\n{cluster.pod_log(r.name, container)[-3000:]}")
            print(f"--- operator ---\n{cluster.operator.tail(3000)}")
            raise
