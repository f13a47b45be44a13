"""Scale-out, seed limits and locality, failover, scale-down order, restart: the operator on the real apiserver."""

from __future__ import annotations

import time
import urllib.request
from collections import Counter

import pytest

from seedfork_api import contract as c
from seedfork_localdev.waiting import ScenarioError
from seedfork_operator.runner import OperatorThread

from .conftest import stay_transferring, verify_at_once

pytestmark = pytest.mark.cluster


def ready_count(sets, name):
    return sum(v.ready for v in sets.views(name))


def assigned(sets, name, n):
    views = [v for v in sets.views(name) if not v.deleting]
    return len(views) == n and all(v.assignment for v in views) and views


def test_scale_1_to_5_waits_for_seeds_instead_of_storage_and_grows_the_seed_pool(
    operator, nodes, sets, wait, operator_config
):
    """1 -> 5 with one seed: the old rule sent every pod beyond the seed's free slots to storage. By expected
    time the seed serves one TransferEngine reader at a time and the others wait (queued), each taking a seed
    slot as one frees: no pod reads storage while a seed would serve it sooner."""
    sets.create("grow", replicas=1, maxClientsPerSeed=2, backend="transfer_engine")
    wait("first pod ready", lambda: ready_count(sets, "grow") == 1)
    first = sets.views("grow")[0].name
    wait("first pod serving as seed", lambda: sets.get("grow")["status"].get("seeds") == 1)

    nodes.policy = lambda pod: None if pod.name != first else verify_at_once(pod)  # new agents not started yet
    sets.scale("grow", 5)
    views = wait("5 assigned pods", lambda: assigned(sets, "grow", 5))
    new = [v for v in views if v.name != first]
    assert Counter(v.assignment.source for v in new) == {"seed": 1, "queued": 3}, [v.assignment for v in new]
    assert all(v.assignment.seed_pod == first and v.assignment.backend == "transfer_engine" for v in new
               if v.assignment.source == "seed")  # fmt: skip
    assert all(v.assignment.wait_until > v.assignment.assigned_at for v in new if v.assignment.source == "queued")
    status = wait("queued in status", lambda: (s := sets.get("grow")["status"])["transfers"].get("queued") == 3 and s)
    assert status["transfers"]["inFlight"] == 1

    # The agents verify one after another: each verified pod seeds a queued one.
    sources: dict[str, set[str]] = {}

    def watch_sources():
        for v in sets.views("grow"):
            sources.setdefault(v.name, set()).add(v.assignment.source if v.assignment else "-")
        return ready_count(sets, "grow") == 5

    nodes.policy = verify_at_once
    wait("all 5 ready", watch_sources, every=0.01)
    assert all("storage" not in seen for name, seen in sources.items() if name != first), sources
    assert all(v.assignment.source == "seed" for v in sets.views("grow") if v.name != first)
    status = wait("status settles", lambda: (s := sets.get("grow")["status"])["readyReplicas"] == 5 and s)
    assert status["seeds"] == 5  # verified pods became seeds
    assert status["replicas"] == 5 and status["transfers"]["completed"] == 5 and status["transfers"]["queued"] == 0
    conditions = {x["type"]: x for x in status["conditions"]}
    assert conditions["Available"]["status"] == "True" and conditions["Degraded"]["status"] == "False"
    wait("events (kopf posts them from its own queue)", lambda: Counter(r for r, _ in sets.events())["SeedChosen"] >= 5)

    body = urllib.request.urlopen(f"http://127.0.0.1:{operator_config.metrics_port}/metrics").read().decode()
    assert 'seedfork_seed_selections_total{locality="storage"' in body
    assert "seedfork_pod_ready_seconds_bucket" in body


