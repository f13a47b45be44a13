"""A seed's agent serves its engine's compile cache; a new pod's agent fetches it before its engine starts.

Real agent processes on loopback IPs. The "engine" whose API the seed waits for before it offers its cache
is the seed agent's own ``/healthz`` (any HTTP endpoint that answers 200 stands in for an engine's
``/health`` here; the real vLLM engine is in test_vllm_engine_cache.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest


def _cache(root: Path) -> Path:
    (root / "inductor" / "ab").mkdir(parents=True)
    (root / "inductor" / "ab" / "kernel.so").write_bytes(bytes(range(256)) * 64)
    (root / "vllm" / "torch_compile_cache").mkdir(parents=True)
    (root / "vllm" / "torch_compile_cache" / "model").write_bytes(b"graph" * 1000)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _seed(kit, agents, weights_dir, cache: Path, *extra: str):
    ip = kit.new_ip()
    health = f"http://{ip}:{kit.AGENT_PORT}/healthz"
    seed = agents(*kit.seed_args(weights_dir, ip, "--no-te", "--engine-cache", str(cache), "--engine-url", health,
                                 "--engine-version", "1.0", *extra), ip=ip)  # fmt: skip
    seed.wait_ready()
    return seed


def _wait_cache_offered(kit, seed, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{seed.url}/v1/engine-cache", headers={"Authorization": f"Bearer {kit.TOKEN}"}, timeout=10)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_the_seed_serves_its_engine_cache_only_with_the_token(kit, agents, weights_dir, tmp_path):
    seed = _seed(kit, agents, weights_dir, _cache(tmp_path / "seed-cache"))
    r = _wait_cache_offered(kit, seed)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-tar"
    assert b"kernel.so" in r.content
    url = f"{seed.url}/v1/engine-cache"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong-token"}, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": kit.TOKEN}, timeout=10).status_code == 401  # no scheme
    r = httpx.get(f"{url}?path=../../etc/passwd", headers={"Authorization": f"Bearer {kit.TOKEN}"}, timeout=10)
    assert r.status_code == 400


def test_a_seed_without_an_engine_cache_answers_404(kit, agents, weights_dir):
    ip = kit.new_ip()
    seed = agents(*kit.seed_args(weights_dir, ip, "--no-te"), ip=ip)
    seed.wait_ready()
    r = httpx.get(f"{seed.url}/v1/engine-cache", headers={"Authorization": f"Bearer {kit.TOKEN}"}, timeout=10)
    assert r.status_code == 404


def test_no_cache_is_offered_before_the_engine_api_is_up(kit, agents, weights_dir, tmp_path):
    ip = kit.new_ip()
    never = f"http://{ip}:{kit.new_port()}/health"  # nothing listens there: the engine is still compiling
    seed = agents(*kit.seed_args(weights_dir, ip, "--no-te", "--engine-cache", str(_cache(tmp_path / "c")),
                                 "--engine-url", never), ip=ip)  # fmt: skip
    seed.wait_ready()
    time.sleep(1.5)  # several polls of the engine's health URL
    r = httpx.get(f"{seed.url}/v1/engine-cache", headers={"Authorization": f"Bearer {kit.TOKEN}"}, timeout=10)
    assert r.status_code == 503 and "compiling" in r.text


@pytest.mark.timeout(120)
def test_a_new_pod_fetches_the_seed_cache_before_its_engine_starts(kit, agents, weights_dir, weight_tensors, tmp_path):
    seed_cache = _cache(tmp_path / "seed-cache")
    seed = _seed(kit, agents, weights_dir, seed_cache)
    assert _wait_cache_offered(kit, seed).status_code == 200
    mine = tmp_path / "client-cache"
    ip = kit.new_ip()
    client = agents(*kit.pull_args(ip, [seed.ip], "gloo", "--group-port", str(kit.new_port()),
                                   "--engine-cache", str(mine), "--engine-version", "1.0"), ip=ip)  # fmt: skip
    client.wait_ready()
    assert _tree(mine) == _tree(seed_cache)
    assert "engine cache from" in client.output() and "fetched 2 files" in client.output()
    kit.assert_same_weights(client.tensors(), weight_tensors)


@pytest.mark.timeout(120)
def test_a_cache_of_another_engine_version_is_skipped_and_the_pod_still_verifies(
    kit, agents, weights_dir, weight_tensors, tmp_path
):
    seed = _seed(kit, agents, weights_dir, _cache(tmp_path / "seed-cache"))
    assert _wait_cache_offered(kit, seed).status_code == 200
    mine = tmp_path / "client-cache"
    ip = kit.new_ip()
    client = agents(*kit.pull_args(ip, [seed.ip], "gloo", "--group-port", str(kit.new_port()),
                                   "--engine-cache", str(mine), "--engine-version", "2.0"), ip=ip)  # fmt: skip
    client.wait_ready()
    assert _tree(mine) == {}
    assert "engine cache from" in client.output() and "skipped" in client.output()
    assert "is not this pod's" in client.output()
    kit.assert_same_weights(client.tensors(), weight_tensors)
