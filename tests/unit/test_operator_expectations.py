"""The reconciler's expectations: its own writes count before the watch delivers them (no double actions)."""

from __future__ import annotations

from seedfork_api.contract import Assignment
from seedfork_operator.expectations import EXPECTATION_TTL, Expectations
from seedfork_operator.podview import PodView

A1 = Assignment(attempt=1, source="storage", assigned_at=0)
A2 = Assignment(attempt=2, source="storage", assigned_at=0)


def test_own_writes_shadow_a_lagging_index_until_it_catches_up():
    e = Expectations()
    e.expect_created("new", A1, 100.0)
    e.expect_deleted("old", 100.0)
    e.expect_assigned("retry", A2, 100.0)
    e.expect_gated("done", 100.0)
    index = [
        PodView(name="old"),
        PodView(name="retry", assignment=A1),
        PodView(name="done", assignment=A1),
    ]
    pods = {p.name: p for p in e.overlay(index, 101.0)}
    assert set(pods) == {"old", "retry", "done", "new"}  # the created pod counts already
    assert pods["old"].deleting and pods["retry"].assignment.attempt == 2 and pods["done"].gate
    assert pods["new"].assignment == A1 and pods["new"].created == 100.0  # as created, not yet Ready
    assert not pods["new"].ready

    caught_up = [
        PodView(name="new", assignment=A1),
        PodView(name="retry", assignment=A2),
        PodView(name="done", assignment=A1, gate=True),
    ]
    pods = {p.name: p for p in e.overlay(caught_up, 102.0)}
    assert set(pods) == {"new", "retry", "done"}
    assert not e.pending()


def test_expectations_expire():
    e = Expectations()
    e.expect_created("ghost", A1, 0.0)
    e.expect_gated("p", 0.0)
    pods = e.overlay([PodView(name="p")], EXPECTATION_TTL + 1)
    assert [p.name for p in pods] == ["p"] and not pods[0].gate


def test_an_expectation_holds_until_its_ttl_has_passed():
    e = Expectations()
    e.expect_created("new", A1, 0.0)
    e.expect_deleted("old", 0.0)
    index = [PodView(name="old")]
    pods = {p.name: p for p in e.overlay(index, EXPECTATION_TTL)}  # not older than the ttl yet
    assert set(pods) == {"old", "new"} and pods["old"].deleting
    pods = {p.name: p for p in e.overlay(index, EXPECTATION_TTL + 0.1)}
    assert set(pods) == {"old"} and not pods["old"].deleting and not e.pending()


def test_a_deletion_ends_when_the_pod_leaves_the_index():
    e = Expectations()
    e.expect_deleted("old", 100.0)
    assert e.overlay([], 101.0) == [] and not e.pending()
    # a pod of the same name made again later (a new pod in the freed slot) is not taken for the deleted one
    assert not e.overlay([PodView(name="old")], 102.0)[0].deleting


def test_an_older_assignment_in_the_index_does_not_end_a_newer_expected_one():
    e = Expectations()
    e.expect_assigned("p", A2, 100.0)
    for shown in (None, A1):  # the index has not caught up: no assignment, or the previous attempt's
        (pod,) = e.overlay([PodView(name="p", assignment=shown)], 101.0)
        assert pod.assignment == A2
    newer = Assignment(attempt=3, source="storage", assigned_at=0)
    (pod,) = e.overlay([PodView(name="p", assignment=newer)], 102.0)  # someone went further: the index wins
    assert pod.assignment == newer and not e.pending()


def test_expectations_of_a_pod_that_is_gone_end():
    e = Expectations()
    e.expect_assigned("p", A2, 100.0)
    e.expect_gated("q", 100.0)
    assert e.overlay([], 101.0) == [] and not e.pending()


def test_a_failed_create_is_not_expected():
    e = Expectations()
    e.expect_created("new", A1, 100.0)
    e.create_failed("new")
    assert e.overlay([], 101.0) == []


def test_a_created_pod_the_index_shows_is_not_counted_twice():
    e = Expectations()
    e.expect_created("new", A1, 100.0)
    pods = e.overlay([PodView(name="new", uid="u1", assignment=A1)], 101.0)
    assert [(p.name, p.uid) for p in pods] == [("new", "u1")]  # the index's view, once
