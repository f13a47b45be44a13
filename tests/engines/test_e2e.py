"""Seed (agent + reference engine) and client (agent pulls, engine attaches or takes an IPC handoff),
all real processes on their own loopback IPs: identical generations, and no engine serves unverified bytes.
"""

from __future__ import annotations

import itertools
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from seedfork_agent.engines.llama import LlamaConfig, LlamaModel

FP = "tinyfp"
_GROUP_PORTS = itertools.count()


def group_port() -> str:
    """A rendezvous port inside the seed's default range (a seed refuses any other); each seed has its own IP."""
    return str(28000 + next(_GROUP_PORTS) % 98)


def expected_generations(model_dir, prompts):
    w = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        w |= load_file(str(f))
    m = LlamaModel(LlamaConfig.load(model_dir), w)
    return [m.generate(list(p), 8) for p in prompts]


def agent_args(cmd, ip, port, *extra):
    return [
        "-m",
        "seedfork_agent",
        cmd,
        "--host",
        ip,
        "--port",
        str(port),
        "--fingerprint",
        FP,
        "--device",
        "cpu",
        *extra,
    ]


class Pod:
    def __init__(self, h, procs, name):
        self.h, self.procs, self.name = h, procs, name
        self.ip = h.loopback_ip()
        self.agent_port = h.free_port(self.ip)
        self.engine_port = h.free_port(self.ip)
        self.agent_url = f"http://{self.ip}:{self.agent_port}"
        self.engine_url = f"http://{self.ip}:{self.engine_port}"
        self.env = {"SEEDFORK_TOKEN": h.TOKEN}

    def agent(self, cmd, *extra, env=None):
        return self.procs.start(
            agent_args(cmd, self.ip, self.agent_port, *extra), f"{self.name}-agent", {**self.env, **(env or {})}
        )

    def engine(self, model_dir, *source):
        args = ["-m", "seedfork_agent.engines.reference", "serve", "--config", str(model_dir), *source]
        args += ["--host", self.ip, "--port", str(self.engine_port), "--token", self.h.TOKEN]
        return self.procs.start(args, f"{self.name}-engine")

    def engine_attach(self, model_dir):
        return self.engine(model_dir, "--agent", self.agent_url)

    def wait_agent_verified(self, proc, timeout=60):
        return self.h.wait_status(f"{self.agent_url}/readyz", 200, timeout, proc=proc)

    def wait_engine_healthy(self, proc, timeout=60):
        return self.h.wait_status(f"{self.engine_url}/health", 200, timeout, proc=proc)

    def attach_info(self):
        r = httpx.get(f"{self.agent_url}/v1/attach", headers={"Authorization": f"Bearer {self.h.TOKEN}"})
        r.raise_for_status()
        return r.json()

    def engine_info(self):
        return httpx.get(f"{self.engine_url}/v1/engine", headers={"Authorization": f"Bearer {self.h.TOKEN}"}).json()


@pytest.fixture(scope="module")
def seed(tiny_model, tmp_path_factory, h):
    """A seed pod serving the tiny model over gloo and TransferEngine (TCP), shared by this module's tests."""
    procs = h.Procs(tmp_path_factory.mktemp("seed"))
    try:
        pod = Pod(h, procs, "seed")
        agent = pod.agent("serve", "--weights", str(tiny_model), "--protocol", "tcp")
        engine = pod.engine_attach(tiny_model)
        pod.wait_agent_verified(agent)
        pod.wait_engine_healthy(engine)
        yield pod
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def want(tiny_model, h):
    return expected_generations(tiny_model, h.PROMPTS)


def map_tensor(attach_body, name):
    """Map one tensor of an agent's /dev/shm store from this (test) process."""
    info = attach_body["attach"]
    entry = next(t for t in attach_body["manifest"]["tensors"] if t["name"] == name)
    buf = torch.from_file(info["path"], shared=True, size=info["nbytes"], dtype=torch.uint8)
    return buf[entry["offset"] : entry["offset"] + entry["nbytes"]]


def weights_checker(url, h):
    r = httpx.post(
        f"{url}/weights_checker", json={"action": "checksum"}, headers={"Authorization": f"Bearer {h.TOKEN}"}
    )
    r.raise_for_status()
    return r.json()


def test_engine_attaches_zero_copy(seed, h):
    """The engine maps the agent's shared-memory file: a write through another mapping shows up in it."""
    body = seed.attach_info()
    info = seed.engine_info()
    assert info["mode"] == "attach" and info["attach"]["kind"] == "shm"
    assert info["attach"]["path"] == body["attach"]["path"]  # the agent's own pages, not a copy
    before = weights_checker(seed.engine_url, h)
    raw = map_tensor(body, "model.norm.weight")
    saved = raw.clone()
    raw[:4] ^= 0xFF
    try:
        during = weights_checker(seed.engine_url, h)
        assert during["per_tensor_checksum"]["model.norm.weight"] != before["per_tensor_checksum"]["model.norm.weight"]
        changed = [
            n
            for n in before["per_tensor_checksum"]
            if before["per_tensor_checksum"][n] != during["per_tensor_checksum"][n]
        ]
        assert changed == ["model.norm.weight"]
    finally:
        raw.copy_(saved)
    assert weights_checker(seed.engine_url, h) == before


