"""A stock SGLang client (SGLang 0.5.23's own code) asking a seedfork seed: refused, and failed at once.

Stock SGLang clients and seeds do not interoperate with seedfork agents (docs/sglang.md, "Stock SGLang"):
the client sends no token, and moves SGLang's fused, sharded parameters where the agent serves checkpoint
tensors. What matters is that such a client fails at once with a reason instead of waiting 30 minutes in
a rendezvous that never completes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.sglang

_spec = importlib.util.spec_from_file_location("sglang_tier", Path(__file__).parents[1] / "sglang" / "conftest.py")
tier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tier)


def test_stock_nccl_client_fails_at_once(kit, agents, weights_dir):
    seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    seed.wait_ready()
    port = kit.new_port()
    # What the client's init request gets (SGLang never reads it): 401 with the reason.
    probe = {"master_address": "10.255.0.1", "ports": str(port), "group_rank": 0, "world_size": 2,
             "group_name": "send_weights_x", "backend": "nccl"}  # fmt: skip
    r = httpx.post(f"http://{ip}:{kit.AGENT_PORT}/init_weights_send_group_for_remote_instance", json=probe)
    assert r.status_code == 401 and r.json()["success"] is False and "bearer token" in r.json()["message"]

    answer = tier.run(
        "stock_client",
        {"seed_ip": ip, "seed_port": kit.AGENT_PORT, "ports": [port], "client_ip": kit.new_ip()},
        timeout=300,
    )
    # SGLang's group join waits up to its 30-minute default; the agent ends it well within the store's wait.
    assert answer["outcome"] != "joined"
    assert "closed" in answer["outcome"] or "reset" in answer["outcome"], answer
