"""Standby pods in the planner: promotion on scale-up, refill, replacement, never counted or seeded. Pure."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from pydantic import ValidationError

from seedfork_api.contract import AgentReport, Assignment
from seedfork_api.spec import ModelReplicaSetSpec
from seedfork_operator import planner, status
from seedfork_operator.podview import PodView
from seedfork_operator.standby import plan_standby

FP = "f" * 16
NOW = 1_000_000.0


def spec(replicas=1, standby=1, engine="reference") -> ModelReplicaSetSpec:
    return ModelReplicaSetSpec.model_validate(
        {
            "replicas": replicas,
            "standby": standby,
            "model": {"name": "m", "uri": "/m"},
            "engine": {"kind": engine},
        }
    )


def seed(name: str, created: float = 1.0) -> PodView:
    a = Assignment(attempt=1, source="storage", assigned_at=NOW - 100)
    r = AgentReport(attempt=1, state="verified", serving=True)
    return PodView(name=name, created=created, ip="127.0.0.2", fingerprint=FP, ready=True, gate=True,
                   assignment=a, report=r)  # fmt: skip


def standby(name: str, created: float = 2.0, state: str | None = "standby", error: str | None = None) -> PodView:
    a = Assignment(attempt=1, source="standby", assigned_at=NOW - 50)
    r = AgentReport(attempt=1, state=state, source="standby", error=error) if state else None
    return PodView(name=name, created=created, ip="127.0.0.3", fingerprint=FP, assignment=a, report=r)


def names():
    counter = itertools.count()
    return lambda: f"new-{next(counter)}"


def run(s, pods):
    return planner.plan(s, FP, pods, {}, NOW, names())


def test_new_set_creates_its_standby_after_its_replica():
    p = run(spec(replicas=1, standby=2), [])
    assert [(n, a.source) for n, a in p.create] == [("new-0", "storage"), ("new-1", "standby"), ("new-2", "standby")]
    assert p.promoted == []


def test_standby_is_no_replica_nothing_to_do_when_both_counts_hold():
    p = run(spec(replicas=1, standby=1), [seed("s"), standby("w")])
    assert p.empty and p.promoted == []


def test_scale_up_promotes_the_warm_standby_onto_the_seed_and_refills():
    pods = [seed("s"), standby("cold", created=1.5, state="pending"), standby("warm", created=3.0)]
    p = run(spec(replicas=2, standby=2), pods)
    assert p.promoted == ["warm"]  # warm before older-but-cold
    ((name, a),) = p.assign
    assert (name, a.source, a.seed_pod, a.attempt, a.promotes) == ("warm", "seed", "s", 2, True)
    assert p.create == []  # the refill waits: a new engine's start would compete with the promotion
    assert [ch.why for ch in p.choices] == ["promote"]

    loading = replace(pods[2], assignment=a, report=AgentReport(attempt=2, state="transferring", source="seed"))
    assert run(spec(replicas=2, standby=2), [pods[0], pods[1], loading]).create == []
    verified = replace(loading, report=AgentReport(attempt=2, state="verified", source="seed", serving=True))
    assert not run(spec(replicas=2, standby=2), [pods[0], pods[1], verified]).create  # gate and probe to go
    done = replace(verified, gate=True, ready=True)
    p = run(spec(replicas=2, standby=2), [pods[0], pods[1], done])
    assert [(n, a.source) for n, a in p.create] == [("new-0", "standby")]
    stuck = replace(verified, assignment=a.model_copy(update={"assigned_at": NOW - 301}))  # past the timeout
    assert [(n, a.source) for n, a in run(spec(replicas=2, standby=2), [pods[0], pods[1], stuck]).create] == [
        ("new-0", "standby")
    ]
    failed = replace(loading, report=AgentReport(attempt=2, state="failed", source="seed", error="x"))
    p = run(spec(replicas=2, standby=2), [pods[0], pods[1], failed])
    assert ("new-0", "standby") in [(n, a.source) for n, a in p.create]  # a failed promotion holds nothing
    assert all(not a.promotes for n, a in p.assign)  # its retry is a plain retry


def test_scale_up_beyond_the_standbys_promotes_all_and_creates_the_rest():
    p = run(spec(replicas=3, standby=1), [seed("s"), standby("w")])
    assert p.promoted == ["w"]
    assert [a.source for _, a in p.create] == ["queued"]  # the one new replica; the refill after the promotion
    assert [(n, a.promotes) for n, a in p.assign] == [("w", True)]


def test_promotion_without_a_seed_loads_storage_into_the_warm_engine():
    p = run(spec(replicas=1, standby=1), [standby("w")])
    assert p.promoted == ["w"]
    assert [(n, a.source) for n, a in p.assign] == [("w", "storage")]


def test_a_standby_is_never_a_seed_even_if_a_report_says_serving():
    odd = PodView(name="odd", created=1.0, ip="127.0.0.4", fingerprint=FP, ready=True, gate=True,
                  assignment=Assignment(attempt=1, source="standby"),
                  report=AgentReport(attempt=1, state="verified", serving=True))  # fmt: skip
    assert not planner.can_seed(spec(), FP, odd)
    p = run(spec(replicas=1, standby=1), [odd])
    assert all(a.seed_pod != "odd" for _, a in p.assign + p.create)


def test_failed_standby_is_deleted_and_refilled():
    p = run(spec(replicas=1, standby=1), [seed("s"), standby("dead", state="failed", error="engine stopped answering")])
    assert p.delete == [("dead", "standby failed: engine stopped answering")]
    assert [(n, a.source) for n, a in p.create] == [("new-0", "standby")]
    assert p.promoted == []


def test_failed_standby_is_not_promoted():
    pods = [seed("s"), standby("dead", state="failed", error="x"), standby("ok", created=9.0)]
    p = run(spec(replicas=2, standby=1), pods)
    assert p.promoted == ["ok"]


def test_scale_down_deletes_replicas_never_the_standby():
    pods = [seed("a", created=1.0), seed("b", created=2.0), standby("w", created=3.0)]
    p = run(spec(replicas=1, standby=1), pods)
    assert [n for n, _ in p.delete] == ["b"]
    assert not p.create


def test_fewer_standbys_wanted_deletes_the_coldest_newest_first():
    pods = [seed("s"), standby("w1", created=2.0), standby("cold", created=1.0, state="pending"),
            standby("w2", created=5.0)]  # fmt: skip
    p = run(spec(replicas=1, standby=1), pods)
    assert sorted(n for n, _ in p.delete) == ["cold", "w2"]


def test_plan_standby_alone():
    out = plan_standby([standby("a"), standby("b", created=1.0, state=None)], wanted=2, missing_replicas=1)
    assert [p.name for p in out.promote] == ["a"] and out.create == 1 and out.delete == []


def test_status_counts_standbys_apart_from_replicas():
    s = spec(replicas=1, standby=2)
    pods = [seed("s"), standby("w"), standby("c", state="pending")]
    st = status.compute_status(spec=s, fingerprint=FP, pods=pods, old={}, generation=1, selector="x",
                               token_secret="t", counts={}, degraded=None, now=NOW)  # fmt: skip
    assert (st["replicas"], st["readyReplicas"], st["standby"], st["standbyWarm"], st["seeds"]) == (1, 1, 2, 1, 1)
    progressing = next(c for c in st["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "True" and "1/2 standbys warm" in progressing["message"]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_model_accepts_standby_for_any_engine_admission_is_cel(engine):
    # The pydantic model carries the field; the engine restriction is the CRD's CEL rule (tests/cluster).
    assert spec(engine=engine, standby=1).standby == 1


def test_standby_bounds():
    with pytest.raises(ValidationError, match="standby"):
        spec(standby=-1)
    with pytest.raises(ValidationError, match="standby"):
        spec(standby=101)
