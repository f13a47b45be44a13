"""The time-to-Ready breakdown arithmetic (pure; no cluster)."""

from __future__ import annotations

import pytest

from seedfork_localdev.timetoready import breakdown, percentile, summary


def test_breakdown_splits_creation_to_ready():
    seen = {"created": 100.0, "scheduled": 100.1, "running": 100.3, "ready": 104.0}
    timing = {"started": 102.0, "transferStart": 102.5, "transferEnd": 103.0, "verified": 103.2, "bytes": 42}
    b = breakdown("p", "seed-0", seen, timing, {"attach_ms": 100.0, "verify_ms": 50.0})
    assert b.total == pytest.approx(4.0)
    assert b.schedule == pytest.approx(0.1)
    assert b.start == pytest.approx(0.2)
    assert b.process_start == pytest.approx(1.7)
    assert b.handshake == pytest.approx(0.5)
    assert b.transfer == pytest.approx(0.5)
    assert b.verify == pytest.approx(0.2)
    assert b.attach == pytest.approx(0.15)
    assert b.ready_lag == pytest.approx(0.65)  # 104.0 - 103.2 - attach
    # overhead = total - transfer - verify - attach
    assert b.overhead == pytest.approx(4.0 - 0.5 - 0.2 - 0.15)
    assert b.control_plane == pytest.approx(4.0 - 0.5 - 0.2 - 0.15 - 1.7)  # less the process start
    assert b.bytes == 42


def test_missing_milestones_give_none_not_zero():
    b = breakdown("p", "storage", {"created": 1.0}, {})
    assert b.total is None and b.transfer is None and b.overhead is None and b.attach is None
    assert b.control_plane is None


def test_percentile_is_nearest_rank():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 99) == 5.0  # with few samples p99 is the maximum
    assert percentile([], 50) is None
    rows = [
        breakdown(f"p{i}", "s", {"created": 0.0, "ready": float(i)}, {"transferStart": 0.0, "transferEnd": 0.0})
        for i in (1, 2, 3)
    ]
    assert summary(rows)["total"] == {"p50": 2.0, "p99": 3.0, "max": 3.0, "n": 3}
