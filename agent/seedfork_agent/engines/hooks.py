"""Engine hooks the agent calls with the verified store (``seedfork-agent ... --engine-hook MODULE:NAME``).

The agent calls a hook after verification and before it reports ``verified``; a hook that raises
fails the attempt, so an engine that did not take the weights never makes the pod Ready.

- ``checkpoint_engine_sglang``: hand the weights to an SGLang started with ``--load-format dummy
  --checkpoint-engine-wait-weights-before-ready`` (``POST /update_weights_from_ipc``).

vLLM needs no hook either: it loads from the store inside its own processes (``vllm_loader``), which
the agent's ``EngineGate`` checks.

The reference engine needs no hook: it attaches to the store itself through ``GET /v1/attach``,
which the agent answers only once the weights are verified.

The engine's address comes from the pod contract (``SEEDFORK_POD_IP``, ``SEEDFORK_ENGINE_PORT``),
the bearer token from ``SEEDFORK_TOKEN``; ``SEEDFORK_IPC_BUCKET_MB`` sets the bucket size (default 512).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from seedfork_api.contract import EngineEnv

from . import ipc

log = logging.getLogger("seedfork.engines.hooks")
ENV_IPC_BUCKET_MB = "SEEDFORK_IPC_BUCKET_MB"


def _wait_listening(host: str, port: int, timeout_s: float) -> None:
    """The engine may still be starting (it waits for weights): wait until its HTTP port accepts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine at {host}:{port} not listening after {timeout_s}s") from None
            time.sleep(0.2)


def _handoff(store: Any, flavor: str) -> None:
    try:
        env = EngineEnv.from_environ()
    except ValueError as e:
        raise RuntimeError(f"the IPC handoff cannot find the engine: {e}") from None
    host, port, timeout_s = env.pod_ip, env.engine_port, env.timeout_seconds
    _wait_listening(host, port, timeout_s)
    tensors = {t.name: store.tensor(t.name) for t in store.manifest.tensors}
    bucket = int(os.environ.get(ENV_IPC_BUCKET_MB, "512")) << 20
    t0 = time.perf_counter()
    sent = ipc.handoff_over_http(
        f"http://{host}:{port}",
        flavor,
        tensors,
        bucket_bytes=bucket,
        device=store.device,
        token=env.token,
        timeout_s=timeout_s,
    )
    log.info("handed %d bytes to the %s engine over IPC in %.3f s", sent, flavor, time.perf_counter() - t0)


def checkpoint_engine_sglang(store: Any, _attach: dict) -> None:
    _handoff(store, "sglang")

