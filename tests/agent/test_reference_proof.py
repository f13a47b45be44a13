"""The reference engine proves what it attached before its pod's agent reports the weights verified.

A pod's readiness gate turns True on the agent's ``verified``; with the engine's proof in front of it, the gate
stands for the weights inside the engine, and the engine's own probe need only say that it is up (a promoted
standby turns Ready when the gate does, not one probe period later).

The real ``AgentServer`` with the gate a reference-engine pod's agent has (``EngineGate(1,
engine_layout=False)``), its event loop in a thread; the real reference engine as a process attached to it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from seedfork_agent.engines.gate import EngineGate


@pytest.fixture
def gated(kit):
    """(agent, loop, http): an agent whose engine must prove its load, nothing loaded yet."""
    with kit.agent_in_thread(timeout_s=30, gate=EngineGate(1, engine_layout=False)) as (agent, loop):
        server = agent.server
        with httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=30) as http:
            http.headers["Authorization"] = f"Bearer {kit.TOKEN}"
            yield agent, loop, http


def _url(agent) -> str:
    return f"http://{agent.server.host}:{agent.server.port}"


def _load(agent, loop, model: Path, attempt: int = 1):
    """The agent's storage load, running on its loop (not awaited: it waits for the engine's proof)."""
    return asyncio.run_coroutine_threadsafe(agent.load_storage(str(model), attempt), loop)


def _offered(http: httpx.Client, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (r := http.get("/v1/attach")).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return r.json()


def test_the_agent_reports_verified_only_after_the_engines_proof(gated, engines, reference_model):
    agent, loop, http = gated
    loading = _load(agent, loop, reference_model)
    offered = _offered(http)  # the store is offered to the engine before the agent reports anything verified
    assert offered["layout"] == "engine"
    time.sleep(0.5)
    assert not loading.done() and agent.attempt.state != "verified"
    assert http.get("/readyz").status_code == 503
    engine = engines(reference_model, _url(agent))
    assert loading.result(60) is True, agent.attempt.report.error
    assert agent.attempt.state == "verified"
    r = httpx.post(f"{engine.url}/weights_checker", json={"action": "checksum"}, headers=engine.headers, timeout=10)
    assert agent.gate.published == {0: r.json()["per_engine_checksum"][0]}  # what it proved is what it holds
    assert engine.get("/health").status_code == 200


def test_a_proof_of_other_bytes_is_refused_and_fails_the_attempt(gated, reference_model):
    agent, loop, http = gated
    loading = _load(agent, loop, reference_model)
    offered = _offered(http)
    digest = offered["manifest"]["digest"]
    proof = {"rank": 0, "worldSize": 1, "paramsDigest": "p" * 64, "paramBytes": 1, "loadedTensors": 1}
    r = http.post("/v1/engine/report", json={**proof, "manifestDigest": "0" * len(digest)})
    assert r.status_code == 409 and "manifest digest" in r.json()["reason"]
    assert loading.result(30) is False
    assert agent.attempt.state == "failed" and "manifest digest" in agent.attempt.report.error
    assert http.get("/v1/attach").status_code == 503  # nothing is offered after the failure


def test_an_engine_whose_check_fails_tells_the_agent_and_exits(gated, engines, reference_model):
    agent, loop, http = gated
    loading = _load(agent, loop, reference_model)
    offered = _offered(http)
    name = offered["manifest"]["tensors"][0]["name"]
    offset = offered["manifest"]["tensors"][0]["offset"]
    agent.offered.buffer[offset] ^= 0x01  # the offered bytes change after the agent's own verification
    engine = engines(reference_model, _url(agent))
    assert engine.proc.wait(60) == 1  # it exits, so that its container restarts: never a wedged engine
    assert "checksum mismatch" in engine.output() and name in engine.output()
    assert loading.result(30) is False
    assert agent.attempt.state == "failed" and "checksum mismatch" in agent.attempt.report.error


def test_a_warm_standby_engine_is_up_without_weights_and_proves_its_promotion(gated, engines, reference_model):
    agent, loop, http = gated
    agent.attempt.standby(1)
    agent.gate.standby()
    assert http.get("/v1/attach").json()["layout"] == "standby"
    engine = engines(reference_model, _url(agent))
    engine.wait_up()
    deadline = time.monotonic() + 30
    while engine.get("/health").status_code != 200:  # warm: up, without weights
        assert time.monotonic() < deadline, engine.get("/health").text
        time.sleep(0.05)
    r = httpx.post(f"{engine.url}/generate", json={"input_ids": [1], "max_new_tokens": 1}, headers=engine.headers)
    assert r.status_code == 503  # nothing is computed without verified weights
    assert engine.get("/v1/engine").json()["state"] == "waiting"
    assert _load(agent, loop, reference_model, attempt=2).result(60) is True, agent.attempt.report.error
    r = httpx.post(f"{engine.url}/generate", json={"input_ids": [1], "max_new_tokens": 1}, headers=engine.headers)
    assert r.status_code == 200 and engine.get("/v1/engine").json()["state"] == "ready"
