"""Bad input to the agent's HTTP API gets a 4xx, never a 500, a crash or a stuck gauge.

The real ``AgentServer`` serving a real verified store, over real HTTP on its own loopback IP (in this
process, so the fuzzing below costs no process start), with hypothesis generating the requests.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from seedfork_agent.store import WeightStore

TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def served(kit, weights_dir):
    """An agent's AgentServer serving the test weights (no TransferEngine), its event loop in a thread."""
    store = WeightStore.from_safetensors(str(weights_dir), "fp-test", "cpu")
    try:
        with kit.agent_in_thread(timeout_s=TIMEOUT_S, store=store) as (agent, loop):
            server = agent.server
            server.loop = loop
            with httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=10) as http:
                yield server, http, {"Authorization": f"Bearer {kit.TOKEN}"}, store
    finally:
        store.close()


def _metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


INIT = "/init_weights_send_group_for_remote_instance"
SEND = "/send_weights_to_remote_instance"
EVENTS = "/v1/transfers"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (INIT, {"master_address": "127.0.0.1", "ports": "28000", "world_size": [2]}),
        (INIT, {"master_address": "127.0.0.1", "ports": "28000", "world_size": {"n": 2}}),
        (INIT, {"master_address": "127.0.0.1", "ports": "28000", "world_size": None}),
        (INIT, {"master_address": "127.0.0.1", "ports": "70000", "world_size": 2}),
        (INIT, {"master_address": "127.0.0.1", "ports": [28000], "world_size": 2}),
        (SEND, {"ports": None, "group_name": "x"}),
        (SEND, {"ports": {}, "group_name": "x"}),
        (EVENTS, {"client": "c", "event": "done", "bytes": {}}),
        (EVENTS, {"client": "c", "event": "done", "bytes": "many"}),
        (EVENTS, {"client": "c", "event": "done", "bytes": -1}),
        (EVENTS, {"client": "c", "event": ["start"]}),
    ],
)
def test_wrong_json_types_are_400(served, path, body):
    _, http, auth, _ = served
    r = http.post(path, json=body, headers=auth)
    assert r.status_code == 400, (path, body, r.status_code, r.text)


def test_a_body_beyond_the_limit_is_413_not_not_json(served):
    _, http, auth, _ = served
    for path in (INIT, SEND, EVENTS):
        r = http.post(path, content=b'{"a": "' + b"x" * 10_000_000 + b'"}', headers=auth)
        assert r.status_code == 413, (path, r.status_code, r.text[:200])


def test_the_client_cannot_inflate_bytes_served(served):
    _, http, auth, store = served
    name = 'seedfork_agent_bytes_served_total{backend="transfer_engine"}'
    before = _metric(http, name)
    assert http.post(EVENTS, json={"client": "big", "event": "start"}, headers=auth).status_code == 200
    assert http.post(EVENTS, json={"client": "big", "event": "done", "bytes": 1e40}, headers=auth).status_code == 200
    assert _metric(http, name) - before == store.manifest.payload_bytes  # one read moves at most the weights
    r = http.post(EVENTS, content=b'{"client": "big", "event": "done", "bytes": 1e400}', headers=auth)
    assert r.status_code == 400  # JSON's 1e400 is infinity


def test_start_announcements_without_done_expire(served):
    server, http, auth, _ = served
    base = server.attempt.report.active_clients
    for i in range(3):
        assert http.post(EVENTS, json={"client": f"ghost{i}", "event": "start"}, headers=auth).status_code == 200
    assert http.get("/v1/progress").json()["activeClients"] == base + 3
    # The sweep runs every half second; called here with a clock past the transfer timeout (+ Mooncake's
    # margin), as it would be once that much time passed without a "done".
    later = time.monotonic() + TIMEOUT_S + 6

    async def sweep() -> None:  # on the server's own loop, as its sweeper runs
        server.sweep(later)

    asyncio.run_coroutine_threadsafe(sweep(), server.loop).result(10)
    assert http.get("/v1/progress").json()["activeClients"] == 0
    assert _metric(http, 'seedfork_agent_transfers_total{backend="transfer_engine",result="expired"') >= 3


# ---- fuzzing: whatever arrives, the answer is below 500 ---------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_field = st.sampled_from(["master_address", "ports", "world_size", "group_name", "backend", "client", "event",
                          "bytes", "rank", "group_rank"])  # fmt: skip


# Bodies one or two fields away from a valid one reach the deep parsing paths that random JSON never does.
def _near(valid: dict) -> st.SearchStrategy[dict]:
    def field(v):
        return (v if isinstance(v, st.SearchStrategy) else st.just(v)) | _json

    return st.fixed_dictionaries({}, optional={k: field(v) for k, v in valid.items()})


_near_valid = (
    _near({"master_address": "127.0.0.1", "ports": "28000", "world_size": 2, "group_name": "g", "backend": "nccl"})
    | _near({"master_address": "127.0.0.1", "ports": "28000", "group_name": "g"})
    | _near({"client": st.sampled_from(["a", "b"]), "event": st.sampled_from(["start", "done", "failed"]), "bytes": 1})
)
_bodies = (
    _json.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(_field, _json, max_size=6).map(lambda v: json.dumps(v).encode())
    | _near_valid.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
)
_paths = st.sampled_from(
    ["/healthz", "/readyz", "/v1/progress", "/metrics", "/v1/manifest", "/v1/attach", EVENTS, INIT, SEND,
     "/remote_instance_transfer_engine_info", "/get_remote_instance_transfer_engine_info", "/nope"]
)  # fmt: skip
_query = st.dictionaries(st.sampled_from(["rank", "x"]), st.text(max_size=8), max_size=2)


def _would_form_group(path: str, raw: bytes) -> bool:
    """A body the seed accepts as a real group: it would bind a port and wait for members (not fuzzing)."""
    if path != INIT:
        return False
    try:
        body = json.loads(raw)
        ports = [int(p) for p in str(body["ports"]).split(",")]
        return len(ports) == 1 and 1 <= ports[0] <= 65535 and int(body["world_size"]) >= 2 and "master_address" in body
    except Exception:
        return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "PUT"]),
    path=_paths,
    body=_bodies,
    query=_query,
    token=st.sampled_from(["right", "wrong", None]),
)
def test_fuzzed_requests_never_get_a_5xx(served, kit, method, path, body, query, token):
    _, http, auth, _ = served
    assume(not (token == "right" and _would_form_group(path, body)))
    headers = {"right": auth, "wrong": {"Authorization": "Bearer nope"}, None: {}}[token]
    r = http.request(method, path, content=body, params=query, headers=headers)
    assert r.status_code < 500, (method, path, body[:200], query, r.status_code, r.text[:300])
    assert http.get("/healthz").status_code == 200


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([INIT, SEND, EVENTS]), body=_near_valid | _json)
def test_fuzzed_bodies_with_the_token_never_get_a_5xx(served, path, body):
    """Authorised POSTs whose bodies are near the real ones: where a wrong type would surface as a 500."""
    _, http, auth, _ = served
    raw = json.dumps(body).encode()
    assume(not _would_form_group(path, raw))
    r = http.post(path, content=raw, headers=auth)
    assert 400 <= r.status_code < 500 or r.status_code == 200, (path, body, r.status_code, r.text[:300])
