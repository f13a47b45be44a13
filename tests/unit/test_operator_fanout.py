"""The planner's decision by expected time: take a seed slot, wait for one (queued), or load from storage.

Pure: no cluster. The estimates come from the agents' timing annotations, as in the operator.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from seedfork_api.contract import AgentReport, Assignment, PodTiming
from seedfork_api.spec import ModelReplicaSetSpec
from seedfork_operator import fanout, planner
from seedfork_operator.podview import PodView

FP = "f" * 16
NOW = 1_000_000.0
NODES = {"n1": {"kubernetes.io/hostname": "n1"}}


def spec(replicas: int, **transfer) -> ModelReplicaSetSpec:
    return ModelReplicaSetSpec.model_validate(
        {
            "replicas": replicas,
            "model": {"name": "m", "uri": "/m"},
            "engine": {"kind": "reference"},
            "transfer": {"backend": "transfer_engine", **transfer},
        }
    )


def verified(name: str, source: str = "storage", seconds: float = 11.0, ip: str = "127.0.0.2") -> PodView:
    """A serving pod whose agent recorded how long its load took."""
    a = Assignment(attempt=1, source=source, assigned_at=NOW - 100, **({"seedPod": "s0"} if source == "seed" else {}))
    return PodView(
        name=name,
        created=1.0,
        node="n1",
        ip=ip,
        fingerprint=FP,
        ready=True,
        gate=True,
        assignment=a,
        report=AgentReport(attempt=1, state="verified", source=source, serving=True),
        timing=PodTiming(transferStart=NOW - 90, verified=NOW - 90 + seconds, bytes=16 * 10**9),
    )


def queued(name: str, since: float, wait_until: float, attempt: int = 1, agent_up: float | None = None) -> PodView:
    """A queued pod whose agent runs since ``agent_up`` (default: since it was queued)."""
    a = Assignment(attempt=attempt, source="queued", assigned_at=since, waitUntil=wait_until)
    r = AgentReport(attempt=0, state="pending", updatedAt=since if agent_up is None else agent_up)
    return PodView(name=name, created=since, node="n1", fingerprint=FP, assignment=a, report=r)


def seed_client(name: str, seed: str, assigned_at: float = NOW) -> PodView:
    a = Assignment(attempt=1, source="seed", backend="transfer_engine", seedPod=seed, assigned_at=assigned_at)
    return PodView(name=name, created=1.0, node="n1", fingerprint=FP, assignment=a)


def storage_load(name: str) -> PodView:
    return PodView(
        name=name, created=1.0, fingerprint=FP, assignment=Assignment(attempt=1, source="storage", assigned_at=NOW)
    )


def run(s, pods, now=NOW, **kw) -> planner.Plan:
    counter = itertools.count()
    return planner.plan(s, FP, pods, NODES, now, lambda: f"new-{next(counter)}", **kw)


def sources(result: planner.Plan) -> list[str]:
    return [a.source for _, a in [*result.create, *result.assign]]


# ------------------------------------------------------------------ estimates


def test_estimates_come_from_the_agents_timing_with_a_default_before_that():
    assert fanout.measure([]) == fanout.Estimates(
        fanout.DEFAULT_STORAGE_S / fanout.SEED_SPEEDUP, fanout.DEFAULT_STORAGE_S
    )
    only_storage = fanout.measure([verified("a", seconds=11.0), verified("b", seconds=13.0)])
    assert (only_storage.storage_s, only_storage.seed_s, only_storage.storage_samples) == (12.0, 0.4, 2)
    both = fanout.measure([verified("a", seconds=11.0), verified("c", "seed", seconds=0.3)])
    assert (both.storage_s, both.seed_s, both.seed_samples, both.bytes) == (11.0, pytest.approx(0.3), 1, 16 * 10**9)
    # a report still transferring, or timing without its phases, measures nothing
    moving = replace(verified("d", seconds=1.0), report=AgentReport(attempt=1, state="transferring"))
    assert fanout.measure([moving, replace(verified("e"), timing=PodTiming())]).storage_samples == 0


# ------------------------------------------------------------------ the decision


def test_one_seed_and_a_burst_of_100_no_pod_goes_to_storage_while_a_seed_is_sooner():
    """The issue's case: 1 -> 100 with 4 clients per seed sent 96 pods to storage."""
    seed = verified("s0", seconds=11.0)  # storage 11 s; seed transfers assumed 10x faster
    result = run(spec(100, maxClientsPerSeed=4), [seed])
    assert sorted(sources(result)) == ["queued"] * 98 + ["seed"]
    # each queued pod prefers a seed until its storage estimate plus the preference
    assert {a.wait_until for _, a in result.create if a.source == "queued"} == {NOW + 11.0 + fanout.PREFER_SEED_S}
    assert sorted(result.queued) == sorted(n for n, a in result.create if a.source == "queued")
    legacy = run(spec(100, maxClientsPerSeed=4), [seed], rule="legacy")
    assert sources(legacy).count("storage") == 95  # the old rule, kept for comparison


