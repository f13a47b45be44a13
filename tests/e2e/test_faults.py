"""bench/faults.py's matrix at N=1 for the faults the agent bounds: a killed cohort client and a flood of
group inits that never join; and the faults against promoted standbys (seed killed mid-transfer, corrupted
seed, operator restarted mid-promotion) and a standby whose engine dies. The same functions the benchmark
runs, on the session's control plane: no pod Ready on bad weights, no attempt beyond the set's timeout, the set
recovered."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def faults():
    spec = importlib.util.spec_from_file_location("seedfork_bench_faults", REPO / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(faults, tmp_path_factory):
    return faults.models(tmp_path_factory.mktemp("fault-models"))


STANDBY_FAULTS = [
    "promoted_seed_killed_during_transfer",
    "promoted_from_corrupted_seed",
    "operator_restarted_mid_promotion",
    "standby_engine_killed",
]


@pytest.mark.parametrize("fault", ["cohort_client_killed", "flood_of_never_joining_inits", *STANDBY_FAULTS])
def test_fault_recovers_without_bad_weights_or_stalls(faults, models, fault, api_client, control_plane, crd, tmp_path):
    run = faults.run_one(control_plane, api_client, tmp_path, fault, 0, models, timeout_s=60)
    assert run.error is None, run
    assert run.recovered, run
    assert run.bad_ready == [], run
    assert run.stalls == [], run
    assert run.extra_pods == 0, run
    if fault in STANDBY_FAULTS:  # the standby was promoted (or replaced, then its successor promoted)
        assert run.detail["standby"] in {p["pod"] for p in run.detail["pods"] if p["source"] != "standby"}, run
        assert sum(p["source"] == "standby" and p["state"] == "standby" for p in run.detail["pods"]) == 1, run
