"""What the agent answers before its weights are verified, where a standby's promotion waits on it.

- ``GET /v1/attach?wait=S``: the pod's engine asks once and the agent answers when its weights are verified
  (without the hold an engine learns of them one poll interval late);
- ``/readyz`` of a warm standby passes, and keeps passing through its promotion until that fails (the pod's
  readiness gate keeps it from Ready; without this the pod turns Ready one probe period after the gate).

The real ``AgentServer`` over real HTTP on its own loopback IP, its event loop in a thread.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from seedfork_agent.agent import Agent
from seedfork_agent.server import ATTACH_WAIT_MAX_S
from seedfork_agent.store import WeightStore


@pytest.fixture
def agent(kit):
    """An agent's AgentServer with nothing verified yet, its event loop in a thread."""
    with kit.agent_in_thread(timeout_s=20) as (agent, loop):
        server = agent.server
        with httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=30) as http:
            http.headers["Authorization"] = f"Bearer {kit.TOKEN}"
            yield agent, loop, http


def _serve(agent: Agent, loop: asyncio.AbstractEventLoop, store: WeightStore) -> None:
    asyncio.run_coroutine_threadsafe(agent.adopt(store), loop)  # not awaited: the ask is held meanwhile


@pytest.mark.parametrize("look_s", [None, 60.0], ids=["its-look", "a-look-slower-than-the-wait"])
def test_a_held_ask_is_answered_with_the_store_once_it_is_verified(agent, weights_dir, monkeypatch, look_s):
    """With the fallback look slower than the ask's whole wait, only the agent's announcement of the change
    answers it within half that wait (before the announcement, an ask slept one look: up to 20 ms of a promotion)."""
    if look_s is not None:
        monkeypatch.setattr("seedfork_agent.server.ATTACH_WAIT_POLL_S", look_s)
    agent, loop, http = agent
    store = WeightStore.from_safetensors(str(weights_dir), "fp-test", "cpu")
    try:
        answers: list[httpx.Response] = []
        asked = threading.Thread(target=lambda: answers.append(http.get("/v1/attach", params={"wait": 20})))
        asked.start()
        time.sleep(0.5)  # the ask is held: nothing to attach yet
        assert not answers
        _serve(agent, loop, store)
        asked.join(10)  # half the ask's wait
        (r,) = answers
        assert r.status_code == 200, r.text
        assert r.json()["manifest"]["digest"] == store.manifest.digest
    finally:
        store.close()


def test_a_promoted_standbys_held_ask_is_woken_by_the_offer_to_its_engine(kit, weights_dir, monkeypatch):
    """A standby's engine holds its ask through the promotion; the agent offers the verified store to it (the
    gate then waits for the engine's proof). That offer changes no attempt state, so it must wake the ask itself."""
    from seedfork_agent.engines.gate import ENGINE, EngineGate

    monkeypatch.setattr("seedfork_agent.server.ATTACH_WAIT_POLL_S", 60.0)
    gate = EngineGate(1)
    gate.standby()
    store = WeightStore.from_safetensors(str(weights_dir), "fp-test", "cpu")
    with kit.agent_in_thread(timeout_s=20, gate=gate) as (agent, loop):
        server = agent.server
        url = f"http://{server.host}:{server.port}/v1/attach"
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {kit.TOKEN}"}) as http:
            assert http.get(url).json()["layout"] == "standby"
            answers: list[httpx.Response] = []
            asked = threading.Thread(target=lambda: answers.append(http.get(url, params={"wait": 20})))
            asked.start()
            time.sleep(0.5)
            assert not answers  # held: still a standby
            gate.open(store.manifest.digest, None, ENGINE)  # the promotion's verified pull
            finished = asyncio.run_coroutine_threadsafe(agent._finish(store), loop)
            asked.join(10)
            (r,) = answers
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["layout"] == ENGINE and body["manifest"]["digest"] == store.manifest.digest
            gate.fail(0, "the test's engine proves nothing")  # ends the gate's wait, and with it the attempt
            assert finished.result(30) is False
            assert "the test's engine proves nothing" in agent.attempt.report.error


