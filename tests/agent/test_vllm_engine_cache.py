"""Real vLLM compiling (no ``--enforce-eager``): a second engine that gets the seed's engine cache compiles no kernel.

vLLM's CPU build compiles the model with torch.compile; Inductor generates C++ kernels and builds them
into shared objects under TORCHINDUCTOR_CACHE_DIR / VLLM_CACHE_ROOT (here: the pod's engine-cache
directory, ``contract.engine_cache_env``). The seed's engine compiles them; the client's agent fetches the
seed's cache before it offers the weights; the client's engine then finds every kernel it needs and
builds none: no shared object in its cache is created or rewritten while it starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]

STARTUP_S = 600  # vLLM compiling on a busy 2-core machine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from seedfork_agent.engines.testmodel import make_model
    from seedfork_localdev import vllm

    try:
        vllm.python()
    except vllm.VllmUnavailable as e:
        pytest.fail(str(e))
    return make_model(tmp_path_factory.mktemp("vllm-tiny") / "model", "vllm-tiny")


def _kernels(root: Path) -> dict[str, int]:
    """Inductor's generated kernels (source and built object) by path, with their modification times."""
    files = [p for p in root.rglob("*") if p.suffix in (".so", ".cpp")]
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in files}


def _agent_args(kit, ip: str, cache: Path, *rest: str) -> list[str]:
    from seedfork_localdev.vllm import VERSION

    return [*rest, "--host", ip, "--port", str(kit.AGENT_PORT), "--fingerprint", "fp-vllm", "--device", "cpu",
            "--timeout", str(STARTUP_S), "--engine-ranks", "1", "--engine-url", f"http://{ip}:8000/health",
            "--engine-cache", str(cache), "--engine-version", VERSION]  # fmt: skip


def _engine(kit, model: Path, ip: str, cache: Path, log: Path):
    from seedfork_api.contract import engine_cache_env
    from seedfork_localdev.vllm import Server

    contract = {"SEEDFORK_POD_IP": ip, "SEEDFORK_AGENT_PORT": str(kit.AGENT_PORT), "SEEDFORK_TOKEN": kit.TOKEN,
                "SEEDFORK_TIMEOUT_SECONDS": str(STARTUP_S), **engine_cache_env("vllm", str(cache))}  # fmt: skip
    return Server(model, ip, 8000, log, "seedfork", contract, compile=True)


def _wait_cache_offered(kit, agent, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{agent.url}/v1/engine-cache", headers={"Authorization": f"Bearer {kit.TOKEN}"}, timeout=30)
        if r.status_code == 200:
            return
        assert r.status_code == 503 and time.monotonic() < deadline, (r.status_code, r.text[:300])
        time.sleep(0.5)


def test_an_engine_with_the_seed_cache_compiles_no_kernel(agents, kit, tiny_model, tmp_path):
    from seedfork_localdev.vllm import greedy_tokens

    seed_cache, client_cache = tmp_path / "seed-cache", tmp_path / "client-cache"
    seed_ip, client_ip = kit.new_ip(), kit.new_ip()
    seed_agent = agents(*_agent_args(kit, seed_ip, seed_cache, "serve", "--weights", str(tiny_model)), ip=seed_ip)
    seed_engine = _engine(kit, tiny_model, seed_ip, seed_cache, tmp_path / "seed-vllm.log")
    try:
        seed_engine.wait_healthy(STARTUP_S)
        want = greedy_tokens(seed_engine.url)
        _wait_cache_offered(kit, seed_agent)
    finally:
        seed_engine.stop()  # one vLLM at a time on a small machine; its agent keeps serving
    compiled = _kernels(seed_cache)
    assert any(k.endswith(".so") for k in compiled), f"vLLM compiled no kernel: {sorted(compiled)}"

    client_agent = agents(*_agent_args(kit, client_ip, client_cache, "pull", "--seed", f"{seed_ip}:{kit.AGENT_PORT}",
                                       "--backend", "transfer_engine"), ip=client_ip)  # fmt: skip
    deadline = time.monotonic() + STARTUP_S
    while "engine cache from" not in client_agent.output():  # the cache lands before the weights are offered
        assert client_agent.proc.poll() is None and time.monotonic() < deadline, client_agent.output()[-3000:]
        time.sleep(0.2)
    assert "fetched" in client_agent.output(), client_agent.output()[-3000:]
    fetched = _kernels(client_cache)
    assert set(fetched) == set(compiled)

    client_engine = _engine(kit, tiny_model, client_ip, client_cache, tmp_path / "client-vllm.log")
    try:
        client_engine.wait_healthy(STARTUP_S)
        client_agent.wait_ready(timeout=60)
        assert greedy_tokens(client_engine.url) == want  # the fetched kernels compute what the seed's did
    finally:
        client_engine.stop()
    assert _kernels(client_cache) == fetched, "the engine built kernels although the seed's cache had them"


def test_vllms_per_node_p2p_probe_is_what_the_agent_never_packs(vllm_python):
    """vLLM's custom all-reduce writes its GPU peer-to-peer probe into VLLM_CACHE_ROOT, which lies in the
    pod's engine cache: the name, read from vLLM's source, is one contract.ENGINE_CACHE_NODE_LOCAL keeps home."""
    import fnmatch
    import re
    import subprocess

    from seedfork_api.contract import ENGINE_CACHE_NODE_LOCAL, engine_cache_env

    where = "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('vllm').origin).parent)"
    package = Path(subprocess.run([str(vllm_python), "-c", where], capture_output=True, text=True, check=True)
                   .stdout.strip())  # fmt: skip
    source = (package / "distributed" / "device_communicators" / "all_reduce_utils.py").read_text()
    found = re.search(r'os\.path\.join\(\s*envs\.VLLM_CACHE_ROOT,\s*f"(gpu_p2p_access_cache_for_[^"]+)"', source)
    assert found, "vLLM no longer names its P2P probe as contract.ENGINE_CACHE_NODE_LOCAL expects"
    root = "/cache"
    probe = f"{engine_cache_env('vllm', root)['VLLM_CACHE_ROOT']}/{found.group(1)}".replace("{cache_key}", "0,1")
    rel = Path(probe).relative_to(root).as_posix()
    assert any(fnmatch.fnmatchcase(rel, p) for p in ENGINE_CACHE_NODE_LOCAL["vllm"]), rel
