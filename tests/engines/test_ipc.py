"""The checkpoint-engine IPC handoff over ZMQ and a /dev/shm buffer: the agent's producer against the reference
engine's receiver and against checkpoint-engine's own (the release pyproject.toml pins for the tests)."""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
import types

import httpx
import pytest
import torch
import zmq
from safetensors.torch import load_file

from seedfork_agent.engines import ipc
from seedfork_agent.engines.llama import LlamaConfig, LlamaModel


def load_dir(d):
    w = {}
    for f in sorted(d.glob("*.safetensors")):
        w |= load_file(str(f))
    return w


def test_socket_path_format_is_device_keyed():
    dev = ipc.device_uuid("cpu")
    a, b = ipc.socket_path(dev), ipc.socket_path(dev)
    assert a.startswith(f"ipc://@checkpoint-engine-{dev}-") and a.endswith(".sock")
    assert a != b  # a fresh counter per handoff


def test_buckets_respect_size_alignment_and_order():
    tensors = {f"t{i}": torch.zeros(100 + i, dtype=torch.float32) for i in range(10)}
    buckets = ipc.plan_buckets(tensors, 1024)
    assert [m["name"] for b in buckets for m in b] == list(tensors)
    for b in buckets:
        assert b[0]["offset"] == 0
        for m in b:
            assert m["offset"] % ipc.ALIGN == 0
            assert m["offset"] + torch.Size(m["shape"]).numel() * 4 <= 1024
            assert set(m) == {"name", "dtype", "shape", "offset"}
    with pytest.raises(ValueError, match="does not fit"):
        ipc.plan_buckets({"big": torch.zeros(1000)}, 1024)


def test_in_process_handoff_delivers_every_byte_and_both_teardowns():
    tensors = {f"w{i}": torch.randn(37 * (i + 1)) for i in range(12)} | {"b": torch.arange(5, dtype=torch.bfloat16)}
    got: dict[str, torch.Tensor] = {}
    events: list[str] = []
    path = ipc.socket_path(ipc.device_uuid("cpu"))

    def load(views):
        events.append(f"bucket{len(views)}")
        for name, v in views:
            got[name] = v.clone()

    worker_error: list[BaseException] = []

    def worker():
        try:
            ipc.receive_weights(path, load, post_hook=lambda: events.append("post"), timeout_s=20)
        except BaseException as e:
            worker_error.append(e)

    t = threading.Thread(target=worker)
    t.start()
    sent = ipc.send_weights(path, tensors, bucket_bytes=1024, timeout_s=20)
    t.join(10)
    assert not worker_error
    assert sent == sum(v.numel() * v.element_size() for v in tensors.values())
    assert all(torch.equal(got[n], tensors[n]) for n in tensors) and set(got) == set(tensors)
    assert events[-1] == "post" and len(events) > 3  # several buckets through one buffer, hook last


def test_engine_error_text_reaches_the_producer_and_aborts():
    path = ipc.socket_path(ipc.device_uuid("cpu"))
    errors: list[BaseException] = []

    def load(views):
        raise ValueError("no room for " + views[0][0])

    def worker():
        try:
            ipc.receive_weights(path, load, timeout_s=20)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    with pytest.raises(ipc.HandoffError, match="no room for a"):
        ipc.send_weights(path, {"a": torch.ones(4)}, bucket_bytes=1024, timeout_s=20)
    t.join(10)
    assert errors and "aborted" in str(errors[0])  # the worker leaves its loop, weights never applied