def test_a_held_ask_ends_after_its_wait_when_nothing_changes(agent):
    _, _, http = agent
    t = time.monotonic()
    r = http.get("/v1/attach", params={"wait": 0.3})
    assert r.status_code == 503 and time.monotonic() - t >= 0.3


def test_without_wait_the_answer_is_immediate(agent):
    _, _, http = agent
    assert http.get("/v1/attach").status_code == 503


@pytest.mark.parametrize("wait", ["soon", "-1", str(ATTACH_WAIT_MAX_S + 1), "nan"])
def test_a_bad_wait_is_a_400(agent, wait):
    _, _, http = agent
    r = http.get("/v1/attach", params={"wait": wait})
    assert r.status_code == 400, r.text
    assert "wait" in r.text


def test_a_held_ask_needs_the_token(agent):
    _, _, http = agent
    r = http.get("/v1/attach", params={"wait": 5}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code in (401, 403)


def _set(loop: asyncio.AbstractEventLoop, fn) -> None:
    done = threading.Event()
    loop.call_soon_threadsafe(lambda: (fn(), done.set()))
    assert done.wait(10)


def test_readyz_passes_for_a_warm_standby_and_its_promotion_until_it_fails(agent):
    agent, loop, http = agent
    state = agent.attempt
    assert http.get("/readyz").status_code == 503  # no weights, no standby
    _set(loop, lambda: (state.standby(1), state.warm()))
    assert http.get("/readyz").status_code == 200
    _set(loop, lambda: state.begin(2, "seed", "transfer_engine"))  # promoted: pulling
    assert http.get("/readyz").status_code == 200
    _set(loop, lambda: state.fail("checksum mismatch"))  # the promotion failed
    r = http.get("/readyz")
    assert r.status_code == 503 and r.json()["state"] == "failed"
    _set(loop, lambda: state.begin(3, "storage"))  # the next attempt is no promotion of a warm engine
    assert http.get("/readyz").status_code == 503


def test_readyz_of_a_pod_that_was_never_a_standby_waits_for_verified_weights(agent, weights_dir):
    agent, loop, http = agent
    _set(loop, lambda: agent.attempt.begin(1, "storage"))
    assert http.get("/readyz").status_code == 503
    store = WeightStore.from_safetensors(str(weights_dir), "fp-test", "cpu")
    try:
        assert asyncio.run_coroutine_threadsafe(agent.adopt(store), loop).result(30)
        assert http.get("/readyz").status_code == 200
    finally:
        store.close()


def test_a_warm_vllm_standby_refuses_a_checkpoint_at_once_and_waits_for_a_seed_without_bound(kit, agent, weights_dir):
    """After every seed failed, a promoted standby's pod loads from storage: the agent offers a checkpoint.
    The warm engine cannot take one in place (only vLLM's own loader does), so its wait must end at once
    (the engine then restarts), not after the set's timeout with the agent waiting on it all along."""
    from seedfork_agent.engines.gate import CHECKPOINT, ENGINE, EngineGate
    from seedfork_agent.engines.vllm_loader import AgentLink, LoadRefused

    agent, loop, _ = agent
    gate = EngineGate(1)
    _set(loop, lambda: (setattr(agent, "gate", gate), gate.standby()))
    link = AgentLink(f"http://{agent.server.host}:{agent.server.port}", kit.TOKEN, timeout_s=3.0, poll_s=0.05)
    outcome: list[BaseException] = []

    def promotion() -> None:
        try:
            link.wait_for_weights((ENGINE,), refuse=(CHECKPOINT,))
        except BaseException as e:
            outcome.append(e)

    waiting = threading.Thread(target=promotion, daemon=True)
    waiting.start()
    waiting.join(4.0)  # beyond the set's timeout: a standby still waits
    assert waiting.is_alive() and not outcome
    store = WeightStore.from_safetensors(str(weights_dir), "fp-test", "cpu")
    try:
        _set(loop, lambda: (gate.open(store.manifest.digest, None, CHECKPOINT), setattr(agent, "offered", store)))
        offered_at = time.monotonic()
        waiting.join(10)
        assert not waiting.is_alive()
        (e,) = outcome
        assert isinstance(e, LoadRefused) and "checkpoint" in str(e)
        assert time.monotonic() - offered_at < 2.5  # before the set's 3 s timeout could have ended it
    finally:
        store.close()
