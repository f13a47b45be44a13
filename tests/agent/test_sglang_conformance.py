"""Conformance with SGLang's R-Fork wire protocol (docs/sglang.md, "R-Fork NCCL requests" and
"TransferEngine seeds"), both directions.

SGLang cannot run here, so ``sglang_double.py`` stands in for it: a client and a seed written from
SGLang 0.5.23's code as that page describes it (the file names which modules it stands for).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from seedfork_agent.puller import PullRequest, pull
from seedfork_agent.store import WeightStore
from seedfork_agent.te import engine

DOUBLE = str(Path(__file__).with_name("sglang_double.py"))


def test_sglang_client_pulls_from_our_seed(kit, agents, weights_dir, weight_tensors, tmp_path):
    seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    seed.wait_ready()
    client_ip = kit.new_ip()
    args = [seed.ip, str(kit.AGENT_PORT), client_ip, str(kit.new_port()), str(weights_dir), str(tmp_path), kit.TOKEN]
    out = subprocess.run(
        [sys.executable, DOUBLE, "client", *args], capture_output=True, text=True, timeout=180, check=False
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for backend in ("nccl", "te"):
        got = load_file(str(tmp_path / f"{backend}.safetensors"))
        kit.assert_same_weights(got, weight_tensors)


@pytest.fixture(scope="module")
def sglang_seed(kit, weights_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sglang-seed")
    ip = kit.new_ip()
    log = open(tmp_path / "sglang-seed.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, DOUBLE, "seed", ip, str(kit.AGENT_PORT), str(weights_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://{ip}:{kit.AGENT_PORT}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sglang-seed.log").read_text()
            time.sleep(0.2)
        yield ip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()


@pytest.mark.parametrize("backend", ["gloo", "transfer_engine"])
def test_our_client_pulls_from_sglang_seed(kit, sglang_seed, weights_dir, weight_tensors, backend):
    # SGLang publishes no manifest: the client brings the expected one (as `seedfork-agent manifest` prints it).
    with WeightStore.from_safetensors(weights_dir, "fp-test") as reference:
        expected = reference.manifest
    req = PullRequest(
        seed_ip=sglang_seed,
        seed_port=kit.AGENT_PORT,
        token=kit.TOKEN,
        backend=backend,
        fingerprint="fp-test",
        group_ports=[kit.new_port()] if backend == "gloo" else [],
        client_id=kit.new_ip(),
        timeout_s=30,
        expected=expected,
    )
    store = pull(req, lambda: engine("127.0.0.1", "tcp", 30))
    try:
        got = {t.name: store.tensor(t.name) for t in store.manifest.tensors}
        kit.assert_same_weights(got, weight_tensors)
        assert store.verify(expected) == []
    finally:
        store.close()
