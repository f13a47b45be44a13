"""The SGLang doubles and the agent's SGLang wire shapes, checked against SGLang's own code so they cannot drift.

Request bodies are decoded with io_struct's models (msgspec, strict types); routes, methods, auth levels
and reply keys come from SGLang's http_server.py; auth decisions from its utils/auth.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
from pathlib import Path

import pytest

from seedfork_agent import server as agent_server
from seedfork_agent.engines import sglang

pytestmark = pytest.mark.sglang

TESTS = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent_double = _load(TESTS / "agent" / "sglang_double.py", "agent_sglang_double")
engine_double = _load(TESTS / "engines" / "sglang_double.py", "engine_sglang_double")


@pytest.fixture(scope="module")
def upstream(tier) -> dict:
    return tier.run("models")


def route(upstream, method: str, path: str) -> dict:
    found = [r for r in upstream["routes"] if r["method"] == method and r["path"] == path]
    assert found, f"SGLang has no {method} {path}"
    return found[0]


def test_request_bodies_decode_with_io_struct(tier):
    init, send = agent_double.rfork_bodies("10.0.0.1", "10.0.0.2", [28000, 28001])
    cases = [
        {"model": "InitWeightsSendGroupForRemoteInstanceReqInput", "body": init},
        {"model": "SendWeightsToRemoteInstanceReqInput", "body": send},
        {"model": "CheckWeightsReqInput", "body": {"action": "checksum"}},  # what the supervisor POSTs
    ]
    assert tier.run("check", {"cases": cases})["errors"] == [None, None, None]
    # ... and a body the model would refuse is refused (the check can fail).
    bad = [{"model": "InitWeightsSendGroupForRemoteInstanceReqInput", "body": {**init, "world_size": "two"}}]
    assert tier.run("check", {"cases": bad})["errors"][0]


def test_request_bodies_carry_every_field_io_struct_requires(upstream):
    init, send = agent_double.rfork_bodies("10.0.0.1", "10.0.0.2", [28000])
    for body, model in ((init, "InitWeightsSendGroupForRemoteInstanceReqInput"),
                        (send, "SendWeightsToRemoteInstanceReqInput")):  # fmt: skip
        fields = upstream["models"][model]
        assert set(body) <= set(fields), model
        assert {f for f, required in fields.items() if required} <= set(body), model


def test_routes_the_agent_calls_exist_in_sglang_with_their_auth_level(upstream):
    for method, path in [("GET", p) for p in engine_double.NORMAL_ROUTES]:
        assert route(upstream, method, path)["auth"] is None, path  # NORMAL: --api-key only
    for method, path in [("POST", "/weights_checker"),
                         ("GET", "/remote_instance_transfer_engine_info"),
                         ("GET", "/get_remote_instance_transfer_engine_info"),
                         ("POST", "/init_weights_send_group_for_remote_instance"),
                         ("POST", "/send_weights_to_remote_instance")]:  # fmt: skip
        assert route(upstream, method, path)["auth"] == "AuthLevel.ADMIN_OPTIONAL", path
    route(upstream, "GET", "/health")
    bootstrap = {(r["method"], r["path"]) for r in upstream["bootstrap_routes"]}
    assert {("PUT", "/register_transfer_engine_info"), ("GET", "/get_transfer_engine_info")} <= bootstrap


def test_agent_serves_sglangs_rfork_routes():
    """The agent's seed speaks SGLang's paths and methods (for seedfork's own clients)."""
    source = inspect.getsource(agent_server.AgentServer.app)
    for line in ('add_post("/init_weights_send_group_for_remote_instance"',
                 'add_post("/send_weights_to_remote_instance"',
                 'add_get("/remote_instance_transfer_engine_info"',
                 'add_get("/get_remote_instance_transfer_engine_info"'):  # fmt: skip
        assert line in source


def test_weights_checker_reply_has_sglangs_keys(upstream):
    reply = engine_double.weights_checker_reply("ab" * 32, 2)
    keys = route(upstream, "POST", "/weights_checker")["reply_keys"]
    assert set(reply) <= set(keys) and {"success", "message"} <= set(reply)
    assert isinstance(reply["per_engine_checksum"], str)  # a sha256 hex digest, not a list
    ok, _ = sglang.checksums_match(reply, engine_double.weights_checker_reply("ab" * 32, 2))
    assert ok


def test_double_auth_decides_as_sglang(tier):
    keys = [None, "user-key"]
    admins = [None, "admin-key"]
    headers = [None, "Bearer user-key", "Bearer admin-key", "Bearer other", "Basic admin-key"]
    paths = ["/server_info", "/weights_checker", "/health"]
    cases = [
        {"method": "GET", "path": p, "authorization": h, "api_key": k, "admin_api_key": a,
         "level": "normal" if p in engine_double.NORMAL_ROUTES else "admin_optional"}
        for p, h, k, a in itertools.product(paths, headers, keys, admins)
    ]  # fmt: skip
    want = tier.run("auth", {"cases": cases})["statuses"]
    got = [engine_double.auth_status(c["path"], c["authorization"], c["api_key"], c["admin_api_key"]) for c in cases]
    assert got == want


def test_double_parser_knows_only_sglangs_flags(tier):
    flags = {o for a in engine_double.parser()._actions for o in a.option_strings if o != "--help" and o != "-h"}
    options = tier.run("options")["options"]
    assert flags <= set(options), flags - set(options)


def test_data_parallel_options_are_sglangs(tier):
    """The template check refuses every spelling SGLang has for the sizes its R-Fork seed asserts on."""
    from seedfork_api.sglang_args import DATA_PARALLEL_OPTIONS, data_parallel_problem

    options = tier.run("options")["options"]
    sglangs = {o: d for o, d in options.items() if d in ("dp_size", "attn_dp_size")}
    assert sglangs == DATA_PARALLEL_OPTIONS
    for option in sglangs:
        assert data_parallel_problem(["--model-path", "m", option, "2"]), option
        assert data_parallel_problem(["--model-path", "m", f"{option}=1"]) is None, option
