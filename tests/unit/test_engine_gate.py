"""The engine gate: when an engine that loads from the agent's store has proved it holds the weights."""

from __future__ import annotations

import threading
import time

import pytest

from seedfork_agent.engines.gate import CHECKPOINT, ENGINE, EngineGate, EngineGateError, RankLayoutReport, RankReport


def report(rank: int, world: int = 2, manifest: str = "m" * 64, params: str | None = None) -> RankReport:
    return RankReport(rank, world, manifest, params or f"p{rank}" * 16, 100, 7, started_at=1.0)


def test_a_pod_whose_engine_maps_an_engine_store_publishes_what_its_engine_holds():
    gate = EngineGate(2)
    gate.open("m" * 64, None, ENGINE)
    assert gate.report(report(0)) is None
    with pytest.raises(EngineGateError, match=r"ranks \[1\] did not report"):
        gate.wait(0.05)  # one rank is not enough
    assert gate.report(report(1)) is None
    assert set(gate.wait(1)) == {0, 1}
    assert gate.published == {0: "p0" * 16, 1: "p1" * 16}


def test_a_seeded_pod_must_hold_the_seeds_parameters_rank_by_rank():
    gate = EngineGate(2)
    gate.open("m" * 64, {0: "p0" * 16, 1: "p1" * 16}, ENGINE)
    assert gate.report(report(0)) is None
    reason = gate.report(report(1, params="x" * 32))
    assert reason is not None and "rank 1 holds parameters" in reason and "the seed's engine holds" in reason
    with pytest.raises(EngineGateError, match="rank 1 holds parameters"):
        gate.wait(5)  # ends at once: no need to wait for the timeout
    assert gate.published == {}


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (report(0, manifest="n" * 64), "read weights with manifest digest"),
        (report(0, world=4), "world size 4"),
    ],
)
def test_an_engine_that_read_other_bytes_or_runs_another_layout_is_refused(bad, match):
    gate = EngineGate(2)
    gate.open("m" * 64, None, ENGINE)
    assert match in gate.report(bad)
    with pytest.raises(EngineGateError, match=match):
        gate.wait(5)


def test_a_failing_rank_ends_the_wait_at_once():
    gate = EngineGate(1)
    gate.open("m" * 64, None, ENGINE)
    threading.Timer(0.1, gate.fail, args=(0, "the weights left 1 parameters unset")).start()
    t0 = time.monotonic()
    with pytest.raises(EngineGateError, match="engine rank 0: the weights left 1 parameters unset"):
        gate.wait(30)
    assert time.monotonic() - t0 < 5


def test_a_restarted_engine_of_a_verified_pod_must_meet_what_the_pod_published():
    gate = EngineGate(1)
    gate.open("m" * 64, None, ENGINE)
    gate.report(report(0, world=1))
    gate.wait(1)
    assert gate.report(report(0, world=1)) is None
    assert "this pod published" in gate.report(report(0, world=1, params="z" * 32))
    assert gate.published == {0: "p0" * 16}  # the pod stays what it was; only the restarted engine is refused


def test_nothing_is_accepted_before_an_attempt_offers_weights_or_after_it_closed():
    gate = EngineGate(1)
    assert "no verified weights" in gate.report(report(0, world=1))
    gate.open("m" * 64, None, ENGINE)
    gate.close()
    assert "no verified weights" in gate.report(report(0, world=1))


def test_the_seeds_digests_must_cover_every_rank():
    with pytest.raises(EngineGateError, match="ranks"):
        EngineGate(2).open("m" * 64, {0: "p"}, ENGINE)


GOOD = {"rank": 0, "worldSize": 1, "manifestDigest": "m", "paramsDigest": "p", "paramBytes": 1, "loadedTensors": 1}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "JSON object"),
        ({"rank": "0"}, "rank must be an integer"),
        ({"rank": True}, "rank must be an integer"),
        ({"rank": 0, "worldSize": 1, "manifestDigest": 3}, "manifestDigest must be a string"),
        ({**GOOD, "rank": 2}, "rank must lie"),
        ({**GOOD, "startedAt": "x"}, "startedAt"),
    ],
)
def test_malformed_reports_name_the_field(body, field):
    with pytest.raises(ValueError, match=field):
        RankReport.from_json(body)


def test_a_well_formed_report_parses():
    assert RankReport.from_json({**GOOD, "startedAt": 5}) == RankReport(0, 1, "m", "p", 1, 1, started_at=5.0)
    assert RankReport.from_json({**GOOD, "privateBytes": 9}).private_bytes == 9
    with pytest.raises(ValueError, match="privateBytes"):
        RankReport.from_json({**GOOD, "privateBytes": -1})