def test_handoff_into_reference_engine_process(procs, tiny_model, h):
    """One engine process: refused handoffs leave it unhealthy; SGLang's trigger then loads it (twice)."""
    url, _ = h.start_engine(procs, tiny_model, "--ipc")
    auth = {"Authorization": f"Bearer {h.TOKEN}"}
    assert httpx.get(f"{url}/health").status_code == 503  # dummy weights: not ready before the handoff
    assert httpx.post(f"{url}/generate", json={"input_ids": [1]}, headers=auth).status_code == 503
    weights = load_dir(tiny_model)

    partial = dict(list(weights.items())[:-1])
    with pytest.raises(ipc.HandoffError, match="unset"):
        ipc.handoff_over_http(url, "sglang", partial, bucket_bytes=64 << 10, token=h.TOKEN, timeout_s=30)
    assert httpx.get(f"{url}/health").status_code == 503
    wrong = dict(weights)
    wrong["lm_head.weight"] = wrong["lm_head.weight"][:, :10].contiguous()
    with pytest.raises(ipc.HandoffError, match="lm_head"):
        ipc.handoff_over_http(url, "sglang", wrong, bucket_bytes=64 << 10, token=h.TOKEN, timeout_s=30)
    assert httpx.get(f"{url}/health").status_code == 503
    with pytest.raises(ipc.HandoffError, match="401"):
        ipc.handoff_over_http(url, "sglang", weights, bucket_bytes=64 << 10, token="wrong", timeout_s=5)

    local = LlamaModel(LlamaConfig.load(tiny_model), weights)
    want = [local.generate(list(p), 8) for p in h.PROMPTS]
    for _ in range(2):  # a second full handoff into the same engine replaces the first
        sent = ipc.handoff_over_http(url, "sglang", weights, bucket_bytes=64 << 10, token=h.TOKEN, timeout_s=30)
        assert sent == sum(t.numel() * t.element_size() for t in weights.values())
        assert httpx.get(f"{url}/health").status_code == 200
        assert h.generations(url) == want


class _CpuDevice:
    """checkpoint-engine's ``DeviceManager`` on this machine: its receiver synchronises, collects IPC handles
    and empties the cache of CUDA or an NPU (and refuses a CPU); a CPU buffer needs none of that."""

    def __init__(self):
        self.device_module = types.SimpleNamespace(synchronize=lambda: None, ipc_collect=lambda: None,
                                                   empty_cache=lambda: None)  # fmt: skip


def _checkpoint_engine_receiver(monkeypatch, path, run, post_hook):
    """checkpoint-engine 0.4.2's own receiving loop in a thread, the CPU device substituted; its error, if any."""
    worker = importlib.import_module("checkpoint_engine.worker")  # a dev dependency: missing is a failure
    assert importlib.metadata.version("checkpoint-engine") == "0.4.2"
    monkeypatch.setattr(worker, "DeviceManager", _CpuDevice)
    errors: list[BaseException] = []

    def receive():
        try:
            worker.update_weights_from_ipc(zmq.Context.instance(), path, None, run=run, post_hook=post_hook)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=receive)
    thread.start()
    return thread, errors


def test_the_producer_hands_every_byte_to_checkpoint_engines_receiver_and_ends_on_its_teardown(monkeypatch):
    tensors = {f"w{i}": torch.randn(37 * (i + 1)) for i in range(12)} | {"b": torch.arange(5, dtype=torch.bfloat16)}
    got: dict[str, torch.Tensor] = {}
    events: list[str] = []
    path = ipc.socket_path(ipc.device_uuid("cpu"))

    def run(weights):
        events.append("bucket")
        got.update((name, t.clone()) for name, t in weights)

    thread, errors = _checkpoint_engine_receiver(monkeypatch, path, run, lambda: events.append("post"))
    sent = ipc.send_weights(path, tensors, bucket_bytes=1024, timeout_s=20)
    thread.join(10)
    assert not thread.is_alive() and not errors
    assert sent == sum(v.numel() * v.element_size() for v in tensors.values())
    assert set(got) == set(tensors) and all(torch.equal(got[n], tensors[n]) for n in tensors)
    assert events.count("post") == 1 and events[-1] == "post" and len(events) > 3


def test_a_bucket_checkpoint_engines_receiver_refuses_fails_the_handoff_and_ends_its_worker(monkeypatch):
    path = ipc.socket_path(ipc.device_uuid("cpu"))
    hooks: list[int] = []

    def run(weights):
        raise ValueError("no parameter named " + weights[0][0])

    thread, errors = _checkpoint_engine_receiver(monkeypatch, path, run, lambda: hooks.append(1))
    with pytest.raises(ipc.HandoffError, match="no parameter named a"):
        ipc.send_weights(path, {"a": torch.ones(4)}, bucket_bytes=1024, timeout_s=20)
    thread.join(10)
    assert not thread.is_alive() and errors and not hooks  # the worker left without running the post hook