def test_storage_is_chosen_when_it_is_sooner_than_the_queue_but_never_past_the_fan_in_limit():
    # seed transfers as slow as storage: a long queue for one seed loses to storage, up to the limit
    s = spec(20, maxConcurrentStorageLoads=3)
    est = fanout.Estimates(seed_s=20.0, storage_s=11.0)  # the second pod's seed: 40.5 s; storage 11 s
    result = run(s, [verified("s0")], estimates=est)
    assert sources(result).count("seed") == 1 and sources(result).count("storage") == 3
    assert sources(result).count("queued") == 15


def test_a_burst_with_no_seed_loads_at_most_limit_pods_from_storage_and_queues_the_rest():
    # ten pods fit in the tree behind one storage load (defaults: storage 60 s, seed 2 s)
    assert sources(run(spec(10), [])) == ["storage"] + ["queued"] * 9
    # forty do not: a second load, and no more (the limit)
    result = run(spec(40), [])
    assert sources(result).count("storage") == 2 and sources(result).count("queued") == 38
    # the loads in flight hold the storage slots: a second pass starts no more
    pods = [
        PodView(name=n, created=1.0, fingerprint=FP, assignment=a.model_copy(update={"assigned_at": NOW}))
        for n, a in result.create
    ]
    assert run(spec(40), pods, now=NOW + 1).empty


def test_a_queued_pod_stays_queued_without_writes_until_a_seed_slot_frees():
    s = spec(3)
    pods = [verified("s0"), seed_client("c1", "s0"), queued("q", NOW - 1, NOW + 10)]
    assert run(s, pods).empty  # s0 serves c1: nothing to do
    done = replace(
        pods[1], report=AgentReport(attempt=1, state="verified", serving=True), ready=True, gate=True, ip="127.0.0.3"
    )
    result = run(s, [pods[0], done, pods[2]])
    ((name, a),) = result.assign
    assert (name, a.source, a.attempt) == ("q", "seed", 2) and a.seed_pod in ("s0", "c1")


def test_past_its_wait_a_queued_pod_takes_storage_once_it_is_sooner_at_all():
    s = spec(6)
    est = fanout.Estimates(seed_s=4.0, storage_s=11.0)
    late = [queued(f"late{i}", NOW - 20 + i, NOW - 1) for i in range(3)]
    pods = [verified("s0"), seed_client("c1", "s0"), *late, queued("q", NOW - 1, NOW + 10)]
    # before their waitUntil all four wait: seeds are preferred by PREFER_SEED_S
    waiting = [replace(p, assignment=p.assignment.model_copy(update={"wait_until": NOW + 5})) for p in pods[2:5]]
    assert run(s, [*pods[:2], *waiting, pods[5]], estimates=est).empty
    # c1's transfer ends at 4 s and frees two slots (s0's, and c1's as a new seed): the first two late pods
    # verify at 8.5 s, before storage (11 s); the third would at 13 s, so it takes a storage slot
    result = run(s, pods, estimates=est)
    assert [(n, a.source) for n, a in result.assign] == [("late2", "storage")]
    # the wait counts from when the agent runs: one still starting is not late (storage would wait for it too)
    starting = [replace(p, report=None) for p in pods[2:5]]
    assert run(s, [*pods[:2], *starting, pods[5]], estimates=est).empty
    started_late = [replace(p, report=p.report.model_copy(update={"updated_at": NOW - 2})) for p in pods[2:5]]
    assert run(s, [*pods[:2], *started_late, pods[5]], estimates=est).empty  # its agent runs for 2 s only
    # storage full: it keeps waiting (for the first storage slot or seed slot), no write
    loads = [storage_load(f"l{i}") for i in range(2)]
    s.replicas = 8
    assert run(s, [*pods, *loads], estimates=est).empty
    # a pod queued behind a full storage waits until storage would have verified it, not just its load time
    s.replicas = 9
    result = run(s, [*pods, *loads], estimates=est)
    ((_, a),) = result.create
    wait = 11.0 + fanout.DISPATCH_S + 11.0 + fanout.PREFER_SEED_S  # a storage slot, the load, the preference
    assert a.source == "queued" and a.wait_until == pytest.approx(NOW + wait)