def test_an_engine_container_that_exits_while_the_agent_waits_ends_the_attempt_at_once():
    from seedfork_agent.engines.gate import EngineWatch

    gate = EngineGate(1)
    gate.open("m" * 64, None, ENGINE)
    statuses = iter([{"engine": (0, False)}, {"engine": (0, False)}, {"engine": (0, True)}])
    watch = EngineWatch()
    t0 = time.monotonic()
    with pytest.raises(EngineGateError, match="engine exited before it proved its load: container engine terminated"):
        gate.wait(30, lambda: watch.exited(next(statuses)), poll_s=0.01)
    assert time.monotonic() - t0 < 5


def test_only_an_engine_seen_running_in_this_attempt_counts_as_exited():
    from seedfork_agent.engines.gate import EngineWatch

    watch = EngineWatch()
    # The instance that failed the previous attempt: still terminated, then restarted late by the kubelet.
    assert watch.exited({"engine": (1, True)}) is None
    assert watch.exited({"engine": (2, False)}) is None  # its replacement runs: this one will report
    assert watch.exited({"engine": (2, False)}) is None
    assert watch.exited({"engine": (3, False)}) == "container engine restarted (3 restarts)"


def test_a_report_that_arrives_wins_over_a_status_read():
    gate = EngineGate(1)
    gate.open("m" * 64, None, ENGINE)
    gate.report(report(0, world=1))
    assert set(gate.wait(1, lambda: "container engine terminated")) == {0}  # it proved its load, then exited


def layout(rank: int, world: int = 2, manifest: str = "m" * 64) -> RankLayoutReport:
    return RankLayoutReport(rank, world, manifest, [("w", "float32", (2, 2))])


def test_a_checkpoint_load_reports_layouts_then_fills_the_engine_store():
    gate = EngineGate(2)
    gate.open("m" * 64, None, CHECKPOINT)
    # A rank that skips the layout step would leave the pod holding the checkpoint beside its parameters.
    assert "must report its layout first" in gate.report(report(0, manifest="m" * 64))
    gate.open("m" * 64, None, CHECKPOINT)
    assert gate.layout(layout(0)) is None
    with pytest.raises(EngineGateError, match=r"ranks \[1\] did not report their layout"):
        gate.wait_layouts(0.05)
    assert gate.layout(layout(1)) is None
    assert gate.wait_layouts(1) == {0: [("w", "float32", (2, 2))], 1: [("w", "float32", (2, 2))]}
    gate.fill("f" * 64)
    assert "manifest digest" in gate.report(report(0, manifest="m" * 64))  # the checkpoint is no longer offered
    # The refusal above failed the attempt; a new one starts over.
    gate.open("m" * 64, None, CHECKPOINT)
    gate.layout(layout(0)), gate.layout(layout(1))
    gate.wait_layouts(1)
    gate.fill("f" * 64)
    assert gate.phase == "fill"
    assert gate.report(report(0, manifest="f" * 64)) is None and gate.report(report(1, manifest="f" * 64)) is None
    assert set(gate.wait(1)) == {0, 1}
    gate.settle("s" * 64)  # checksummed and served: a restarted engine maps it and must meet what was published
    assert gate.phase == ENGINE
    assert gate.report(report(0, manifest="s" * 64)) is None
    assert "this pod published" in gate.report(report(0, manifest="s" * 64, params="z" * 32))


def test_a_layout_with_the_wrong_checkpoint_or_outside_a_checkpoint_load_is_refused():
    gate = EngineGate(1)
    gate.open("m" * 64, None, CHECKPOINT)
    assert "manifest digest" in gate.layout(layout(0, world=1, manifest="n" * 64))
    with pytest.raises(EngineGateError, match="manifest digest"):
        gate.wait_layouts(5)
    gate.open("m" * 64, None, ENGINE)
    assert "the offered store is engine" in gate.layout(layout(0, world=1))
    with pytest.raises(EngineGateError, match="filled after a checkpoint load"):
        gate.fill("f" * 64)


@pytest.mark.parametrize(
    ("tensors", "field"),
    [
        (None, "non-empty list"),
        ([["w", "float32"]], r"\[name, dtype, shape\]"),
        ([["w", "float32", [2]], ["w", "float32", [2]]], "unique"),
        ([["w", "complex7", [2]]], "unknown dtype"),
        ([["w", "float32", [-1]]], "non-negative"),
        ([["w", "float32", [True]]], "non-negative"),
    ],
)
def test_malformed_layouts_name_the_field(tensors, field):
    with pytest.raises(ValueError, match=field):
        RankLayoutReport.from_json({"rank": 0, "worldSize": 1, "manifestDigest": "m", "tensors": tensors})


def test_a_standby_offers_nothing_and_accepts_nothing_until_its_promotion_opens_an_engine_store():
    from seedfork_agent.engines.gate import STANDBY

    gate = EngineGate(1)
    gate.standby()
    assert gate.phase == STANDBY and not gate.is_open
    assert "no verified weights" in gate.report(report(0, world=1))  # a warm engine cannot claim weights
    gate.standby()
    gate.open("m" * 64, {0: "p0" * 16}, ENGINE)  # promoted: the pulled store, the seed's digests
    assert gate.report(report(0, world=1)) is None
    assert set(gate.wait(1)) == {0}