@pytest.mark.parametrize("backend", ["gloo", "transfer_engine"])
def test_client_generates_identically_to_seed(seed, procs, tiny_model, h, backend, want):
    client = Pod(h, procs, "client")
    engine = client.engine_attach(tiny_model)  # started first: must wait for verified weights
    h.wait_status(f"{client.engine_url}/v1/engine", 200, proc=engine, headers={"Authorization": f"Bearer {h.TOKEN}"})
    assert httpx.get(f"{client.engine_url}/health").status_code == 503
    extra = ["--seed", f"{seed.ip}:{seed.agent_port}", "--backend", backend, "--protocol", "tcp", "--no-te"]
    if backend == "gloo":
        extra += ["--group-port", group_port()]
    agent = client.agent("pull", *extra)
    client.wait_agent_verified(agent)
    client.wait_engine_healthy(engine)
    assert h.generations(seed.engine_url) == want
    assert h.generations(client.engine_url) == want
    assert (
        weights_checker(client.engine_url, h)["per_engine_checksum"]
        == weights_checker(seed.engine_url, h)["per_engine_checksum"]
    )
    assert client.engine_info()["attach"]["path"] == client.attach_info()["attach"]["path"]


def test_client_hands_weights_over_ipc(seed, procs, tiny_model, h, want):
    hook = "checkpoint_engine_sglang"
    client = Pod(h, procs, "client")
    client.engine(tiny_model, "--ipc")
    env = {"SEEDFORK_POD_IP": client.ip, "SEEDFORK_ENGINE_PORT": str(client.engine_port), "SEEDFORK_IPC_BUCKET_MB": "1"}
    extra = ["--seed", f"{seed.ip}:{seed.agent_port}", "--backend", "gloo", "--group-port", group_port()]
    agent = client.agent("pull", *extra, "--no-te", "--engine-hook", f"seedfork_agent.engines.hooks:{hook}", env=env)
    client.wait_agent_verified(agent)  # the agent reports verified only after the engine took the weights
    assert httpx.get(f"{client.engine_url}/health").status_code == 200
    assert client.engine_info()["mode"] == "ipc"
    assert h.generations(client.engine_url) == want


def test_corruption_at_the_seed_is_caught_before_the_client_engine_serves(procs, tiny_model, h):
    # A seed of its own: the client's checksum mismatch makes it check its store and take itself out.
    seed = Pod(h, procs, "bad-seed")
    seed.wait_agent_verified(seed.agent("serve", "--weights", str(tiny_model), "--no-te"))
    raw = map_tensor(seed.attach_info(), "model.layers.0.mlp.up_proj.weight")
    raw[100] ^= 0x10  # bit rot in the seed's memory after it verified
    client = Pod(h, procs, "client")
    engine = client.engine_attach(tiny_model)
    extra = ["--seed", f"{seed.ip}:{seed.agent_port}", "--backend", "gloo"]
    agent = client.agent("pull", *extra, "--group-port", group_port(), "--no-te", "--timeout", "20")
    assert agent.wait(90) == 1  # the pull fails verification
    assert "model.layers.0.mlp.up_proj.weight" in procs.log(agent)
    assert h.wait_status(f"{seed.agent_url}/readyz", 503, 30).status_code == 503  # the seed took itself out
    # The failed pull can end before the engine process has even started listening: wait for it to answer.
    health = h.wait_status(f"{client.engine_url}/health", 503, 60, proc=engine)
    assert health.status_code == 503
    assert client.engine_info()["state"] == "waiting"


def test_engine_rechecks_checksums_when_it_attaches(seed, procs, tiny_model, h):
    """Bytes that change between the agent's verification and the attach are refused by the engine."""
    late = Pod(h, procs, "late")  # a second engine next to the seed's agent
    late.agent_url = seed.agent_url
    raw = map_tensor(seed.attach_info(), "lm_head.weight")
    raw[7] ^= 0x01
    try:
        engine = late.engine_attach(tiny_model)
        h.wait_status(f"{late.engine_url}/v1/engine", 200, proc=engine, headers={"Authorization": f"Bearer {h.TOKEN}"})
        for _ in range(300):
            info = late.engine_info()
            if info["state"] != "waiting":
                break
            time.sleep(0.1)
    finally:
        raw[7] ^= 0x01  # the seed is shared with the other tests of this module
    assert info["state"] == "failed" and "lm_head.weight" in info["error"]
    r = httpx.get(f"{late.engine_url}/health")
    assert r.status_code == 503 and "checksum mismatch" in r.text
    auth = {"Authorization": f"Bearer {h.TOKEN}"}
    assert httpx.post(f"{late.engine_url}/generate", json={"input_ids": [1]}, headers=auth).status_code == 503


def test_engine_requires_token(seed, h):
    assert httpx.post(f"{seed.engine_url}/generate", json={"input_ids": [1]}).status_code == 401
    assert httpx.post(f"{seed.engine_url}/weights_checker", json={"action": "checksum"}).status_code == 401
    assert httpx.get(f"{seed.engine_url}/health").status_code == 200


def test_engine_rejects_bad_requests_and_keeps_serving(seed, h, want):
    auth = {"Authorization": f"Bearer {h.TOKEN}"}
    url = seed.engine_url
    for body, status in [
        ("not json", 400),
        ({"text": "x", "sampling_params": {"max_new_tokens": -1}}, 400),
        ({"input_ids": [300]}, 400),  # outside the vocabulary
        ({"input_ids": []}, 400),
        ({}, 400),
        ({"input_ids": [1] * 600}, 400),  # longer than max_position_embeddings
    ]:
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = httpx.post(f"{url}/generate", headers=auth, **kw)
        assert r.status_code == status, (body, r.text)
    assert httpx.post(f"{url}/weights_checker", json={"action": "nope"}, headers=auth).status_code == 400
    assert httpx.post(f"{url}/update_weights_from_ipc", content="[", headers=auth).status_code == 400
    r = httpx.post(f"{url}/generate", json={"text": "hello"}, headers=auth)
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
    assert h.generations(url) == want
