"""The added pod's startup phases (pure; no cluster): which clock each comes from, and what is left out."""

from __future__ import annotations

import pytest

from seedfork_localdev.startup import PHASES, phases_of, transfer_verify


def test_the_control_plane_after_the_proof_is_split_into_report_gate_and_ready():
    seen = {"created": 99.0, "verified": 100.40, "gate": 100.45, "ready": 100.47}  # the pod watch's marks
    timing = {"started": 99.5, "assigned": 100.01, "transferStart": 100.02, "verified": 100.2, "engineVerified": 100.3}
    engine = {"phases": {"started": 99.6, "up": 99.8, "attached": 100.25, "verified": 100.3}}
    got = phases_of(seen, timing, engine, after=100.0)
    assert list(got) == list(PHASES[:-1])  # every phase but the first token, which the caller times itself
    assert got["engine verified"] == pytest.approx(0.3)
    assert got["reported"] == pytest.approx(0.40)  # the watch's mark, not the agent's clock
    assert got["gated"] == pytest.approx(0.45)
    assert got["ready"] == pytest.approx(0.47)
    assert got["created"] == pytest.approx(-1.0)  # before the scale request: a standby's
    assert transfer_verify(timing, engine) == pytest.approx(0.18 + 0.05)


def test_a_milestone_never_seen_is_none_not_zero():
    got = phases_of({"created": 100.5}, {}, {}, after=100.0)
    assert got["created"] == pytest.approx(0.5)
    assert all(v is None for k, v in got.items() if k != "created")
    assert transfer_verify({"transferStart": 1.0, "verified": 2.0}, {}) is None
