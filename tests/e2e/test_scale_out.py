"""End to end on the real apiserver: the operator process, the local pod runner, agents and reference engines
as real processes on 127.0.0.x, weights moved by the real TransferEngine (TCP) or torch.distributed (gloo).

Each test scales a ModelReplicaSet through the scale subresource, as ``kubectl scale`` or an HPA would,
and checks what a user relies on: every replica is Ready only after its agent verified the weights, the
new replicas got them from a seed (not storage), and all replicas generate the same text.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from seedfork_localdev.manifests import reference_set_body
from seedfork_localdev.scenario import ScaleOut, generate_all, make_model_like, model_bytes, scale_out
from seedfork_localdev.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

# Generous per-step limit: on a loaded 2-core machine every pod starts two Python processes that import torch.
STEP = 150.0


def watched_ready(s, name: str) -> dict[str, float] | None:
    """The milestones the pod watch saw for ``name``, once it has seen the pod Ready."""
    times = dict(s.tracker.times.get(name, {}))
    return times if "ready" in times else None


def assert_verified_everywhere(s, rows, nbytes: int) -> None:
    """Every pod's agent verified all bytes of the current attempt, and no pod was ever Ready before that."""
    assert s.tracker.violations == []
    for row in rows:
        assert row.ready and row.gate, row
        assert row.state == "verified", row.report
        assert row.bytes_done == row.bytes_total == nbytes, row.report
        assert row.timing.get("verified"), row.timing
        # The pod watch runs apart from the poll that found the pods Ready: let its Ready event arrive.
        seen = wait_until(lambda n=row.name: watched_ready(s, n), 10, f"the pod watch to see {row.name} Ready")
        assert seen["ready"] >= seen["verified"], seen
        assert seen["ready"] >= seen["gate"], seen


def assert_scaled_out(s, result: ScaleOut, nbytes: int, backend: str) -> None:
    rows = result.rows
    assert len(rows) == 4
    assert_verified_everywhere(s, rows, nbytes)
    storage = [r for r in rows if r.source == "storage"]
    seeded = [r for r in rows if r.source == "seed"]
    # The first replica loads from storage; the three added by the scale-out pull from a serving seed.
    assert len(storage) == 1 and len(seeded) == 3, [(r.name, r.source) for r in rows]
    names = {r.name for r in rows}
    for row in seeded:
        assert row.backend == backend
        assert row.report.get("source") == "seed"
        assert row.seed_pod in names and row.seed_pod != row.name
        # Time-to-Ready keeps moving and verifying apart: the last byte landed before the checksums were done.
        t = row.timing
        assert t["transferStart"] < t["transferEnd"] < t["verified"], t
    # Each engine attached to its agent's verified store (no copy, no read from storage) ...
    assert {name: info["mode"] for name, info in result.engines.items()} == dict.fromkeys(names, "attach")
    # ... and all four give the same greedy completion as the replica that loaded from storage.
    assert result.identical, result.outputs
    scale = s.rset.read_scale()
    assert scale["spec"]["replicas"] == 4
    wait_until(lambda: s.rset.status().get("readyReplicas") == 4, 30, "status.readyReplicas == 4")

    # Each pod's timing also records when its engine's API came up, after its weights were verified.
    def engines_up() -> list | None:
        rows = s.rset.rows()
        return rows if all(r.timing.get("engineReady") for r in rows) else None

    for row in wait_until(engines_up, 30, "every pod's timing to record engineReady", interval=0.5):
        assert row.timing["engineReady"] >= row.timing["verified"], row.timing


def test_transfer_engine_scale_out_1_to_4_then_down_to_2_keeps_a_seed(scenario, tiny_model):
    s = scenario
    body = reference_set_body("llama", tiny_model, backend="transfer_engine", replicas=1)
    result = scale_out(s.rset, s.tracker, body=body, replicas_to=4, timeout=STEP, cluster=s.cluster)
    assert_scaled_out(s, result, model_bytes(tiny_model), "transfer_engine")

    # Scale down 4 -> 2: two pods go, the two left are Ready seeds.
    s.rset.scale(2)
    rows = s.rset.wait_ready(2, STEP)
    kept = {r.name for r in rows}
    assert kept <= {r.name for r in result.rows}
    assert all(r.serving for r in rows), [r.report for r in rows]
    wait_until(lambda: s.rset.status().get("seeds", 0) >= 1, 30, "status.seeds >= 1")

    # The seeds kept are real: the next replica pulls from one of them, not from storage.
    s.rset.scale(3)
    rows = s.rset.wait_ready(3, STEP)
    (new,) = [r for r in rows if r.name not in kept]
    assert new.source == "seed" and new.seed_pod in kept, new.assignment
    assert_verified_everywhere(s, rows, model_bytes(tiny_model))
    assert len(set(generate_all(rows, s.rset.token()).values())) == 1


