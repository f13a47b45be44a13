"""GPU variants (run on a machine with 2 GPUs: ``pytest -m gpu tests/engines``): CUDA IPC attach,
NCCL and TransferEngine nvlink_intra identity checks, and the IPC handoff over a CUDA buffer.

Each pod uses its own GPU (seed: cuda:0, client: cuda:1), shared by its agent and engine as containers
of one pod share theirs. Both GPUs stay visible to every process, so TransferEngine's nvlink_intra
transport and CUDA IPC can open the peer's memory.
"""

from __future__ import annotations

import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from seedfork_agent import store as weight_store
from seedfork_agent.engines import ipc
from seedfork_agent.engines.llama import LlamaConfig, LlamaModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
FP = "gpufp"


def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")


def load_dir(d, device="cpu"):
    w = {}
    for f in sorted(d.glob("*.safetensors")):
        w |= load_file(str(f), device=device)
    return w


class GpuPod:
    def __init__(self, h, procs, name, gpu):
        self.h, self.procs, self.name = h, procs, name
        self.ip = h.loopback_ip()
        self.agent_port, self.engine_port = h.free_port(self.ip), h.free_port(self.ip)
        self.agent_url, self.engine_url = f"http://{self.ip}:{self.agent_port}", f"http://{self.ip}:{self.engine_port}"
        self.device = f"cuda:{gpu}"
        self.env = {"SEEDFORK_TOKEN": h.TOKEN}
        self.auth = {"Authorization": f"Bearer {h.TOKEN}"}

    def agent(self, cmd, *extra, env=None):
        args = ["-m", "seedfork_agent", cmd, "--host", self.ip, "--port", str(self.agent_port)]
        args += ["--fingerprint", FP, "--device", self.device, *extra]
        return self.procs.start(args, f"{self.name}-agent", {**self.env, **(env or {})})

    def engine(self, model_dir, *source):
        args = ["-m", "seedfork_agent.engines.reference", "serve", "--config", str(model_dir), *source]
        args += ["--host", self.ip, "--port", str(self.engine_port), "--token", self.h.TOKEN, "--device", self.device]
        return self.procs.start(args, f"{self.name}-engine", self.env)

    def info(self):
        return httpx.get(f"{self.engine_url}/v1/engine", headers=self.auth).json()


def checker(url, auth):
    return httpx.post(f"{url}/weights_checker", json={"action": "checksum"}, headers=auth).json()


def start_seed(h, procs, model):
    seed = GpuPod(h, procs, "seed", 0)
    agent = seed.agent("serve", "--weights", str(model), "--protocol", "nvlink_intra")
    engine = seed.engine(model, "--agent", seed.agent_url)
    h.wait_status(f"{seed.agent_url}/readyz", 200, 120, proc=agent)
    h.wait_status(f"{seed.engine_url}/health", 200, 120, proc=engine)
    return seed


def test_cuda_ipc_attach_is_zero_copy(procs, tiny_model, h):
    seed = start_seed(h, procs, tiny_model)
    assert seed.info()["attach"]["kind"] == "cuda_ipc"
    body = httpx.get(f"{seed.agent_url}/v1/attach", headers=seed.auth).json()
    before = checker(seed.engine_url, seed.auth)
    # A third process view of the same allocation (CUDA IPC from here): a write shows up in the engine.
    torch.cuda.set_device(0)
    views = weight_store.attach(body["attach"], weight_store.Manifest.from_dict(body["manifest"]))
    t = views["model.norm.weight"]
    saved = t.clone()
    t.mul_(2)
    torch.cuda.synchronize()
    try:
        during = checker(seed.engine_url, seed.auth)
        assert during["per_tensor_checksum"]["model.norm.weight"] != before["per_tensor_checksum"]["model.norm.weight"]
    finally:
        t.copy_(saved)
        torch.cuda.synchronize()
    assert checker(seed.engine_url, seed.auth) == before


def test_an_engine_warms_its_gpu_while_it_waits_and_serves_nothing_from_the_warm_up(procs, tiny_model, h):
    """Its first forward runs on scratch weights before any are offered (the agent is not even up): nothing is
    served meanwhile, and once attached it generates what an engine that loaded the files itself does."""
    pod = GpuPod(h, procs, "warm", 0)
    engine = pod.engine(tiny_model, "--agent", pod.agent_url)
    deadline = time.monotonic() + 120
    while True:
        assert engine.poll() is None and time.monotonic() < deadline
        try:
            if "warm_compute_ms" in pod.info()["timings"]:
                break
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.2)
    r = httpx.post(f"{pod.engine_url}/generate", json={"input_ids": [1], "max_new_tokens": 1}, headers=pod.auth)
    assert r.status_code == 503 and pod.info()["state"] == "waiting"
    pod.agent("serve", "--weights", str(tiny_model), "--protocol", "nvlink_intra")
    h.wait_status(f"{pod.engine_url}/health", 200, 120, proc=engine)
    storage = GpuPod(h, procs, "storage", 0)
    loaded = storage.engine(tiny_model, "--model", str(tiny_model))
    h.wait_status(f"{storage.engine_url}/health", 200, 120, proc=loaded)
    assert "warm_compute_ms" not in storage.info()["timings"]  # an engine that never waits does not warm up
    assert h.generations(pod.engine_url) == h.generations(storage.engine_url)


@pytest.mark.parametrize(("backend", "protocol"), [("nccl", "nvlink_intra"), ("transfer_engine", "nvlink_intra")])
def test_gpu_client_generates_identically(procs, tiny_model, h, backend, protocol):
    two_gpus()
    seed = start_seed(h, procs, tiny_model)
    client = GpuPod(h, procs, "client", 1)
    engine = client.engine(tiny_model, "--agent", client.agent_url)
    extra = ["--seed", f"{seed.ip}:{seed.agent_port}", "--backend", backend, "--protocol", protocol, "--no-te"]
    if backend == "nccl":
        extra += ["--group-port", "28000"]  # inside the seed's default rendezvous range (it refuses others)
    agent = client.agent("pull", *extra)
    h.wait_status(f"{client.agent_url}/readyz", 200, 120, proc=agent)
    h.wait_status(f"{client.engine_url}/health", 200, 120, proc=engine)
    assert h.generations(client.engine_url) == h.generations(seed.engine_url)
    assert (
        checker(client.engine_url, client.auth)["per_engine_checksum"]
        == checker(seed.engine_url, seed.auth)["per_engine_checksum"]
    )


def test_ipc_handoff_over_cuda_buffer(procs, tiny_model, h):
    url, _ = h.start_engine(procs, tiny_model, "--ipc", "--device", "cuda")
    weights = load_dir(tiny_model, "cuda")
    t0 = time.perf_counter()
    ipc.handoff_over_http(url, "sglang", weights, bucket_bytes=64 << 10, device="cuda", token=h.TOKEN, timeout_s=60)
    assert time.perf_counter() - t0 < 60
    local = LlamaModel(LlamaConfig.load(tiny_model), weights)
    assert h.generations(url) == [local.generate(list(p), 8) for p in h.PROMPTS]
