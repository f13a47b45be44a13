"""One set, one digest; seeds that fail are taken out; storage backoff. Pure: no cluster."""

from __future__ import annotations

from dataclasses import replace

from seedfork_api.contract import ERR_SELF_CHECK_FAILED, AgentReport, Assignment
from seedfork_operator import planner, trust
from seedfork_operator.backoff import Backoff

from .test_operator_planner import FP, NODES, NOW, make_spec, names, seed_pod

GOOD, OTHER = "a" * 64, "b" * 64


def with_digest(pod, digest, **report):
    return replace(pod, report=pod.report.model_copy(update={"digest": digest, **report}))


def judged_plan(spec, pods, verdict):
    return planner.plan(spec, FP, pods, NODES, NOW, names(), None, replace=verdict.replace, avoid=verdict.avoid)


def test_the_set_digest_is_the_recorded_one_else_the_oldest_verified_load():
    older = with_digest(seed_pod("s0", created=1.0), GOOD)
    newer = with_digest(seed_pod("s1", created=2.0), OTHER)
    assert trust.weights_digest("", [newer, older]) == GOOD
    assert trust.weights_digest(OTHER, [older]) == OTHER  # once recorded it never moves
    assert trust.weights_digest("", [replace(older, report=older.report.model_copy(update={"digest": None}))]) == ""


def test_a_pod_with_other_bytes_is_never_gated_nor_a_seed_and_is_replaced():
    spec = make_spec(replicas=3, backend="transfer_engine")
    seed = with_digest(seed_pod("s0"), GOOD)
    bad = with_digest(seed_pod("s1", created=2.0, gate=False, ready=False), OTHER)
    verdict = trust.judge(GOOD, [seed, bad], {}, NOW, 60)
    assert set(verdict.replace) == {"s1"}
    reason, message = verdict.problem
    assert reason == "WeightsDigestMismatch" and GOOD in message and OTHER in message

    out = judged_plan(spec, [seed, bad], verdict)
    assert "s1" not in out.gate
    assert ("s1", verdict.replace["s1"]) in out.delete
    created = dict(out.create)
    assert len(created) == 2  # s1's replacement and the missing third pod
    assert all(a.seed_pod != "s1" for a in created.values())  # the bad pod seeds nobody


def test_a_seed_that_failed_its_own_check_is_replaced_and_its_clients_move():
    spec = make_spec(replicas=2, backend="transfer_engine")
    failed = AgentReport(attempt=1, state="failed", error=f"{ERR_SELF_CHECK_FAILED}: 1 of 9 tensors differ")
    seed = replace(seed_pod("s0"), report=failed)
    client = seed_pod("c1", created=2.0, gate=False, ready=False, report=None)
    client = replace(client, assignment=Assignment(attempt=1, source="seed", seed_pod="s0", assigned_at=NOW - 1))
    verdict = trust.judge("", [seed, client], {}, NOW, 60)
    assert set(verdict.replace) == {"s0"}
    out = judged_plan(spec, [seed, client], verdict)
    assert [n for n, _ in out.delete] == ["s0"]
    assert dict(out.assign)["c1"].source == "storage"  # no other seed: its seed went away


def test_a_seed_a_client_caught_with_bad_bytes_is_avoided_until_it_rechecked():
    spec = make_spec(replicas=3, backend="transfer_engine", maxClientsPerSeed=4)
    s0, s1 = seed_pod("s0"), seed_pod("s1", created=1.5)
    caught = seed_pod("c1", created=2.0, gate=False, ready=False)
    caught = replace(
        caught,
        assignment=Assignment(attempt=1, source="seed", seed_pod="s0", assigned_at=NOW - 1),
        report=AgentReport(attempt=1, state="failed", error="checksum mismatch in 2 of 9 tensors, first x"),
    )
    suspects: dict[str, trust.Suspect] = {}
    verdict = trust.judge("", [s0, s1, caught], suspects, NOW, 60)
    assert verdict.avoid == {"s0"} and not verdict.replace
    out = judged_plan(spec, [s0, s1, caught], verdict)
    assert {a.seed_pod for _, a in out.assign + out.create} == {"s1"}

    # still suspect on the next pass, then cleared by the seed's re-check
    assert trust.judge("", [s0, s1], suspects, NOW + 1, 60).avoid == {"s0"}
    rechecked = replace(s0, report=s0.report.model_copy(update={"self_checks": 1}))
    assert trust.judge("", [rechecked, s1], suspects, NOW + 2, 60).avoid == set()
    assert suspects == {}


def test_suspicion_expires_after_the_transfer_timeout():
    suspects = {"s0": trust.Suspect(NOW, 0)}
    assert trust.judge("", [seed_pod("s0")], suspects, NOW + 59, 60).avoid == {"s0"}
    assert trust.judge("", [seed_pod("s0")], suspects, NOW + 61, 60).avoid == set()


def test_an_avoided_seed_keeps_its_current_clients():
    spec = make_spec(replicas=2, backend="transfer_engine")
    s0 = seed_pod("s0")
    client = seed_pod("c1", created=2.0, gate=False, ready=False)
    client = replace(
        client,
        assignment=Assignment(attempt=1, source="seed", seed_pod="s0", assigned_at=NOW - 1),
        report=AgentReport(attempt=1, state="transferring"),
    )
    out = planner.plan(spec, FP, [s0, client], NODES, NOW, names(), None, avoid={"s0"})
    assert out.empty, out


def test_no_free_name_creates_nothing_this_pass():
    spec = make_spec(replicas=3)
    out = planner.plan(spec, FP, [seed_pod("s0")], NODES, NOW, lambda: None)
    assert out.create == []


def test_storage_backoff_doubles_up_to_the_cap_and_resets():
    b = Backoff(base=2, cap=10)
    assert not b.holding(NOW) and b.problem() is None
    delays = []
    for i in range(5):
        b.failed("no such directory /models/typo", NOW + i)
        delays.append(b.delay())
    assert delays == [2, 4, 8, 10, 10]
    assert b.holding(NOW + 4 + 9) and not b.holding(NOW + 4 + 10)
    reason, message = b.problem()
    assert reason == "StorageLoadFailing" and "/models/typo" in message and "5 storage load" in message
    b.observe_generation(7)  # a changed spec is tried at once
    assert b.failures == 0 and not b.holding(NOW + 5)
