"""A warm vLLM standby promoted on the real apiserver: the operator, the pod runner, real agents, vLLM's CPU build.

The standby's vLLM starts, warms up and answers /health without weights; its API refuses requests meanwhile
(seedfork's guard in vLLM's own middleware). On scale-up the operator promotes it: its agent pulls the seed's
engine-layout store, the same running vLLM makes its parameters views of it and proves them rank by rank, and
only then is the pod Ready, generating the seed's tokens, holding the weights once. A new standby refills.

Then the faults against a promoted standby: every seed's store goes bad in memory and the set scales once more.
The refilled standby is promoted, and its pull from a corrupted seed fails its checksums. Its vLLM answers no
request from weights it did not prove, and is not left wedged: the pod ends Ready with the right weights (its
engine restarted, or the pod replaced), and the seeds it caught take themselves out.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from seedfork_api.contract import ERR_SELF_CHECK_FAILED
from seedfork_localdev import vllm
from seedfork_localdev.cluster import LocalCluster, install_agent_rbac, new_namespace
from seedfork_localdev.pods import PodTracker, corrupt_store
from seedfork_localdev.referenceset import ReferenceSet

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1500)]
READY_S = 600  # vLLM starts in 18-40 s on an idle core; two at once on two busy cores take minutes


def _restarts(api_client, namespace: str, pod: str) -> dict[str, int]:
    from kubernetes import client

    status = client.CoreV1Api(api_client).read_namespaced_pod(pod, namespace).status
    return {c.name: c.restart_count for c in status.container_statuses or []}


class Answers(threading.Thread):
    """Asks one engine for a greedy completion every 0.3 s until stopped; keeps what each answer was, and the
    report states its pod went through (a replacement under the same name starts a new history)."""

    def __init__(self, engine: str, tracker: PodTracker, pod: str) -> None:
        super().__init__(daemon=True)
        self.engine, self.answered, self.refused = engine, [], 0
        self.tracker, self.pod, self.states = tracker, pod, set()
        self._stop_asking = threading.Event()

    def run(self) -> None:
        while not self._stop_asking.wait(0.3):
            self.states |= {state for _, state, _ in self.tracker.history.get(self.pod, [])}
            try:
                self.answered.append(vllm.greedy_tokens(self.engine, timeout=10))
            except httpx.HTTPStatusError as e:
                self.refused += e.response.status_code == 503
            except (httpx.HTTPError, AssertionError):
                pass  # not listening (its engine restarting, the pod gone)

    def stop(self) -> None:
        self._stop_asking.set()
        self.join(30)


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
            rows = rset.wait_ready(2, READY_S, standby=1)  # refilled with a new warm standby

            (spare,) = [r for r in rset.rows() if r.standby and not r.deleting]
            for r in rows:
                corrupt_store(f"http://{r.ip}:18080", token)
            corrupted = {tracker.uids[r.name] for r in rows}
            answers = Answers(f"http://{spare.ip}:30000", tracker, spare.name)
            answers.start()
            try:
                rset.scale(3)
                rows = rset.wait_ready(3, READY_S)
            finally:
                answers.stop()
            assert "failed" in answers.states, answers.states  # its pull from a corrupted seed was refused
            assert answers.refused > 0  # it was asked while it had no proven weights, and refused
            assert all(tokens == want for tokens in answers.answered), answers.answered
            assert corrupted - {tracker.uids[r.name] for r in rows}, "no corrupted seed was taken out"
            for r in rows:
                if tracker.uids[r.name] not in corrupted:
                    assert vllm.greedy_tokens(f"http://{r.ip}:30000") == want, r.name
            # Only a seed between its failed self-check and its gate being cleared was Ready on bad bytes (they
            # went bad in memory after they were verified).
            assert all(ERR_SELF_CHECK_FAILED in v for v in tracker.violations), tracker.violations
        except BaseException:
            print(rset.describe())
            for r in rset.rows():
                for container in ("seedfork-agent", "engine"):
                    print(f"--- {r.name}/{container} ---\n{cluster.pod_log(r.name, container)[-3000:]}")
            print(f"--- operator ---\n{cluster.operator.tail(3000)}")
            raise