def test_retries_exhausted_fall_back_through_the_storage_limit():
    s = spec(5, retries=0)
    failed = PodView(
        name="c",
        created=1.0,
        fingerprint=FP,
        assignment=Assignment(attempt=1, source="seed", backend="transfer_engine", seedPod="s0", assigned_at=NOW - 5),
        report=AgentReport(attempt=1, state="failed", error="checksum mismatch"),
    )
    loads = [storage_load(f"l{i}") for i in range(2)]
    ((name, a),) = run(s, [verified("s0"), failed, *loads]).assign
    assert (name, a.source, a.excluded_seeds) == ("c", "queued", ["s0"])
    # once a storage slot is free, the queued fallback takes it
    result = run(s, [verified("s0"), replace(failed, assignment=a, report=failed.report), loads[0]], now=NOW + 1)
    ((name, b),) = result.assign
    assert (name, b.source, b.attempt) == ("c", "storage", 3) and result.fell_back == 1


def test_sglang_over_te_clients_add_no_seeds_to_the_forecast():
    # the first seed slot after now frees at 4 s: verified at 8.5 s; storage (2 s) is preferred past 12 s
    est = fanout.Estimates(seed_s=4.0, storage_s=2.0)

    def plan_for(engine: str) -> list[str]:
        s = ModelReplicaSetSpec.model_validate(
            {"replicas": 6, "model": {"name": "m", "uri": "/m"}, "engine": {"kind": engine},
             "transfer": {"backend": "transfer_engine", "maxConcurrentStorageLoads": 4}}
        )  # fmt: skip
        return sources(run(s, [verified("s0", seconds=2.0)], estimates=est))

    # reference: the first client seeds too, so two pods can wait (8.5 s); the fourth would wait until 13 s,
    # later than storage plus the preference (12 s), and the storage-loaded pod seeds the fifth. SGLang's TE
    # clients never seed: its third pod would wait until 13 s already.
    assert plan_for("reference") == ["seed", "queued", "queued", "storage", "queued"]
    assert plan_for("sglang") == ["seed", "queued", "storage", "queued", "queued"]


def test_nccl_cohorts_take_several_readers_per_seed():
    s = spec(5, backend="nccl", maxClientsPerSeed=4)
    result = run(s, [verified("s0")])
    assert sorted(sources(result)) == ["seed"] * 4
    assert len({a.cohort_id for _, a in result.create}) == 1


def test_locality_swaps_still_happen_when_each_seed_takes_one_reader():
    zone = "topology.kubernetes.io/zone"
    nodes = {n: {"kubernetes.io/hostname": n, zone: z} for n, z in [("n1", "a"), ("n2", "a"), ("n3", "b"), ("n4", "b")]}
    s1, s2 = replace(verified("s1"), node="n1"), replace(verified("s2", ip="127.0.0.3"), node="n3")
    c1 = replace(seed_client("c1", "s2"), node="n2")  # assigned before it was scheduled: the far seed
    c2 = replace(seed_client("c2", "s1"), node="n4")
    counter = itertools.count()
    result = planner.plan(spec(4), FP, [s1, s2, c1, c2], nodes, NOW, lambda: f"new-{next(counter)}")
    assert sorted((n, a.seed_pod) for n, a in result.assign) == [("c1", "s1"), ("c2", "s2")]


def test_small_weights_still_wait_for_seeds_when_storage_wins_by_less_than_the_margin():
    """Found on the local cluster (1 -> 4, 0.5 MB of weights): storage loads took 0.11 s, a seed pull about 1 s,
    so pods were sent to storage to win a second or two."""
    pods = [verified("s0", seconds=0.11), verified("s1", "seed", seconds=1.0, ip="127.0.0.3")]
    assert sources(run(spec(6), pods)) == ["seed", "seed", "queued", "queued"]


def test_a_free_seed_slot_is_taken_even_where_storage_measured_faster():
    # seed transfers measured slower than storage (TCP on a loaded machine, storage in the page cache)
    pods = [verified("s0", seconds=0.2), verified("s1", "seed", seconds=2.0, ip="127.0.0.3")]
    result = run(spec(3), pods)
    ((_, a),) = result.create
    assert a.source == "seed" and result.estimates.seed_s > result.estimates.storage_s
