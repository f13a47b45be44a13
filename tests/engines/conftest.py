"""Helpers for engine tests: real processes on their own loopback IPs, a tiny test model."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TOKEN = "engine-test-token"


def loopback_ip() -> str:
    """A random 127.0.x.y, so concurrent tests and pods never share an address."""
    return f"127.0.{random.randint(10, 250)}.{random.randint(2, 250)}"


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


class Procs:
    """Processes started by one test; each in its own process group, stopped by id at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        logf = self.tmp / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        p = subprocess.Popen(
            [sys.executable, *args],
            stdout=logf.open("wb"),
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
            start_new_session=True,
        )
        self.started.append((p, logf))
        return p

    def log(self, p: subprocess.Popen) -> str:
        for q, logf in self.started:
            if q is p:
                return logf.read_text(errors="replace")
        return ""

    def stop_all(self) -> None:
        for p, _ in self.started:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p, _ in self.started:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture
def procs(tmp_path):
    ps = Procs(tmp_path)
    yield ps
    ps.stop_all()


def wait_status(
    url: str, want: int, timeout: float = 30.0, proc: subprocess.Popen | None = None, **kw
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            last = httpx.get(url, timeout=2, **kw)
            if last.status_code == want:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {want} within {timeout}s (last: {last and last.status_code})")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from seedfork_agent.engines.testmodel import make_model

    return make_model(tmp_path_factory.mktemp("model") / "tiny", "tiny")


PROMPTS = [f"prompt {i}: the quick brown fox".encode() for i in range(20)]


def generations(engine_url: str, n_new: int = 8) -> list[list[int]]:
    out = []
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for p in PROMPTS:
            r = c.post(
                f"{engine_url}/generate", json={"input_ids": list(p), "sampling_params": {"max_new_tokens": n_new}}
            )
            r.raise_for_status()
            out.append(r.json()["output_ids"])
    return out


def start_engine(procs: Procs, model_dir: Path, *source: str, name: str = "engine") -> tuple[str, subprocess.Popen]:
    ip = loopback_ip()
    port = free_port(ip)
    args = ["-m", "seedfork_agent.engines.reference", "serve", "--config", str(model_dir), *source]
    args += ["--host", ip, "--port", str(port), "--token", TOKEN]
    p = procs.start(args, name)
    url = f"http://{ip}:{port}"
    wait_status(f"{url}/v1/engine", 200, proc=p, headers={"Authorization": f"Bearer {TOKEN}"})
    return url, p


@pytest.fixture(scope="session")
def h():
    """The helpers above, as a fixture (test modules cannot import conftest under importlib mode)."""
    import types

    return types.SimpleNamespace(
        TOKEN=TOKEN,
        Procs=Procs,
        PROMPTS=PROMPTS,
        loopback_ip=loopback_ip,
        free_port=free_port,
        wait_status=wait_status,
        generations=generations,
        start_engine=start_engine,
    )