def test_seeds_are_chosen_by_locality(operator, nodes, sets, wait):
    zone = "topology.kubernetes.io/zone"
    for node, z in [("n1", "a"), ("n2", "a"), ("n3", "b"), ("n4", "b")]:
        nodes.add_node(node, {"kubernetes.io/hostname": node, zone: z})
    placement = {0: "n1", 1: "n3", 2: "n2", 3: "n4", 4: "n4"}
    nodes.place = lambda name, i: placement.get(i)
    sets.create("local", replicas=1, maxClientsPerSeed=2)
    wait("seed 1 ready", lambda: ready_count(sets, "local") == 1)
    sets.scale("local", 2)
    wait("seed 2 ready", lambda: ready_count(sets, "local") == 2)
    seeds = {v.node: v.name for v in sets.views("local")}
    assert set(seeds) == {"n1", "n3"}

    nodes.policy = lambda pod: verify_at_once(pod) if pod.name in seeds.values() else None
    sets.scale("local", 4)

    def placed_locally():
        new = [v for v in sets.views("local") if v.name not in seeds.values()]
        if len(new) != 2 or not all(v.node and v.assignment for v in new):
            return False
        want = {"n2": seeds["n1"], "n4": seeds["n3"]}  # same zone beats the other zone
        return all(v.assignment.seed_pod == want[v.node] for v in new) and new

    try:
        new = wait("clients on same-zone seeds", placed_locally)
    except ScenarioError:
        print(seeds, [(v.name, v.node, v.assignment) for v in sets.views("local")], sets.events())
        raise
    assert sorted(Counter(v.assignment.seed_pod for v in new).values()) == [1, 1]

    def chosen_events_for_all() -> bool:
        chosen = [m for r, m in sets.events() if r == "SeedChosen"]
        return all(any(m.startswith(f"pod {v.name} ") for m in chosen) for v in new)

    wait("a SeedChosen event for each client", chosen_events_for_all)


def test_seed_deleted_mid_transfer_is_replaced_by_another_seed(operator, nodes, sets, wait):
    sets.create("failover", replicas=2, backend="nccl")
    wait("two seeds", lambda: sets.get("failover").get("status", {}).get("seeds") == 2)
    seeds = {v.name for v in sets.views("failover")}
    nodes.policy = lambda pod: verify_at_once(pod) if pod.name in seeds else stay_transferring(pod)
    sets.scale("failover", 3)
    client = wait("client pulling", lambda: [v for v in sets.views("failover") if v.name not in seeds and v.report])
    client = client[0]
    assert client.assignment.source == "seed" and client.assignment.group_ports
    assert client.assignment.cohort_size == 2 and client.assignment.cohort_rank == 1
    victim = client.assignment.seed_pod
    victim_uid = next(v.uid for v in sets.views("failover") if v.name == victim)
    sets.core.delete_namespaced_pod(victim, sets.namespace)

    def reassigned():
        v = next((v for v in sets.views("failover") if v.name == client.name), None)
        return v if v and v.assignment.attempt == 2 else None

    moved = wait("reassigned", reassigned)
    assert moved.assignment.seed_pod == (seeds - {victim}).pop()
    assert moved.assignment.excluded_seeds == [victim]
    nodes.policy = verify_at_once
    wait("3 ready again", lambda: ready_count(sets, "failover") == 3 and len(sets.views("failover")) == 3)
    assert victim_uid not in {v.uid for v in sets.views("failover")}  # its replacement may reuse its name
    wait("event", lambda: any(r == "TransferFailed" and "went away" in m for r, m in sets.events()))


def test_failed_transfers_retry_another_seed_then_storage(operator, nodes, sets, wait):
    sets.create("flaky", replicas=3, retries=1)
    wait("three seeds", lambda: sets.get("flaky").get("status", {}).get("seeds") == 3)
    seeds = {v.name for v in sets.views("flaky")}

    def agent(pod):
        a = pod.assignment
        if pod.name in seeds or a.source == "storage":
            return verify_at_once(pod)
        return c.AgentReport(attempt=a.attempt, state="failed", seed_pod=a.seed_pod, error="checksum mismatch")

    nodes.policy = agent
    sets.scale("flaky", 4)
    wait("4 ready", lambda: ready_count(sets, "flaky") == 4)
    pod = next(v for v in sets.views("flaky") if v.name not in seeds)
    assert pod.assignment.attempt == 3 and pod.assignment.source == "storage"
    assert len(pod.assignment.excluded_seeds) == 2 and set(pod.assignment.excluded_seeds) <= seeds
    transfers = wait("counts", lambda: (t := sets.get("flaky")["status"]["transfers"])["fellBack"] == 1 and t)
    assert transfers["failed"] == 2 and transfers["completed"] == 4
    wait("events", lambda: sum(r == "TransferFailed" and "checksum mismatch" in m for r, m in sets.events()) == 2)


