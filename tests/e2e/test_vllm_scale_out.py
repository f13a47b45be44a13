"""A ModelReplicaSet of real vLLM on the real apiserver: the operator, the pod runner, real agents, and vLLM's
own CPU build from its environment (the pod runner stands it in for seedfork's vLLM image).

1 -> 3: the first replica loads from storage, the others from seeds, and every replica generates the greedy
tokens of a vLLM that read the checkpoint itself. Then every seed's store is corrupted and the set scales to
4: the new pod's pulls fail their checksums, the seeds it caught take themselves out and are replaced, and no pod
is ever made Ready on bad weights.
"""

from __future__ import annotations

import pytest

from seedfork_api.contract import ERR_SELF_CHECK_FAILED
from seedfork_localdev import vllm
from seedfork_localdev.cluster import LocalCluster, install_agent_rbac, new_namespace
from seedfork_localdev.pods import PodTracker, corrupt_store
from seedfork_localdev.referenceset import ReferenceSet

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.timeout(1500)]
READY_S = 600  # vLLM starts in 18-40 s on an idle core; three at once on two busy cores take minutes


def test_vllm_set_scales_from_storage_to_seeds_and_never_serves_bad_weights(
    api_client, control_plane, crd, tmp_path, vllm_images, vllm_model
):
    namespace = new_namespace(api_client, "vllm")
    install_agent_rbac(api_client, namespace)
    with (
        LocalCluster(control_plane.kubeconfig, namespace, tmp_path / "cluster", images=vllm_images) as cluster,
        PodTracker(api_client, namespace, "tiny") as tracker,
    ):
        rset = ReferenceSet(api_client, namespace, "tiny")
        try:
            # vLLM reading the checkpoint itself, on its own address: the tokens every replica must generate.
            reference = vllm.Server(vllm_model, "127.0.0.1", 8011, tmp_path / "reference-vllm.log", "auto")
            try:
                rset.create(vllm.set_body("tiny", vllm_model, replicas=1))
                reference.wait_healthy(READY_S)
                want = vllm.greedy_tokens(reference.url)
            finally:
                reference.stop()
            (first,) = rset.wait_ready(1, READY_S)
            assert first.report["source"] == "storage"

            rset.scale(3)
            rows = rset.wait_ready(3, READY_S)
            seeded = [r for r in rows if r.name != first.name]
            assert all(r.report["source"] == "seed" for r in seeded), [r.report for r in seeded]
            for r in rows:
                assert vllm.greedy_tokens(f"http://{r.ip}:30000") == want, r.name

            token = rset.token()
            for r in rows:
                corrupt_store(f"http://{r.ip}:18080", token)
            corrupted = {tracker.uids[r.name] for r in rows}
            rset.scale(4)
            rows = rset.wait_ready(4, READY_S)
            (new,) = [r for r in rows if r.name not in {s.name for s in [first, *seeded]}]
            attempts = [state for _, state, _ in tracker.history[new.name]]
            assert "failed" in attempts, tracker.history[new.name]  # its pulls from corrupted seeds were refused
            # The seeds it caught with bad bytes checked their own stores and were replaced (a replacement reuses
            # its slot's name); the new pod ended on storage or on such a replacement, with the right weights.
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
