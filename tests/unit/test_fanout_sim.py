"""bench/fanout_sim.py at small N: the real planner against the baselines in simulated time.

Asserts the fan-out's properties (who loads from storage, how the set grows, the storage fan-in limit), in
simulated seconds from one deterministic run; no wall-clock time is measured.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("fanout_sim", REPO / "bench" / "fanout_sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fanout_sim"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [10, 30])
def test_one_seed_to_n(sim, n):
    size, links = 140 * sim.GB, sim.Links()
    rows = {p: sim.simulate(p, 1, n, size, links) for p in sim.POLICIES}
    # the old rule: four pods share the seed, everyone else reads storage (the 96 of 100)
    assert rows["legacy"]["storage_loads"] == n - 4
    # by expected time: nobody reads storage while a seed is sooner, and the set doubles every transfer
    for p in ("planner", "planner-nccl"):
        assert rows[p]["storage_loads"] == 0 and rows[p]["storage_bytes"] == 0 and rows[p]["peak_storage_readers"] == 0
    doublings = math.ceil(math.log2(n + 1))
    assert rows["planner"]["transfer_times"] <= doublings + 0.01
    # an NCCL cohort serves maxClientsPerSeed (4) at once: the set grows fivefold per broadcast
    assert rows["planner-nccl"]["transfer_times"] <= math.ceil(math.log(n + 1, 5)) * sim.COHORT_FACTOR + 0.01
    assert rows["planner-nccl"]["all_verified_s"] < rows["planner"]["all_verified_s"]
    slowest_baseline = min(rows[p]["all_verified_s"] for p in ("storage-only", "one-by-one", "legacy"))
    assert rows["planner"]["all_verified_s"] < slowest_baseline
    assert rows["one-by-one"]["transfer_times"] == pytest.approx(n)


def test_storage_fan_in_limit_holds_when_storage_is_the_faster_path(sim):
    """Storage faster than a seed transfer (a slow NIC): the planner reads storage, but never more than
    maxConcurrentStorageLoads at once, however large the burst."""
    links = sim.Links(nic=1.0 * sim.GB)
    row = sim.simulate("planner", 1, 20, 16 * sim.GB, links, {"maxConcurrentStorageLoads": 3})
    assert row["storage_loads"] > 0 and row["peak_storage_readers"] <= 3
    legacy = sim.simulate("legacy", 1, 20, 16 * sim.GB, links)
    assert legacy["peak_storage_readers"] == 16


def test_sets_share_storage_but_plan_alone(sim):
    rows = {p: sim.simulate(p, 3, 10, 140 * sim.GB, sim.Links()) for p in ("legacy", "planner")}
    assert rows["legacy"]["peak_storage_readers"] == 18 and rows["planner"]["storage_loads"] == 0


def test_from_nothing_the_fan_in_limit_loads_two_and_seeds_the_rest(sim):
    size, links = 140 * sim.GB, sim.Links()
    planned = sim.simulate("planner", 1, 30, size, links, seeded=False)
    legacy = sim.simulate("legacy", 1, 30, size, links, seeded=False)
    assert planned["storage_loads"] == planned["peak_storage_readers"] == 2  # maxConcurrentStorageLoads default
    assert legacy["storage_loads"] == legacy["peak_storage_readers"] == 30
    assert planned["all_verified_s"] < legacy["all_verified_s"]
