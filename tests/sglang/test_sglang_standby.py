"""The facts docs/sglang.md's "Standby" section designs an SGLang standby on, against SGLang's own code on a CPU.

Routes, methods, auth levels and reply keys come from http_server.py's source (importing it needs GPU-only
packages); request bodies are built as io_struct's models; resolution is SGLang's own; the handlers of
/health, /ready and the weight updates run from SGLang's source over a stand-in for its global state; the
receiving side of /update_weights_from_ipc is the checkpoint-engine release SGLang's extra pins.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from seedfork_agent.engines import hooks, ipc

pytestmark = pytest.mark.sglang

ADMIN = "AuthLevel.ADMIN_OPTIONAL"
# What the design would send (docs/sglang.md, "Standby"): free the KV cache and the weights' memory while
# waiting, take them back on promotion, then hand the weights in.
RELEASE = {"tags": ["weights", "kv_cache"]}
RESUME = {"tags": ["weights", "kv_cache"]}
STANDBY_FLAGS = ["--load-format", "dummy", "--checkpoint-engine-wait-weights-before-ready"]


@pytest.fixture(scope="module")
def upstream(tier) -> dict:
    return tier.run("models")


@pytest.fixture(scope="module")
def standby(tier) -> dict:
    return tier.run("standby")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def methods(upstream, path: str) -> dict[str, str | None]:
    """Method -> auth level of every route SGLang serves at ``path``."""
    return {r["method"]: r["auth"] for r in upstream["routes"] if r["path"] == path}


@pytest.mark.parametrize(
    "path, want",
    [
        ("/release_memory_occupation", {"GET", "POST"}),
        ("/resume_memory_occupation", {"GET", "POST"}),
        ("/update_weights_from_ipc", {"POST"}),
        ("/update_weights_from_tensor", {"POST"}),
        ("/init_weights_update_group", {"POST"}),
        ("/update_weights_from_distributed", {"POST"}),
        ("/begin_weight_update", {"POST"}),
        ("/end_weight_update", {"POST"}),
        ("/update_weights_from_disk", {"POST"}),
        ("/pause_generation", {"POST"}),
        ("/continue_generation", {"POST"}),
        ("/weights_checker", {"GET", "POST"}),
    ],
)
def test_standby_routes_exist_with_their_methods_and_admin_auth(upstream, path, want):
    got = methods(upstream, path)
    assert set(got) == want, path
    assert set(got.values()) == {ADMIN}, path  # open without keys, else --admin-api-key (or --api-key)


def test_probes_are_normal_routes(upstream):
    for path in ("/health", "/health_generate", "/ready"):
        assert methods(upstream, path) == {"GET": None}, path


def test_update_replies(upstream):
    def keys(path):
        return {k for r in upstream["routes"] if r["path"] == path for k in r["reply_keys"]}

    for path in ("/update_weights_from_ipc", "/update_weights_from_tensor", "/update_weights_from_distributed"):
        assert keys(path) == {"success", "message"}, path
    assert keys("/update_weights_from_disk") == {"success", "message", "num_paused_requests"}
    assert keys("/release_memory_occupation") == set()  # no body of its own: null on success


def test_the_agents_ipc_body_builds_sglangs_model_with_every_field(tier, standby):
    body = ipc.sglang_update_body({ipc.device_uuid("cpu"): ipc.socket_path("x")})
    assert set(body) == set(standby["models"]["UpdateWeightsFromIPCReqInput"])
    assert tier.run("check", {"cases": [{"model": "UpdateWeightsFromIPCReqInput", "body": body}]})["errors"] == [None]
    assert body["flush_cache"] is True  # a promoted standby must not keep KV computed with placeholder weights


def test_the_designs_memory_bodies_build_sglangs_models(tier, standby):
    assert standby["models"]["ReleaseMemoryOccupationReqInput"] == {"tags": None}  # None: every tag
    assert standby["memory_tags"] == ["kv_cache", "weights", "cuda_graph"]
    assert set(RELEASE["tags"]) < set(standby["memory_tags"])
    cases = [
        {"model": "ReleaseMemoryOccupationReqInput", "body": RELEASE},
        {"model": "ResumeMemoryOccupationReqInput", "body": RESUME},
        {"model": "ReleaseMemoryOccupationReqInput", "body": {"tag": "weights"}},  # a wrong field is refused
    ]
    errors = tier.run("check", {"cases": cases})["errors"]
    assert errors[:2] == [None, None] and errors[2]


def test_other_update_models_need_what_a_standby_does_not_have(standby):
    models = standby["models"]
    assert models["UpdateWeightFromDiskReqInput"]["model_path"] == "<required>"  # files on the pod's disk
    for field in ("names", "dtypes", "shapes"):
        assert models["UpdateWeightsFromDistributedReqInput"][field] == "<required>"
    for field in ("master_address", "master_port", "rank_offset", "world_size"):
        assert models["InitWeightsUpdateGroupReqInput"][field] == "<required>"
    assert models["UpdateWeightsFromTensorReqInput"]["serialized_named_tensors"] == "<required>"
    assert models["PauseGenerationReqInput"] == {"mode": "abort"}


def test_tensor_and_distributed_updates_need_a_weight_update_session(standby):
    for key in ("tensor_without_session", "distributed_without_session"):
        assert "must run between begin_weight_update() and end_weight_update()" in standby[key], key


def test_memory_release_needs_an_idle_server(standby):
    assert standby["release_while_busy"].startswith("AssertionError: release_memory_occupation should be called only")


def test_without_the_memory_saver_release_frees_nothing(standby):
    """Without --enable-memory-saver SGLang's adapter is a no-op: release and resume answer 200 and free
    nothing. With it, torch_memory_saver (a dependency of SGLang's wheel, CUDA or XPU only) does the work."""
    assert standby["saver_off"] == {"class": "_TorchMemorySaverAdapterNoop", "enabled": False, "pause": "ok: None"}
    assert "torch_memory_saver" in standby["saver_on"]  # not installed on this machine: refused, not ignored
    assert any(r.startswith("torch_memory_saver") and "extra" not in r for r in standby["requires"])


def test_sglangs_ipc_extra_pins_checkpoint_engine_0_1_2(standby):
    assert 'checkpoint-engine==0.1.2; extra == "checkpoint-engine"' in standby["requires"]


def test_sglangs_ipc_worker_does_not_accept_the_agents_cpu_key(standby):
    """SGLang's worker looks itself up as ``GPU-<device uuid>``; on a machine without an accelerator it has
    no key at all, and never the agent's ``CPU-...`` key: the IPC route is GPU (or NPU) only."""
    assert standby["ipc_key"] != f"ok: {ipc.device_uuid('cpu')!r}"
    assert standby["ipc_key"].startswith("NotImplementedError")


def test_probes_and_the_wait_for_initial_weights(tier):
    h = tier.run("handlers")
    assert h["generates"] is True  # SGLang's default: /health generates one token once Up
    assert h["starting"] == [503, 503]  # /health, /ready while starting (and while waiting for weights)
    assert h["wait_without_weights"] == "ok: None"  # the wait ends without weights: warm-up and Up follow
    assert h["loaded_after_disk"] is False  # only a successful IPC update ends the wait
    assert h["loaded_after_ipc"] is True
    assert h["up"] == [200, 200]
    assert h["paused"] == [200, 503]  # paused: alive, not ready


def test_resolution_of_a_standbys_flags(tier, model_dir):
    """``--device cpu``: resolution needs a device, and this machine has no GPU."""
    base = ["--model-path", str(model_dir), "--device", "cpu", *STANDBY_FLAGS]
    te_seed = "--remote-instance-weight-loader-start-seed-via-transfer-engine"
    argvs = [base, [*base, te_seed], [*base, te_seed, "--enable-memory-saver"]]
    plain, seed, saver = (r["resolved"] for r in tier.run("resolve", {"argvs": argvs})["results"])
    assert plain["load_format"] == "dummy" and plain["checkpoint_engine_wait_weights_before_ready"] is True
    assert seed["load_format"] == "dummy"
    assert seed["remote_instance_weight_loader_start_seed_via_transfer_engine"] is True  # can seed over TE later
    assert saver["enable_memory_saver"] is True and saver["load_format"] == "dummy"
    assert saver["remote_instance_weight_loader_start_seed_via_transfer_engine"] is False  # never a TE seed


def test_the_agents_handoff_through_sglangs_route_ends_on_its_checkpoint_engines_one_none_teardown(tier):
    """checkpoint-engine 0.1.2 (SGLang's pin) loads every bucket and runs its post hook on the first ``None``,
    then leaves, where 0.4.2 waits for a second. The agent's producer sends both; SGLang's answer to
    /update_weights_from_ipc ends its wait for the second, so the handoff succeeds and nothing is left
    waiting. (Before: the producer waited for an answer that never came and reported a failed handoff.)"""
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64), "c.bias": torch.randn(64)}
    port, key = free_port(), ipc.device_uuid("cpu")
    route: dict = {}
    server = threading.Thread(target=lambda: route.update(tier.run("ipc_route", {"port": port, "key": key})))
    server.start()
    hooks._wait_listening("127.0.0.1", port, 120)
    t0 = time.monotonic()
    sent = ipc.handoff_over_http(f"http://127.0.0.1:{port}", "sglang", tensors, bucket_bytes=64 * 64 * 4, timeout_s=30)
    took = time.monotonic() - t0
    server.join(60)
    assert route["checkpoint_engine"] == "0.1.2"
    assert sent == sum(t.numel() * t.element_size() for t in tensors.values())
    assert route["answers"] == [200] and route["initial_weights_loaded"] is True and route["post_hooks"] == 1
    assert [name for name, _, _ in route["loaded"]] == list(tensors)
    for name, shape, total in route["loaded"]:
        assert shape == list(tensors[name].shape) and total == pytest.approx(float(tensors[name].double().sum()))
    assert took < 10  # the answer ended the teardown, not the 30 s timeout


def test_a_handoff_sglangs_route_refuses_fails_at_once(tier):
    """SGLang's worker extension finds no handle for its device: the route answers 400 with its message, and
    the producer, whose worker never connects, fails on that answer rather than its timeout."""
    port = free_port()
    route: dict = {}
    server = threading.Thread(target=lambda: route.update(tier.run("ipc_route", {"port": port, "key": "GPU-other"})))
    server.start()
    hooks._wait_listening("127.0.0.1", port, 120)
    t0 = time.monotonic()
    with pytest.raises(ipc.HandoffError, match=r"HTTP 400.*GPU-other not found"):
        ipc.handoff_over_http(f"http://127.0.0.1:{port}", "sglang", {"a": torch.ones(4)}, timeout_s=30)
    took = time.monotonic() - t0
    server.join(60)
    assert route["answers"] == [400] and route["loaded"] == [] and route["post_hooks"] == 0
    assert route["initial_weights_loaded"] is False and took < 10
