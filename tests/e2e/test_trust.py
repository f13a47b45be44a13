"""End to end: a seed whose memory goes bad after it verified is caught by its first client and taken out.

Real pods on the local pod runner: the seed's store is corrupted in place (one flipped byte, as a bad DIMM
would), a scale-out sends a client to it, the client's checksums fail, the seed checks its own store, stops
serving and is replaced; no pod is ever Ready on the bad bytes and the set ends on the digest it started with.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from seedfork_agent.store import Manifest, attach
from seedfork_api.contract import ERR_SELF_CHECK_FAILED
from seedfork_localdev.manifests import reference_set_body
from seedfork_localdev.scenario import generate_all, model_bytes

from .test_scale_out import STEP, assert_verified_everywhere

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]


def corrupt_one_byte(row, token: str) -> str:
    r = httpx.get(f"http://{row.ip}:18080/v1/attach", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    r.raise_for_status()
    body = r.json()
    tensors = attach(body["attach"], Manifest.from_dict(body["manifest"]))
    name = sorted(tensors)[1]
    tensors[name].view(-1).view(torch.uint8)[3] ^= 0x10
    return name


def test_a_corrupted_seed_is_caught_by_its_client_and_replaced(scenario, tiny_model):
    s = scenario
    s.rset.create(reference_set_body("llama", tiny_model, backend="transfer_engine", replicas=1))
    (seed,) = s.rset.wait_ready(1, STEP)
    digest = s.rset.status()["weightsDigest"]
    assert digest and seed.report["digest"] == digest
    seed_uid = s.tracker.uids[seed.name]
    corrupt_one_byte(seed, s.rset.token())

    s.rset.scale(2)
    rows = s.rset.wait_ready(2, STEP)
    assert seed_uid not in {s.tracker.uids[r.name] for r in rows}  # the bad seed was replaced
    events = [(e.reason, e.message) for e in s.rset.core.list_namespaced_event(s.namespace).items]
    assert any(r == "PodDeleted" and ERR_SELF_CHECK_FAILED in m for r, m in events), events
    # The only pod ever seen Ready without verified weights is the seed between its failed self-check and its
    # readiness gate being cleared: its bytes were verified once and went bad in memory afterwards.
    assert all(ERR_SELF_CHECK_FAILED in v for v in s.tracker.violations), s.tracker.violations
    s.tracker.violations.clear()
    assert_verified_everywhere(s, rows, model_bytes(tiny_model))
    assert all(r.report["digest"] == digest for r in rows)
    assert s.rset.status()["weightsDigest"] == digest
    assert len(set(generate_all(rows, s.rset.token()).values())) == 1
