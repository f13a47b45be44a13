"""The cluster's transfer defaults (chart value transferDefaults): applied where a set leaves a field unset."""

from __future__ import annotations

import dataclasses

import pytest

from seedfork_api import spec as api

from .conftest import verify_at_once
from .test_operator_scaling import assigned

pytestmark = pytest.mark.cluster


@pytest.fixture
def operator_config(operator_config):
    policy = api.TransferSpec.model_validate({"backend": "nccl", "maxClientsPerSeed": 1, "retries": 5})
    return dataclasses.replace(operator_config, transfer_defaults=policy)


def test_unset_fields_take_the_cluster_default_and_set_ones_win(operator, nodes, sets, wait):
    nodes.policy = verify_at_once
    sets.create("plain", replicas=1)  # no transfer policy at all
    sets.create("own", replicas=1, backend="transfer_engine")
    wait("both seeds ready", lambda: all(sum(v.ready for v in sets.views(n)) == 1 for n in ("plain", "own")))
    assert sets.get("plain")["spec"]["transfer"].get("backend") is None  # the stored spec stays as written
    sets.scale("plain", 3)
    sets.scale("own", 2)
    plain = wait("3 assigned", lambda: assigned(sets, "plain", 3))
    own = wait("2 assigned", lambda: assigned(sets, "own", 2))
    from_seed = [v.assignment for v in plain if v.assignment.source == "seed"]
    assert from_seed and all(a.backend == "nccl" for a in from_seed)  # the cluster's backend
    assert all(v.assignment.backend == "transfer_engine" for v in own if v.assignment.source == "seed")
    wait("status shows the resolved backend", lambda: sets.get("plain")["status"].get("backend") == "nccl")
    wait("... and the set's own", lambda: sets.get("own")["status"].get("backend") == "transfer_engine")