def test_fallback_fail_replaces_the_pod(operator, nodes, sets, wait):
    sets.create("strict", replicas=1, retries=0, fallback="fail")
    wait("seed", lambda: sets.get("strict").get("status", {}).get("seeds") == 1)
    seed = sets.views("strict")[0].name

    def agent(pod):
        a = pod.assignment
        if a.source == "storage" or pod.name == seed:
            return verify_at_once(pod)
        return c.AgentReport(attempt=a.attempt, state="failed", error="boom")

    nodes.policy = agent
    sets.scale("strict", 2)
    first = wait("client", lambda: [v.uid for v in sets.views("strict") if v.name != seed])[0]
    wait("client replaced", lambda: first not in {v.uid for v in sets.views("strict")})
    nodes.policy = verify_at_once
    wait("2 ready", lambda: ready_count(sets, "strict") == 2 and len(sets.views("strict")) == 2)


def test_scale_down_removes_unready_then_idle_newest_and_keeps_busy_seeds(operator, nodes, sets, wait):
    sets.create("shrink", replicas=1)
    for n in (2, 3):  # creationTimestamp has 1 s resolution: make "newest" unambiguous
        wait(f"{n - 1} ready", lambda n=n: ready_count(sets, "shrink") == n - 1)
        time.sleep(1.1)
        sets.scale("shrink", n)
    wait("3 ready", lambda: ready_count(sets, "shrink") == 3)
    wait("3 seeds", lambda: sets.get("shrink")["status"].get("seeds") == 3)
    ready = sorted(sets.views("shrink"), key=lambda v: v.created)
    names = {v.name for v in ready}
    nodes.policy = lambda pod: verify_at_once(pod) if pod.name in names else stay_transferring(pod)
    sets.scale("shrink", 4)
    loading = wait("a client pulling", lambda: [v for v in sets.views("shrink") if v.name not in names and v.report])
    busy = loading[0].assignment.seed_pod
    sets.scale("shrink", 2)
    wait("2 pods", lambda: len([v for v in sets.views("shrink") if not v.deleting]) == 2)
    kept = {v.name for v in sets.views("shrink") if not v.deleting}
    idle = [v.name for v in ready if v.name != busy]
    assert busy in kept  # the seed serving a transfer survives
    assert loading[0].name not in kept  # not-Ready goes first
    assert kept == {busy, idle[0]}  # of the idle seeds the newest goes


def test_operator_restart_mid_scale_leaves_no_duplicates_or_orphans(crd, nodes, sets, wait, operator_config, namespace):
    nodes.policy = stay_transferring
    with OperatorThread([namespace], operator_config):
        sets.create("restart", replicas=1)
        wait("first pod", lambda: sets.views("restart"))
        sets.scale("restart", 8)
        wait("scale-out under way", lambda: len(sets.views("restart")) >= 2, every=0.01)
    with OperatorThread([namespace], operator_config):
        wait("8 pods", lambda: len(sets.views("restart")) == 8)
        time.sleep(2.5)  # several passes: nothing more appears
        views = sets.views("restart")
    uid = sets.get("restart")["metadata"]["uid"]
    assert len(views) == 8 and len({v.name for v in views}) == 8
    pods = sets.pods("restart")
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == uid for p in pods)
    assert all(v.assignment and v.assignment.attempt == 1 for v in views)
    with OperatorThread([namespace], operator_config):
        sets.scale("restart", 3)
        wait("3 pods", lambda: len([v for v in sets.views("restart") if not v.deleting]) == 3)
        time.sleep(1.5)
        assert len([v for v in sets.views("restart") if not v.deleting]) == 3
