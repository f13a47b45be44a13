"""The planner's rules as properties (hypothesis) and as worked examples. Pure: no cluster."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from seedfork_api.contract import AgentReport, Assignment
from seedfork_api.spec import ModelReplicaSetSpec
from seedfork_operator import fanout, planner
from seedfork_operator.podview import PodView

FP = "f" * 16
NOW = 1_000_000.0
NODES = {
    "n1": {"kubernetes.io/hostname": "n1", "topology.kubernetes.io/zone": "a"},
    "n2": {"kubernetes.io/hostname": "n2", "topology.kubernetes.io/zone": "a"},
    "n3": {"kubernetes.io/hostname": "n3", "topology.kubernetes.io/zone": "b"},
    "n4": {"kubernetes.io/hostname": "n4", "topology.kubernetes.io/zone": "b"},
}


def make_spec(replicas=1, engine="reference", tp=1, **transfer) -> ModelReplicaSetSpec:
    return ModelReplicaSetSpec.model_validate(
        {
            "replicas": replicas,
            "model": {"name": "m", "uri": "/m"},
            "engine": {"kind": engine, "parallelism": {"tp": tp}},
            "transfer": transfer,
        }
    )


def seed_pod(name, node="n1", created=1.0, source="storage", fp=FP, **kw) -> PodView:
    a = Assignment(attempt=1, source=source, assigned_at=NOW - 100)
    r = AgentReport(attempt=1, state="verified", serving=True)
    args = dict(name=name, created=created, node=node, ip="127.0.0.2", fingerprint=fp, ready=True, gate=True)
    return PodView(**{**args, "assignment": a, "report": r, **kw})


def names():
    counter = itertools.count()
    return lambda: f"new-{next(counter)}"


def run(spec, pods, nodes=NODES, now=NOW, template_node=None, **kw):
    return planner.plan(spec, FP, pods, nodes, now, names(), template_node, **kw)


# ------------------------------------------------------------------ properties


@st.composite
def clusters(draw):
    backend = draw(st.sampled_from(["transfer_engine", "nccl", "auto"]))
    engine = draw(st.sampled_from(["reference", "sglang", "vllm"]))
    tp = draw(st.integers(1, 2))
    spec = make_spec(
        replicas=draw(st.integers(0, 12)),
        engine=engine,
        tp=tp,
        backend=backend,
        maxClientsPerSeed=draw(st.integers(1, 4)),
        maxConcurrentStorageLoads=draw(st.integers(1, 3)),
        retries=draw(st.integers(0, 2)),
        fallback=draw(st.sampled_from(["storage", "fail"])),
        ports={"start": 40000, "end": 40000 + draw(st.integers(5 * tp - 1, 5 * tp + 7))},  # CEL: 5 per rank
    )
    n = draw(st.integers(0, 10))
    pod_names = [f"p{i}" for i in range(n)]
    pods = []
    for i, name in enumerate(pod_names):
        kind = draw(st.sampled_from(["none", "storage", "seed", "queued"]))
        others = [p for p in pod_names if p != name]
        assignment = None
        if kind == "queued":
            since = NOW - draw(st.sampled_from([1, 100]))
            excluded = draw(st.lists(st.sampled_from(others), max_size=3, unique=True)) if others else []
            assignment = Assignment(
                attempt=draw(st.integers(1, 3)),
                source="queued",
                excluded_seeds=excluded,
                assigned_at=since,
                waitUntil=since + draw(st.sampled_from([5, 500])),
            )
        elif kind == "storage" or (kind == "seed" and not others):
            assignment = Assignment(attempt=draw(st.integers(1, 3)), source="storage", assigned_at=NOW - 10)
        elif kind == "seed":
            excluded = draw(st.lists(st.sampled_from(others), max_size=2, unique=True))
            assignment = Assignment(
                attempt=draw(st.integers(1, 3)),
                source="seed",
                backend="nccl",
                seed_pod=draw(st.sampled_from(others)),
                group_ports=[40000 + j for j in range(tp)] if draw(st.booleans()) else [],
                excluded_seeds=excluded,
                assigned_at=NOW - draw(st.sampled_from([1, 10_000])),
            )
        report = None
        if assignment is not None and draw(st.booleans()):
            report = AgentReport(
                attempt=assignment.attempt if draw(st.booleans()) else 0,
                state=draw(st.sampled_from(["pending", "transferring", "verified", "failed"])),
                serving=draw(st.booleans()),
            )
        verified = report is not None and assignment is not None and report.attempt == assignment.attempt
        verified = verified and report.state == "verified"
        pods.append(
            PodView(
                name=name,
                created=float(i),
                node=draw(st.sampled_from([None, "n1", "n2", "n3", "n4"])),
                ip=draw(st.sampled_from([None, f"127.0.0.{i + 2}"])),
                deleting=draw(st.booleans()) and draw(st.booleans()),
                fingerprint=draw(st.sampled_from([FP, FP, "other"])),
                ready=verified and draw(st.booleans()),
                gate=verified and draw(st.booleans()),
                assignment=assignment,
                report=report,
            )
        )
    return spec, pods


@settings(max_examples=400, deadline=None)
@given(clusters())
def test_plan_invariants(cluster):
    spec, pods = cluster
    result = run(spec, pods)
    by_name = {p.name: p for p in pods}
    deleted = {name for name, _ in result.delete}
    new_assignments = dict(result.create) | dict(result.assign)
    limit = planner.client_limit(spec)

    # replicas honoured: live pods after the plan == spec.replicas
    live_after = [p for p in pods if not p.deleting and p.name not in deleted]
    assert len(live_after) + len(result.create) == spec.replicas

    # nothing both deleted and (re)assigned; deleting pods are never touched
    assert not deleted & set(new_assignments)
    assert all(not by_name[n].deleting for n in deleted | set(dict(result.assign)) | set(result.gate))

    # attempts go up by one for an existing pod; new pods start at 1
    for name, a in result.assign:
        old = by_name[name].assignment
        assert a.attempt == (old.attempt + 1 if old else 1)
    assert all(a.attempt == 1 for _, a in result.create)

    # the storage fan-in limit: a new storage load only while fewer than the limit run
    new_storage = [n for n, a in new_assignments.items() if a.source == "storage"]
    loading = [p for p in live_after if p.name not in new_assignments and planner.is_storage_load(spec, p, NOW)]
    if new_storage:
        assert len(loading) + len(new_storage) <= spec.transfer.max_concurrent_storage_loads
    # a queued pod waits at most its storage estimate, never past the timeout
    for a in new_assignments.values():
        if a.source == "queued":
            assert NOW < a.wait_until <= NOW + spec.transfer.timeout_seconds

    clients = defaultdict(list)  # seed -> [(pod, assignment)] after the plan
    for p in live_after:
        if p.name not in new_assignments and planner.is_active_client(spec, p, NOW):
            clients[p.assignment.seed_pod].append((p.name, p.assignment))
    for name, a in new_assignments.items():
        if a.source != "seed":
            continue
        seed = by_name[a.seed_pod]
        # only an eligible seed of the same fingerprint, never an excluded or departing one
        assert planner.can_seed(spec, FP, seed) and seed.fingerprint == FP
        assert seed.name not in a.excluded_seeds and seed.name not in deleted and seed.name != name
        assert a.seed_ip == seed.ip and a.backend == planner.resolve_backend(spec)
        if spec.engine.kind == "sglang" and a.backend == "transfer_engine":
            assert seed.assignment.source == "storage"  # SGLang cannot seed weights it got over TE
        clients[a.seed_pod].append((name, a))

    for seed, group in clients.items():
        fresh = [a for n, a in group if n in new_assignments]
        if fresh:
            assert len(group) <= limit, (seed, group)
        if planner.resolve_backend(spec) != "nccl":
            continue
        blocks = defaultdict(set)  # port block -> the groups (cohorts or single clients) using it
        for n, a in group:
            if a.group_ports:
                blocks[tuple(a.group_ports)].add(a.cohort_id or n)
        for n, a in group:
            if n in new_assignments:
                assert len(a.group_ports) == spec.engine.parallelism.tp * spec.engine.parallelism.pp
                assert all(spec.transfer.ports.start <= p <= spec.transfer.ports.end for p in a.group_ports)
                assert len(blocks[tuple(a.group_ports)]) == 1  # no two groups share a block on one seed
    ports = [set(b) for b in planner.port_blocks(spec)]
    assert all(not (x & y) for x, y in itertools.combinations(ports, 2))

    cohorts = defaultdict(list)
    for a in new_assignments.values():
        if a.cohort_id:
            cohorts[a.cohort_id].append(a)
    for members in cohorts.values():
        assert planner.uses_cohorts(spec)
        assert len({(a.seed_pod, tuple(a.group_ports)) for a in members}) == 1
        assert sorted(a.cohort_rank for a in members) == list(range(1, len(members) + 1))
        assert all(a.cohort_size == len(members) + 1 for a in members) and len(members) <= limit


@settings(max_examples=300, deadline=None)
@given(
    seeds=st.lists(st.tuples(st.sampled_from(list(NODES)), st.integers(0, 3)), min_size=1, max_size=6),
    client_node=st.sampled_from(list(NODES)),
    limit=st.integers(1, 4),
    rule=st.sampled_from(["expected", "legacy"]),
)
def test_a_single_new_pod_gets_the_closest_seed_with_room(seeds, client_node, limit, rule):
    spec = make_spec(replicas=len(seeds) + 1, maxClientsPerSeed=limit, backend="transfer_engine")
    pods = [seed_pod(f"s{i}", node=node, created=float(i)) for i, (node, _) in enumerate(seeds)]
    for i, (_, busy) in enumerate(seeds):
        for j in range(busy):  # existing clients keep seeds busy
            a = Assignment(attempt=1, source="seed", backend="transfer_engine", seed_pod=f"s{i}", assigned_at=NOW)
            pods.append(PodView(name=f"c{i}-{j}", created=100.0, assignment=a, fingerprint=FP))
    spec.replicas = len(pods) + 1
    result = run(spec, pods, template_node=client_node, rule=rule)
    ((_, a),) = result.create
    keys = spec.transfer.topology_keys
    # By expected time a TransferEngine seed takes one reader at a time (readers share its link).
    limit = planner.seed_capacity(spec, rule)
    room = [p for p in pods[: len(seeds)] if seeds[int(p.name[1:])][1] < limit]
    if not room:
        # legacy: storage at once; by expected time the busy seeds' transfers end long before storage would
        assert a.source == ("storage" if rule == "legacy" else "queued")
        return
    best = min(planner.locality(NODES[client_node], NODES[p.node], keys)[0] for p in room)
    chosen = next(p for p in room if p.name == a.seed_pod)
    assert planner.locality(NODES[client_node], NODES[chosen.node], keys)[0] == best
    # among equally close seeds, the least busy
    ties = [p for p in room if planner.locality(NODES[client_node], NODES[p.node], keys)[0] == best]
    assert seeds[int(chosen.name[1:])][1] == min(seeds[int(p.name[1:])][1] for p in ties)


# ------------------------------------------------------------------ worked examples


def test_first_pods_load_from_storage_up_to_the_fan_in_limit():
    slow_seeds = fanout.Estimates(seed_s=50.0, storage_s=60.0)
    result = run(make_spec(replicas=3, maxConcurrentStorageLoads=3), [], estimates=slow_seeds)
    assert [a.source for _, a in result.create] == ["storage"] * 3
    assert [c.locality for c in result.choices] == ["storage"] * 3
    # the default limit (2): the third waits for a storage slot or the seed one of the first two becomes
    result = run(make_spec(replicas=3), [], estimates=slow_seeds)
    assert [a.source for _, a in result.create] == ["storage", "storage", "queued"]
    # by the default estimates (a seed 30x faster) waiting for the first pod is sooner: one load only
    assert [a.source for _, a in run(make_spec(replicas=3), []).create] == ["storage", "queued", "queued"]
    assert [a.source for _, a in run(make_spec(replicas=3), [], rule="legacy").create] == ["storage"] * 3


def test_verified_pod_gets_the_gate_once():
    pod = seed_pod("a", ready=False, gate=False)
    assert run(make_spec(), [pod]).gate == ["a"]
    assert run(make_spec(), [seed_pod("a")]).gate == []


def test_gate_needs_a_verified_report_of_a_real_attempt():
    spec = make_spec(replicas=2)
    a2 = Assignment(attempt=2, source="seed", backend="transfer_engine", seed_pod="s", assigned_at=NOW)
    pod = PodView(name="c", fingerprint=FP, assignment=a2)
    for report, gated in [
        (AgentReport(attempt=2, state="transferring"), False),
        (AgentReport(attempt=1, state="failed"), False),
        (AgentReport(attempt=0, state="verified"), False),  # before any assignment: means nothing
        (AgentReport(attempt=2, state="verified"), True),
        # attempt 1 finished just as the operator moved to 2: the weights are verified all the same
        (AgentReport(attempt=1, state="verified", serving=True), True),
    ]:
        assert (run(spec, [seed_pod("s"), replace(pod, report=report)]).gate == ["c"]) is gated, report


def test_nccl_cohort_groups_new_pods_on_one_seed_with_one_port_block():
    spec = make_spec(replicas=4, backend="nccl", maxClientsPerSeed=3, tp=2)
    result = run(spec, [seed_pod("s")])
    seeded = [a for _, a in result.create if a.source == "seed"]
    assert len(seeded) == 3 and len({a.cohort_id for a in seeded}) == 1
    assert {a.cohort_size for a in seeded} == {4} and sorted(a.cohort_rank for a in seeded) == [1, 2, 3]
    start = spec.transfer.ports.start
    assert {tuple(a.group_ports) for a in seeded} == {(start, start + 1)}


def test_sglang_nccl_serves_one_client_per_seed_and_no_cohorts():
    spec = make_spec(replicas=4, engine="sglang", backend="nccl", maxClientsPerSeed=1)
    result = run(spec, [seed_pod("s1", created=1), seed_pod("s2", created=2)])
    seeded = [a for _, a in result.create if a.source == "seed"]
    assert Counter(a.seed_pod for a in seeded) == {"s1": 1, "s2": 1}
    assert all(a.cohort_id is None for a in seeded)


def test_sglang_te_pods_that_loaded_over_te_are_not_seeds():
    spec = make_spec(replicas=2, engine="sglang", backend="transfer_engine")
    te_loaded = seed_pod("t", source="seed")
    result = run(spec, [te_loaded])
    assert [a.source for _, a in result.create] == ["storage"]
    assert [a.seed_pod for _, a in run(spec, [seed_pod("s")]).create] == ["s"]


def failed_client(attempt=1, seed="s1", excluded=(), state="failed", assigned_at=NOW - 5):
    a = Assignment(
        attempt=attempt,
        source="seed",
        backend="transfer_engine",
        seed_pod=seed,
        excluded_seeds=list(excluded),
        assigned_at=assigned_at,
    )
    report = AgentReport(attempt=attempt, state=state, error="checksum mismatch") if state else None
    return PodView(name="c", created=50.0, node="n1", fingerprint=FP, assignment=a, report=report)


def test_failure_retries_another_seed_then_falls_back_to_storage():
    seeds = [seed_pod("s1"), seed_pod("s2")]
    spec = make_spec(replicas=3, retries=1)
    result = run(spec, [*seeds, failed_client()])
    ((name, a),) = result.assign
    assert (name, a.attempt, a.seed_pod, a.excluded_seeds) == ("c", 2, "s2", ["s1"])
    assert result.failures[0].reason == "checksum mismatch"
    result = run(spec, [*seeds, failed_client(attempt=2, seed="s2", excluded=["s1"])])
    ((_, a),) = result.assign
    assert (a.attempt, a.source, a.excluded_seeds) == (3, "storage", ["s1", "s2"]) and result.fell_back == 1


def test_timeout_counts_as_failure_and_fallback_fail_replaces_the_pod():
    spec = make_spec(replicas=2, retries=0, fallback="fail", timeoutSeconds=30)
    stuck = failed_client(state=None, assigned_at=NOW - 31)
    result = run(spec, [seed_pod("s1"), stuck])
    assert result.delete == [("c", "1 seed transfers failed and fallback is fail")]
    assert "within 30s" in result.failures[0].reason
    assert len(result.create) == 1  # replaced at once
    assert run(spec, [seed_pod("s1"), failed_client(state=None, assigned_at=NOW - 29)]).empty


def test_timeout_clock_follows_the_agent():
    spec = make_spec(replicas=2, timeoutSeconds=60)
    a = Assignment(attempt=2, source="seed", backend="nccl", seed_pod="s", assigned_at=NOW - 61)
    pod = PodView(name="c", fingerprint=FP, assignment=a)
    assert planner.timed_out(spec, pod, NOW)  # silent agent: 60 s after the assignment
    moving = AgentReport(attempt=2, state="transferring", updatedAt=NOW - 10)
    assert not planner.timed_out(spec, replace(pod, report=moving), NOW)  # progress restarts the clock
    assert planner.timed_out(spec, replace(pod, report=moving), NOW + 51)
    # still finishing attempt 1 (its own timeout ends it by NOW + 40): attempt 2 waits for that,
    # but never past two timeouts after its assignment (NOW - 61 + 120)
    busy = AgentReport(attempt=1, state="transferring", updatedAt=NOW - 20)
    assert not planner.timed_out(spec, replace(pod, report=busy), NOW + 50)
    assert planner.timed_out(spec, replace(pod, report=busy), NOW + 60)
    fresh = replace(pod, assignment=a.model_copy(update={"assigned_at": NOW}))
    assert not planner.timed_out(spec, replace(fresh, report=busy), NOW + 60)  # attempt 1 ends at NOW + 40
    assert planner.timed_out(spec, replace(fresh, report=busy), NOW + 101)


def test_seed_gone_reassigns_and_storage_failure_replaces():
    spec = make_spec(replicas=2)
    result = run(spec, [seed_pod("s2"), failed_client(state="transferring")])  # s1 no longer exists
    ((_, a),) = result.assign
    assert a.seed_pod == "s2" and a.excluded_seeds == ["s1"] and "went away" in result.failures[0].reason
    broken = PodView(
        name="b",
        fingerprint=FP,
        assignment=Assignment(attempt=1, source="storage", assigned_at=NOW),
        report=AgentReport(attempt=1, state="failed", error="disk"),
    )
    result = run(make_spec(replicas=1), [broken])
    assert result.delete and result.delete[0][0] == "b" and len(result.create) == 1


def test_a_retry_whose_agent_is_still_busy_never_joins_a_cohort():
    """The seed of a pulling pod dies: the pod is re-assigned at once, but its agent starts the new attempt
    only when its current one ends (up to a timeout later). A new pod planned in the same pass must not wait
    for it in one cohort: the late pod gets its own group and port block."""
    spec = make_spec(replicas=3, backend="nccl", maxClientsPerSeed=4)
    busy = replace(failed_client(state="transferring"), assignment=failed_client().assignment.model_copy(
        update={"backend": "nccl", "group_ports": [40000], "cohort_id": "c-old", "cohort_rank": 1, "cohort_size": 2}
    ))  # fmt: skip
    result = run(spec, [seed_pod("s2"), busy])  # s1, its seed, is gone
    ((name, retry),) = result.assign
    ((_, new),) = result.create
    assert name == "c" and retry.seed_pod == new.seed_pod == "s2" and retry.attempt == 2
    assert retry.cohort_id is None and retry.cohort_size is None
    assert new.cohort_id is not None and new.cohort_size == 2  # the new pod's cohort: s2 and itself
    assert set(retry.group_ports).isdisjoint(new.group_ports)
    # An agent that already reported the failure is idle: its retry may share a cohort with the new pod.
    idle = replace(busy, report=AgentReport(attempt=1, state="failed", error="seed died"))
    result = run(spec, [seed_pod("s2"), idle])
    ((_, retry),) = result.assign
    ((_, new),) = result.create
    assert retry.cohort_id == new.cohort_id is not None and retry.cohort_size == 3


def test_scale_down_order():
    busy = seed_pod("busy", created=1)
    idle_old, idle_new = seed_pod("idle-old", created=2), seed_pod("idle-new", created=3)
    loading = failed_client(seed="busy", state="transferring")
    spec = make_spec(replicas=3)
    assert [n for n, _ in run(spec, [busy, idle_old, idle_new, loading]).delete] == ["c"]
    spec.replicas = 2
    assert [n for n, _ in run(spec, [busy, idle_old, idle_new, loading]).delete] == ["c", "idle-new"]
    spec.replicas = 0
    order = [n for n, _ in run(spec, [busy, idle_old, idle_new, loading]).delete]
    assert order == ["c", "idle-new", "idle-old", "busy"]
    # a busy seed goes only when nothing else can: its client is then re-planned
    spec.replicas = 1
    result = run(spec, [busy, loading])
    assert [n for n, _ in result.delete] == ["c"]


def test_locality_upgrade_before_the_agent_starts():
    spec = make_spec(replicas=3)
    far, near = seed_pod("far", node="n3"), seed_pod("near", node="n2")
    client = failed_client(seed="far", state=None)  # on n1, zone a; assigned before it was scheduled
    ((_, a),) = run(spec, [far, near, client]).assign
    assert a.seed_pod == "near" and a.attempt == 2 and a.excluded_seeds == []
    started = replace(client, report=AgentReport(attempt=1, state="transferring"))
    assert run(spec, [far, near, started]).empty  # once the agent runs, the choice stands
