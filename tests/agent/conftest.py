"""Helpers for agent tests: a small safetensors weight set, and agent processes on loopback IPs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch


def make_weights(seed: int = 0, layers: int = 3) -> dict[str, torch.Tensor]:
    """A few MB of Llama-shaped tensors in mixed dtypes, odd sizes included."""
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(1000, 256, generator=g).to(torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = torch.randn(768, 256, generator=g).to(torch.bfloat16)
        out[p + "mlp.down_proj.weight"] = torch.randn(256, 701, generator=g).to(torch.bfloat16)
        out[p + "input_layernorm.weight"] = torch.randn(255, generator=g)  # float32, odd length
        out[p + "tiny.bias"] = torch.randn(3, generator=g).to(torch.float16)  # 6 bytes: a tail
    out["lm_head.weight"] = torch.randn(1000, 256, generator=g).to(torch.bfloat16)
    return out


@pytest.fixture(scope="session")
def weight_tensors() -> dict[str, torch.Tensor]:
    return make_weights()


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory, weight_tensors):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    names = sorted(weight_tensors)
    half = len(names) // 2
    save_file({n: weight_tensors[n] for n in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({n: weight_tensors[n] for n in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    return d


# ---- agent processes on their own loopback addresses -----------------------


TOKEN = "test-token-5f2c"
AGENT_PORT = 18080
_NET = random.randint(20, 230)  # a /16 of 127/8 per test session, so parallel sessions rarely collide
_HOSTS = itertools.count(2)
# Group ports below Linux's ephemeral range (32768-60999): a port an outgoing connection holds cannot be bound.
_PORTS = itertools.count(20000 + random.randint(0, 400) * 20)
PORT_RANGE = "20000-28999"  # a seed's transfer ports: every group port above, and its TransferEngine's two


def new_ip() -> str:
    n = next(_HOSTS)
    return f"127.{_NET}.{n // 250}.{n % 250 + 2}"


def new_port() -> int:
    return next(_PORTS)


class AgentProc:
    """One agent process (a pod's agent), started and stopped by this test only."""

    def __init__(self, args: list[str], ip: str, log_dir: Path, env: dict | None = None) -> None:
        self.ip = ip
        self.url = f"http://{ip}:{AGENT_PORT}"
        self.log = log_dir / f"agent-{ip}-{time.monotonic_ns()}.log"
        full_env = {**os.environ, "SEEDFORK_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "seedfork_agent", *args],
            stdout=open(self.log, "wb"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def progress(self) -> dict:
        return httpx.get(f"{self.url}/v1/progress", timeout=5).json()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent {self.ip} not ready:\n{self.output()[-3000:]}")

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent {self.ip} still running:\n{self.output()[-3000:]}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"agent {self.ip} ignored {sig!r}") from None

    def tensors(self) -> dict:
        """The agent's verified weights, mapped from its own memory (byte-exact view)."""
        from seedfork_agent.store import Manifest, attach

        r = httpx.get(f"{self.url}/v1/attach", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        r.raise_for_status()
        body = r.json()
        return attach(body["attach"], Manifest.from_dict(body["manifest"]))


@pytest.fixture
def agents(tmp_path):
    started: list[AgentProc] = []

    def start(*args: str, ip: str | None = None, env: dict | None = None) -> AgentProc:
        a = AgentProc(list(args), ip or new_ip(), tmp_path, env)
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill(signal.SIGTERM if a.proc.poll() is None else signal.SIGKILL)


class EngineProc:
    """seedfork's reference engine as a process (a pod's engine container), attached to an agent's store."""

    def __init__(self, model: Path, agent_url: str, ip: str, port: int, log: Path) -> None:
        self.ip, self.port = ip, port
        self.url = f"http://{ip}:{port}"
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        self.log = log
        args = ["-m", "seedfork_agent.engines.reference", "serve", "--config", str(model), "--agent", agent_url]
        args += ["--host", ip, "--port", str(port), "--token", TOKEN]
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=open(log, "wb"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.url}{path}", headers=self.headers, timeout=5)
        except httpx.HTTPError:
            return None

    def wait_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (r := self.get("/v1/engine")) is None or r.status_code != 200:
            assert self.proc.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, "the engine's API did not come up"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="session")
def reference_model(tmp_path_factory) -> Path:
    """The reference engine's tiny model: weights an engine attaches and generates with."""
    from seedfork_agent.engines.testmodel import make_model

    return make_model(tmp_path_factory.mktemp("model") / "tiny", "tiny")


@pytest.fixture
def engines(tmp_path):
    """Start reference engines: ``start(model, agent_url, ip=None, port=None)``; all stopped at teardown."""
    started: list[EngineProc] = []

    def start(model: Path, agent_url: str, ip: str | None = None, port: int | None = None) -> EngineProc:
        ip = ip or new_ip()
        e = EngineProc(model, agent_url, ip, port or new_port(), tmp_path / f"engine-{ip}-{len(started)}.log")
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def seed_args(weights_dir, ip: str, *extra: str) -> list[str]:
    return ["serve", "--host", ip, "--port", str(AGENT_PORT), "--weights", str(weights_dir),
            "--fingerprint", "fp-test", "--device", "cpu", "--timeout", "20", "--port-range", PORT_RANGE,
            *extra]  # fmt: skip


def pull_args(ip: str, seeds: list[str], backend: str, *extra: str) -> list[str]:
    out = ["pull", "--host", ip, "--port", str(AGENT_PORT), "--fingerprint", "fp-test", "--device", "cpu",
           "--backend", backend, "--timeout", "20"]  # fmt: skip
    for s in seeds:
        out += ["--seed", f"{s}:{AGENT_PORT}"]
    return out + list(extra)


def pull_request(seed_ip: str, backend: str, **kw):
    """A pull from the agent at ``seed_ip`` with this kit's token, fingerprint and a 20 s timeout (any of them
    overridden by ``kw``)."""
    from seedfork_agent.puller import PullRequest

    defaults = {"token": TOKEN, "fingerprint": "fp-test", "client_id": "test-client", "timeout_s": 20}
    return PullRequest(seed_ip=seed_ip, seed_port=AGENT_PORT, backend=backend, **{**defaults, **kw})


def metric(agent: AgentProc, name: str) -> float:
    """The sum of an agent's Prometheus samples whose line starts with ``name`` (a name, or a name and labels)."""
    text = httpx.get(f"{agent.url}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def seed(kit, weights_dir, tmp_path_factory, request):
    """One storage-loaded seed shared by a module's tests, with the module's ``SEED_ARGS`` (if any) added."""
    ip = new_ip()
    args = seed_args(weights_dir, ip, *getattr(request.module, "SEED_ARGS", ()))
    proc = AgentProc(args, ip, tmp_path_factory.mktemp("seed"))
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill(signal.SIGTERM)


def assert_same_weights(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        a, b = got[name], t
        assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape), name
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)), name


@contextlib.contextmanager
def agent_in_thread(timeout_s: float, store=None, gate=None) -> Iterator[tuple]:
    """A real ``Agent`` (no TransferEngine) with its HTTP server on its own loopback IP and its event loop in
    a thread of this process, serving ``store`` if given, with ``gate`` (``engines.gate``) if given:
    (agent, loop). Stopped on exit."""
    from seedfork_agent.agent import Agent, AgentConfig

    config = AgentConfig(new_ip(), AGENT_PORT, TOKEN, "fp-test", serve_te=False, timeout_s=timeout_s)
    agent = Agent(config, gate=gate)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(agent.server.start())
        if store is not None:
            assert loop.run_until_complete(agent.adopt(store)), agent.attempt.report.error
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield agent, loop
    finally:
        asyncio.run_coroutine_threadsafe(agent.server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (pytest's importlib mode cannot import conftest)."""
    import types

    return types.SimpleNamespace(
        TOKEN=TOKEN,
        AGENT_PORT=AGENT_PORT,
        PORT_RANGE=PORT_RANGE,
        new_ip=new_ip,
        new_port=new_port,
        seed_args=seed_args,
        pull_args=pull_args,
        pull_request=pull_request,
        metric=metric,
        assert_same_weights=assert_same_weights,
        AgentProc=AgentProc,
        agent_in_thread=agent_in_thread,
    )

