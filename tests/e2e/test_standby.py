"""A warm standby promoted end to end: real apiserver, operator process, pod runner, agent and reference engine.

The standby's engine is up before the scale request and holds no weights; the promotion assigns it a seed,
its agent pulls and verifies, the running engine attaches and re-checks every tensor, and only then is the
pod Ready. A new standby refills. The fault cases (seed killed mid-transfer, corrupted seed, operator
restarted mid-promotion) against promoted standbys run in test_faults.py.
"""

from __future__ import annotations

import pytest

from seedfork_localdev.manifests import reference_set_body
from seedfork_localdev.scenario import engine_info, generate_all
from seedfork_localdev.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

STEP = 150.0


def test_scale_up_promotes_the_warm_standby_and_refills(scenario, tiny_model):
    s = scenario
    s.rset.create(reference_set_body("llama", tiny_model, replicas=1, standby=1))
    (seed,) = s.rset.wait_ready(1, STEP, standby=1)
    (spare,) = [r for r in s.rset.rows() if r.standby and not r.deleting]
    token = s.rset.token()
    before = engine_info(spare, token)
    assert before["state"] == "waiting" and before["mode"] == "none"  # warm, no weights
    assert not spare.ready and spare.timing.get("standbyWarm") and spare.timing.get("engineUp")
    assert s.rset.status().get("standbyWarm") == 1 and s.rset.status().get("replicas") == 1

    s.rset.scale(2)
    rows = s.rset.wait_ready(2, STEP, standby=1)
    promoted = next(r for r in rows if r.name == spare.name)
    assert (promoted.source, promoted.seed_pod, promoted.attempt) == ("seed", seed.name, 2)
    assert promoted.state == "verified" and promoted.ready
    after = engine_info(promoted, token)
    # The same engine process that waited warm now serves the attached, re-checked weights.
    assert after["phases"]["started"] == before["phases"]["started"], (before, after)
    assert after["mode"] == "attach" and after["state"] == "ready"
    assert s.tracker.violations == []
    t = wait_until(lambda: (r := next(x for x in s.rset.rows() if x.name == spare.name)).timing.get("engineVerified")
                   and r.timing, 30, "the engine's verification in the pod timing")  # fmt: skip
    assert t["engineUp"] < t["assigned"] <= t["transferStart"] < t["verified"] <= t["engineVerified"], t
    outputs = generate_all(rows, token)
    assert len(set(outputs.values())) == 1, outputs
    (refill,) = [r for r in s.rset.rows() if r.standby and not r.deleting]
    assert refill.name not in (seed.name, spare.name) and refill.warm
    status = s.rset.status()
    assert (status["replicas"], status["readyReplicas"], status["standby"], status["standbyWarm"]) == (2, 2, 1, 1)