def test_nccl_cohort_scale_out_1_to_4(scenario, tiny_model):
    """backend nccl on CPU runs torch.distributed with gloo; the three new pods form one cohort on one seed."""
    s = scenario
    body = reference_set_body("llama", tiny_model, backend="nccl", replicas=1)
    result = scale_out(s.rset, s.tracker, body=body, replicas_to=4, timeout=STEP, cluster=s.cluster)
    assert_scaled_out(s, result, model_bytes(tiny_model), "nccl")

    cohorts = defaultdict(list)
    for row in result.rows:
        if row.source == "seed":
            cohorts[row.assignment.get("cohortId")].append(row.assignment)
    # Created in one pass, the three pulled in one broadcast: seed rank 0, clients ranks 1..3.
    assert list(cohorts) != [None], cohorts
    (members,) = cohorts.values()
    assert sorted(a["cohortRank"] for a in members) == [1, 2, 3]
    assert {a["cohortSize"] for a in members} == {4}
    assert len({a["seedPod"] for a in members}) == 1
    assert len({tuple(a["groupPorts"]) for a in members}) == 1


def test_seed_deleted_while_a_client_pulls(scenario, tmp_path):
    """The seed serving a pull is deleted (grace 0, as when its node is lost) in the middle of the transfer:
    the client's attempt fails, the operator re-seeds it from the other seed or falls back to storage, and
    it still becomes Ready with verified weights. A ~12 MB model and a 2 MB/s cap on what seeds serve make
    the pull last seconds, so the deletion lands mid-transfer."""
    s = scenario
    model = make_model_like(
        tmp_path / "model",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    nbytes = model_bytes(model)
    assert nbytes > 10_000_000
    body = reference_set_body("llama", model, backend="nccl", replicas=2, bandwidth_limit_mbps=2, timeout_seconds=60)
    s.rset.create(body)
    first = s.rset.wait_ready(2, STEP)  # both load from storage: no seed was Ready when they were created
    s.rset.scale(3)

    def pulling():
        rows = [r for r in s.tracker.rows() if r.name not in {f.name for f in first}]
        return next((r for r in rows if r.state == "transferring" and r.source == "seed"), None)

    client = wait_until(pulling, STEP, "the new pod pulling from a seed", interval=0.05)
    victim = client.seed_pod
    victim_uid = s.tracker.uids[victim]
    assert client.bytes_done < nbytes  # the deletion really lands before the pull finishes
    s.rset.core.delete_namespaced_pod(victim, s.namespace, grace_period_seconds=0)

    rows = s.rset.wait_ready(3, STEP)  # the client, the surviving seed, and the replacement for the victim
    after = {r.name: r for r in rows}
    assert victim_uid not in {s.tracker.uids[name] for name in after}  # its replacement may reuse its name
    pod = after[client.name]
    assert pod.attempt >= 2, pod.assignment
    assert pod.source == "storage" or (pod.source == "seed" and pod.seed_pod != victim), pod.assignment
    if pod.source == "seed":
        assert victim in pod.assignment.get("excludedSeeds", []), pod.assignment
    # The failed attempt was reported as failed, never as verified.
    states = [(state, attempt) for _, state, attempt in s.tracker.history[client.name]]
    assert ("verified", 1) not in states, states
    assert_verified_everywhere(s, rows, nbytes)
    assert len(set(generate_all(rows, s.rset.token()).values())) == 1


def test_operator_restarted_during_scale_out(scenario, tiny_model):
    """The operator is killed (SIGKILL) once the scale-out has created pods and before they verified; a fresh
    operator process picks up from the API alone: it gates the pods, creates no extras, and the set reaches 4."""
    s = scenario
    body = reference_set_body("llama", tiny_model, backend="transfer_engine", replicas=1)
    s.rset.create(body)
    (first,) = s.rset.wait_ready(1, STEP)
    s.rset.scale(4)
    wait_until(lambda: len(s.tracker.rows()) > 1, STEP, "the operator to create the first new pod", interval=0.05)
    assert not all(r.state == "verified" for r in s.tracker.rows())  # the kill lands mid scale-out
    s.cluster.restart_operator(crash=True)

    rows = s.rset.wait_ready(4, STEP)
    assert len(s.tracker.times) == 4, sorted(s.tracker.times)  # no pod was created twice
    assert not s.tracker.deleted
    assert first.name in {r.name for r in rows}
    assert_verified_everywhere(s, rows, model_bytes(tiny_model))
    assert sum(r.source == "seed" for r in rows) == 3
    assert len(set(generate_all(rows, s.rset.token()).values())) == 1
