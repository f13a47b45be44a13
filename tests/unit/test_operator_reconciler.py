"""The reconciler's expectations: its own writes count before the watch delivers them (no double actions)."""

from __future__ import annotations

from seedfork_api.contract import Assignment
from seedfork_operator.config import OperatorConfig
from seedfork_operator.podview import PodView
from seedfork_operator.reconciler import EXPECTATION_TTL, SetReconciler


def reconciler() -> SetReconciler:
    return SetReconciler(kube=None, config=OperatorConfig(), namespace="ns", name="s", uid="u")


def test_own_writes_shadow_a_lagging_index_until_it_catches_up():
    r = reconciler()
    a1 = Assignment(attempt=1, source="storage", assigned_at=0)
    a2 = Assignment(attempt=2, source="storage", assigned_at=0)
    r.created["new"] = (100.0, PodView(name="new", assignment=a1))
    r.deleted["old"] = 100.0
    r.assigned["retry"] = (100.0, a2)
    r.gating["done"] = 100.0
    index = [
        PodView(name="old"),
        PodView(name="retry", assignment=a1),
        PodView(name="done", assignment=a1),
    ]
    pods = {p.name: p for p in r._with_expectations(index, 101.0)}
    assert set(pods) == {"old", "retry", "done", "new"}  # the created pod counts already
    assert pods["old"].deleting and pods["retry"].assignment.attempt == 2 and pods["done"].gate

    caught_up = [
        PodView(name="new", assignment=a1),
        PodView(name="retry", assignment=a2),
        PodView(name="done", assignment=a1, gate=True),
    ]
    pods = {p.name: p for p in r._with_expectations(caught_up, 102.0)}
    assert set(pods) == {"new", "retry", "done"}
    assert not (r.created or r.deleted or r.assigned or r.gating)


def test_expectations_expire():
    r = reconciler()
    r.created["ghost"] = (0.0, PodView(name="ghost"))
    r.gating["p"] = 0.0
    pods = r._with_expectations([PodView(name="p")], EXPECTATION_TTL + 1)
    assert [p.name for p in pods] == ["p"] and not pods[0].gate
